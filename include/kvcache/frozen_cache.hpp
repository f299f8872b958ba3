// kvcache: FrozenKVCache - an immutable snapshot of a cache's valid prefix, shared by pointer.
#ifndef KVCACHE_FROZEN_CACHE_HPP
#define KVCACHE_FROZEN_CACHE_HPP

#include <kvcache/detail/contiguous_cache.hpp>
#include <kvcache/detail/kv_view.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/detail/record_codec.hpp>

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
class FrozenKVCache : public detail::Persistent<FrozenKVCache<T, Layout>> {
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



 private:
  Shape shape() const { return Layout::shape(keys_.dimensions()); }

  Tensor4<T> keys_;
  Tensor4<T> values_;
};

namespace detail {
/// A FrozenKVCache record: shape, capacity = position = size(), the keys and values.
template <class T, class Layout>
struct RecordTraits<FrozenKVCache<T, Layout>> {
  using Cache = FrozenKVCache<T, Layout>;
  static constexpr CacheKind kind = CacheKind::frozen_cache;
  using Header = CacheHeader;
  static constexpr auto fields = cache_fields<CacheHeader>();

  static Header header(const Cache& cache) {
    const Index n = cache.size();
    return {cache.batch_size(), cache.num_heads(), cache.head_dim(), n, n};
  }
  static void write_payload(const Cache& cache, const Header&, Writer& writer) {
    write_view_rows<Layout>(writer, cache.attention_view());
  }
  static KVRows<T> read_payload(Reader& reader, const Header& h, const LoadLimits& limits) {
    require_equal(reader, "capacity", h.capacity, h.position,
                  "a frozen cache's capacity is its position");
    return read_cache_rows<T>(reader, h, h.position, h.position, limits);
  }
  static Cache build(const Header& h, KVRows<T>&& rows) {
    const std::array<Index, 4> dims = Layout::dims({h.batch_size, h.num_heads, h.position, h.head_dim});
    Tensor4<T> keys(dims), values(dims);
    std::copy(rows.keys.begin(), rows.keys.end(), keys.data());
    std::copy(rows.values.begin(), rows.values.end(), values.data());
    return Cache(std::move(keys), std::move(values));
  }
};

/// freeze() of the static and the dynamic cache (declared in detail/contiguous_cache.hpp):
/// the snapshot is built here, where FrozenKVCache is complete.
template <class T, class Layout>
std::shared_ptr<const FrozenKVCache<T, Layout>> ContiguousKVCache<T, Layout>::freeze() const {
  return std::make_shared<const FrozenKVCache<T, Layout>>(keys(), values());
}

}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_FROZEN_CACHE_HPP
