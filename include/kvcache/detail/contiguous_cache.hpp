// kvcache: the bookkeeping shared by the static and the dynamic cache - one storage buffer
// whose positions [0, position) are the valid prefix.
#ifndef KVCACHE_DETAIL_CONTIGUOUS_CACHE_HPP
#define KVCACHE_DETAIL_CONTIGUOUS_CACHE_HPP

#include <kvcache/detail/kv_storage.hpp>
#include <kvcache/persistence.hpp>

#include <cstddef>
#include <istream>
#include <memory>
#include <ostream>
#include <vector>

namespace kvcache {

template <class T, class Layout>
class FrozenKVCache;

namespace detail {

/// Base of StaticKVCache and DynamicKVCache: everything but the growth policy.
/// Invariant: 0 <= position_ <= storage_.capacity(); positions [0, position_) hold the tokens
/// appended since construction or reset(), in order.
template <class T, class Layout>
class ContiguousKVCache {
  static_assert((check_cache_parameters<T, Layout>(), true));

 public:
  using element_type = T;
  using layout_type = Layout;

  /// \brief Positions held for the next query; equal to position().
  Index size() const { return position_; }
  /// \brief Tokens appended since construction or reset(): the absolute position of the next.
  Index position() const { return position_; }
  /// \brief Positions storable without reallocation.
  Index capacity() const { return storage_.capacity(); }
  Index batch_size() const { return storage_.shape().batch; }
  Index num_heads() const { return storage_.shape().heads; }
  Index head_dim() const { return storage_.shape().head_dim; }

  /// \brief The size() held keys, oldest first: (batch, heads, size(), head_dim) in Layout.
  Tensor4<T> keys() const { return storage_.copy_keys(0, position_); }
  /// \brief The size() held values, oldest first: (batch, heads, size(), head_dim) in Layout.
  Tensor4<T> values() const { return storage_.copy_values(0, position_); }

  /// \brief Forgets every position; the storage (and capacity()) is kept.
  void reset() noexcept { position_ = 0; }

  /// \brief Keeps the first n positions (speculative-decoding rollback).
  /// Requires: 0 <= n <= size(), else std::invalid_argument and nothing changes.
  void crop(Index n) {
    if (n < 0 || n > position_)
      throw_invalid_argument("crop: n must be in [0, size()] = [0, ", position_, "], got ", n);
    position_ = n;
  }

  /// \brief Bytes of K/V storage this object owns (capacity, not size).
  std::size_t memory_bytes() const { return storage_.memory_bytes(); }

  /// \brief An immutable snapshot of the size() held positions, for prefix sharing.
  ///
  /// Copies the valid positions once into a buffer of exactly size() positions (not
  /// capacity()); the cache can keep changing afterwards without affecting the snapshot.
  /// Everyone holding the returned pointer shares that one copy (see PrefixKVCache).
  /// Defined in frozen_cache.hpp, which static_cache.hpp and dynamic_cache.hpp include.
  std::shared_ptr<const FrozenKVCache<T, Layout>> freeze() const;

  /// \brief The kernel's view of the valid prefix; valid until the cache is next modified.
  KVView<T> attention_view() const {
    const Shape s = storage_.shape();
    KVView<T> view;
    view.batch_size = s.batch;
    view.num_heads = s.heads;
    view.head_dim = s.head_dim;
    view.position = position_;
    view.add(storage_.segment(0, position_, 0));
    return view;
  }

 protected:
  ContiguousKVCache(const char* kind, Index batch_size, Index capacity, Index num_heads,
                    Index head_dim)
      : storage_(checked(kind, batch_size, capacity, num_heads, head_dim)) {}

  /// Appends k, v at position(); `grow` says whether a full buffer may be reallocated
  /// (geometrically) or is an error. Every check runs before anything is modified.
  template <class K, class V>
  void append(const char* where, const K& k, const V& v, bool grow) {
    const auto [k_view, v_view, in] =
        check_update<T, Layout>(where, k, v, batch_size(), num_heads(), head_dim());
    if (in.seq == 0) return;
    // Compared as differences: position_ + in.seq may not be representable (a TensorMap can
    // claim any extent).
    if (in.seq > capacity() - position_) {
      if (!grow)
        throw_length_error(where, ": appending ", in.seq, " positions at position ", position_,
                           " exceeds the capacity of ", capacity(), " (max_seq_len)");
      require_representable_append(where, position_, in.seq);
      const Index needed = position_ + in.seq;
      // Doubling keeps the total copied by N one-token appends below 2N positions. (2 *
      // capacity() cannot overflow: a buffer of more than max / 2 positions is not addressable.)
      storage_.reallocate(std::max({needed, 2 * capacity(), Index(16)}), position_);
    }
    storage_.write(k_view, v_view, position_);
    position_ += in.seq;
  }

  /// The record of `Cache` (the derived class): header, keys and values of positions
  /// [0, position()) as two (batch, heads, position, head_dim) tensors in Layout, checksum.
  template <class Cache>
  void save_record(std::ostream& out) const {
    Writer writer(out, persistence_owner<Cache>("save"));
    const Shape s = storage_.shape();
    RecordHeader header;
    header.type = record_type_of<Cache>();
    header.batch_size = s.batch;
    header.num_heads = s.heads;
    header.head_dim = s.head_dim;
    header.capacity = s.seq;
    header.position = position_;
    write_record_header(writer, header);
    const KVSegment<T> held = storage_.segment(0, position_, 0);
    write_rows<Layout>(
        writer, s.batch, s.heads, position_, s.head_dim,
        [&](Index b, Index h, Index i) { return row_at(held.keys, held.strides, b, h, i); },
        "keys");
    write_rows<Layout>(
        writer, s.batch, s.heads, position_, s.head_dim,
        [&](Index b, Index h, Index i) { return row_at(held.values, held.strides, b, h, i); },
        "values");
    write_record_checksum(writer);
    writer.finish();
  }

  /// Reads a record of `Cache` written by save_record. Everything is checked and the payload
  /// read (into memory that grows as it arrives) before make_empty(header) allocates the cache
  /// of header.capacity positions. `min_capacity`: 1 for static caches, 0 for dynamic ones.
  template <class Cache, class MakeEmpty>
  static Cache load_record(std::istream& in, const LoadLimits& limits, Index min_capacity,
                           MakeEmpty&& make_empty) {
    Reader reader(in, persistence_owner<Cache>("load"));
    const RecordHeader header = read_record_header(reader, record_type_of<Cache>());
    if (header.capacity < min_capacity)
      reader.fail("capacity: expected at least ", min_capacity, ", got ", header.capacity);
    require_at_most(reader, "position", header.position, "capacity", header.capacity);
    require_within_limit(reader,
                         checked_product(reader, "K/V storage bytes",
                                         {2, header.batch_size, header.num_heads, header.capacity,
                                          header.head_dim, Index(sizeof(T))}),
                         limits);
    // At most the storage just bounded: cannot overflow.
    const auto count = static_cast<std::uint64_t>(header.batch_size * header.num_heads *
                                                  header.position * header.head_dim);
    const std::vector<T> keys = reader.read_elements<T>(count, "keys");
    const std::vector<T> values = reader.read_elements<T>(count, "values");
    read_record_checksum(reader);

    Cache cache = make_empty(header);
    const std::array<Index, 4> dims =
        Layout::dims({header.batch_size, header.num_heads, header.position, header.head_dim});
    cache.storage_.write({keys.data(), dims}, {values.data(), dims}, 0);
    cache.position_ = header.position;
    return cache;
  }

  KVStorage<T, Layout> storage_;
  Index position_ = 0;

 private:
  static KVStorage<T, Layout> checked(const char* kind, Index batch_size, Index capacity,
                                      Index num_heads, Index head_dim) {
    require_positive(kind, "batch_size", batch_size);
    require_positive(kind, "num_heads", num_heads);
    require_positive(kind, "head_dim", head_dim);
    if (capacity < 0)
      throw_invalid_argument(kind, ": capacity must not be negative, got ", capacity);
    return KVStorage<T, Layout>(batch_size, num_heads, capacity, head_dim);
  }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_CONTIGUOUS_CACHE_HPP
