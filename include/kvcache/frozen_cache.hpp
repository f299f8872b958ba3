// kvcache: FrozenKVCache - an immutable snapshot of a cache's valid prefix, shared by pointer.
#ifndef KVCACHE_FROZEN_CACHE_HPP
#define KVCACHE_FROZEN_CACHE_HPP

#include <kvcache/detail/contiguous_cache.hpp>
#include <kvcache/detail/kv_view.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/persistence.hpp>

#include <algorithm>
#include <cstddef>
#include <istream>
#include <memory>
#include <ostream>
#include <utility>
#include <vector>

namespace kvcache {

/// \brief An immutable block of keys and values: (batch_size, num_heads, size(), head_dim) in
/// Layout, exactly size() positions, no spare capacity.
///
/// Made by `freeze()` of StaticKVCache and DynamicKVCache, which copy the valid positions
/// once and return a `std::shared_ptr<const FrozenKVCache>`; every holder of the pointer
/// (PrefixKVCache sequences, attend() calls on any thread) reads the same buffer. The object
/// has no mutable state, so concurrent reads need no synchronisation. Its positions are
/// 0 .. size() - 1, so `attend(q, frozen)` treats the queries as the last q_len of them.
///
/// \tparam T      float, double, Eigen::half or Eigen::bfloat16
/// \tparam Layout BHSD (default) or BSHD
template <class T, class Layout = BHSD>
class FrozenKVCache {
  static_assert((detail::check_cache_parameters<T, Layout>(), true));

 public:
  using element_type = T;
  using layout_type = Layout;

  /// \brief Takes ownership of keys and values of shape (batch, heads, length, head_dim) in
  /// Layout (freeze() passes a fresh copy of a cache's valid prefix; any K/V pair works, e.g.
  /// a precomputed system prompt).
  ///
  /// Requires: keys and values of the same shape, batch, heads and head_dim >= 1, length >= 0;
  /// else std::invalid_argument naming the shapes.
  FrozenKVCache(Tensor4<T> keys, Tensor4<T> values)
      : keys_(std::move(keys)), values_(std::move(values)) {
    if (keys_.dimensions() != values_.dimensions())
      detail::throw_invalid_argument(
          "FrozenKVCache: keys and values must have the same shape: expected values of shape ",
          detail::describe_dims<Layout>(keys_.dimensions()), "; got ",
          detail::describe_dims<Layout>(values_.dimensions()));
    const Shape s = shape();
    if (s.batch < 1 || s.heads < 1 || s.head_dim < 1)
      detail::throw_invalid_argument(
          "FrozenKVCache: expected keys and values of shape ",
          detail::describe_expected<Layout>(">= 1", ">= 1", "length", ">= 1"), "; got ",
          detail::describe_dims<Layout>(keys_.dimensions()));
  }

  /// \brief Positions held; equal to position() and capacity().
  Index size() const { return shape().seq; }
  /// \brief The absolute position after the last held one (positions start at 0).
  Index position() const { return size(); }
  /// \brief Equal to size(): a frozen cache has no room to grow.
  Index capacity() const { return size(); }
  Index batch_size() const { return shape().batch; }
  Index num_heads() const { return shape().heads; }
  Index head_dim() const { return shape().head_dim; }

  /// \brief A copy of the keys: (batch_size, num_heads, size(), head_dim) in Layout.
  Tensor4<T> keys() const { return keys_; }
  /// \brief A copy of the values: (batch_size, num_heads, size(), head_dim) in Layout.
  Tensor4<T> values() const { return values_; }

  /// \brief Bytes of K/V storage this object owns: 2 * batch * heads * size() * head_dim *
  /// sizeof(T). Counted once, here, however many sequences share the snapshot.
  std::size_t memory_bytes() const {
    return 2 * static_cast<std::size_t>(keys_.size()) * sizeof(T);
  }

  /// \brief The kernel's view: one segment, positions 0 .. size() - 1. Valid as long as this
  /// object lives (it never changes).
  detail::KVView<T> attention_view() const {
    const Shape s = shape();
    detail::KVView<T> view;
    view.batch_size = s.batch;
    view.num_heads = s.heads;
    view.head_dim = s.head_dim;
    view.position = s.seq;
    view.add(segment(s.seq, 0));
    return view;
  }

  /// \brief Positions [0, length) as a kernel segment placed at absolute positions
  /// first_position, first_position + 1, ... (PrefixKVCache reads its prefix this way).
  /// Requires: 0 <= length <= size().
  detail::KVSegment<T> segment(Index length, Index first_position) const {
    return {keys_.data(), values_.data(), Layout::strides(shape()), first_position, length};
  }

  /// \brief Writes the snapshot to `out` (docs/persistence_format.md): shape and the size()
  /// positions, with a CRC-32C. Throws std::ios_base::failure when the stream fails (the
  /// stream may then hold a partial record).
  void save(std::ostream& out) const {
    detail::Writer writer(out, detail::persistence_owner<FrozenKVCache>("save"));
    const Shape s = shape();
    detail::RecordHeader header;
    header.type = detail::record_type_of<FrozenKVCache>();
    header.batch_size = s.batch;
    header.num_heads = s.heads;
    header.head_dim = s.head_dim;
    header.capacity = s.seq;
    header.position = s.seq;
    detail::write_record_header(writer, header);
    writer.write_elements(keys_.data(), static_cast<std::size_t>(keys_.size()), "keys");
    writer.write_elements(values_.data(), static_cast<std::size_t>(values_.size()), "values");
    detail::write_record_checksum(writer);
    writer.finish();
  }

  /// \brief Reads a snapshot written by save(), bit for bit; share it with
  /// `std::make_shared<const FrozenKVCache<T, Layout>>(FrozenKVCache<T, Layout>::load(in))`.
  /// Throws kvcache::FormatError (naming the expected and the received value) when the stream
  /// does not hold an intact FrozenKVCache<T, Layout> record or fails; the stream is left
  /// right after the record.
  static FrozenKVCache load(std::istream& in) { return load(in, LoadLimits{}); }
  /// \brief load() with a bound on the memory the loaded snapshot may own (see LoadLimits).
  static FrozenKVCache load(std::istream& in, const LoadLimits& limits) {
    detail::Reader reader(in, detail::persistence_owner<FrozenKVCache>("load"));
    const detail::RecordHeader h =
        detail::read_record_header(reader, detail::record_type_of<FrozenKVCache>());
    detail::require_equal(reader, "capacity", h.capacity, h.position,
                          "a frozen cache's capacity is its position");
    detail::require_within_limit(
        reader,
        detail::checked_product(reader, "K/V storage bytes",
                                {2, h.batch_size, h.num_heads, h.position, h.head_dim,
                                 Index(sizeof(T))}),
        limits);
    // At most the storage just bounded: cannot overflow.
    const auto count = static_cast<std::uint64_t>(h.batch_size * h.num_heads * h.position *
                                                  h.head_dim);
    const std::vector<T> keys = reader.read_elements<T>(count, "keys");
    const std::vector<T> values = reader.read_elements<T>(count, "values");
    detail::read_record_checksum(reader);

    const std::array<Index, 4> dims =
        Layout::dims({h.batch_size, h.num_heads, h.position, h.head_dim});
    Tensor4<T> key_tensor(dims), value_tensor(dims);
    std::copy(keys.begin(), keys.end(), key_tensor.data());
    std::copy(values.begin(), values.end(), value_tensor.data());
    return FrozenKVCache(std::move(key_tensor), std::move(value_tensor));
  }

 private:
  Shape shape() const { return Layout::shape(keys_.dimensions()); }

  Tensor4<T> keys_;
  Tensor4<T> values_;
};

namespace detail {
template <class T, class Layout>
struct record_kind<FrozenKVCache<T, Layout>>
    : std::integral_constant<CacheKind, CacheKind::frozen_cache> {};

/// freeze() of the static and the dynamic cache (declared in detail/contiguous_cache.hpp):
/// the snapshot is built here, where FrozenKVCache is complete.
template <class T, class Layout>
std::shared_ptr<const FrozenKVCache<T, Layout>> ContiguousKVCache<T, Layout>::freeze() const {
  return std::make_shared<const FrozenKVCache<T, Layout>>(keys(), values());
}

}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_FROZEN_CACHE_HPP
