// kvcache: the bookkeeping shared by the static and the dynamic cache - one storage buffer
// whose positions [0, position) are the valid prefix.
#ifndef KVCACHE_DETAIL_CONTIGUOUS_CACHE_HPP
#define KVCACHE_DETAIL_CONTIGUOUS_CACHE_HPP

#include <kvcache/detail/kv_storage.hpp>
#include <kvcache/detail/record_codec.hpp>

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

  template <class Cache, Index MinCapacity>
  friend struct ContiguousRecord;

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

/// The records of StaticKVCache and DynamicKVCache (their RecordTraits derive from it, adding
/// `kind` and `empty(header)`, the cache a header describes): shape, capacity and position,
/// then the keys and values of positions [0, position()). A capacity below MinCapacity is
/// rejected.
template <class Cache, Index MinCapacity>
struct ContiguousRecord {
  using T = typename Cache::element_type;
  using Layout = typename Cache::layout_type;
  using Header = CacheHeader;
  static constexpr auto fields = cache_fields<CacheHeader>();

  static Header header(const Cache& cache) {
    return {cache.batch_size(), cache.num_heads(), cache.head_dim(), cache.capacity(),
            cache.position()};
  }
  static void write_payload(const Cache& cache, const Header&, Writer& writer) {
    write_view_rows<Layout>(writer, cache.attention_view());
  }
  static KVRows<T> read_payload(Reader& reader, const Header& h, const LoadLimits& limits) {
    if (h.capacity < MinCapacity)
      reader.fail("capacity: expected at least ", MinCapacity, ", got ", h.capacity);
    require_at_most(reader, "position", h.position, "capacity", h.capacity);
    return read_cache_rows<T>(reader, h, h.capacity, h.position, limits);
  }
  static Cache build(const Header& h, KVRows<T>&& rows) {
    Cache cache = RecordTraits<Cache>::empty(h);
    const std::array<Index, 4> dims = Layout::dims({h.batch_size, h.num_heads, h.position, h.head_dim});
    cache.storage_.write({rows.keys.data(), dims}, {rows.values.data(), dims}, 0);
    cache.position_ = h.position;
    return cache;
  }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_CONTIGUOUS_CACHE_HPP
