// kvcache: DynamicKVCache - a cache that grows geometrically without a fixed maximum.
#ifndef KVCACHE_DYNAMIC_CACHE_HPP
#define KVCACHE_DYNAMIC_CACHE_HPP

#include <kvcache/detail/contiguous_cache.hpp>
#include <kvcache/frozen_cache.hpp>  // freeze()

namespace kvcache {

/// \brief A cache with no fixed maximum length. When full it moves to a buffer of twice the
/// capacity, so appending N tokens one at a time copies fewer than 2N positions in total
/// (never a concatenation per step, as a naive dynamic cache does).
///
/// \tparam T      float, double, Eigen::half or Eigen::bfloat16
/// \tparam Layout BHSD (default) or BSHD
///
/// Views from attention_view() are invalidated by growth. An update with fewer batch rows than
/// batch_size() zeroes the other rows at the new positions.
template <class T, class Layout = BHSD>
class DynamicKVCache : public detail::ContiguousKVCache<T, Layout>,
                      public detail::Persistent<DynamicKVCache<T, Layout>> {
  using Base = detail::ContiguousKVCache<T, Layout>;

 public:
  /// \param batch_size, num_heads, head_dim  positive, else std::invalid_argument
  /// \param initial_capacity positions to reserve up front (0: allocate on first update)
  DynamicKVCache(Index batch_size, Index num_heads, Index head_dim, Index initial_capacity = 0)
      : Base("DynamicKVCache", batch_size, initial_capacity, num_heads, head_dim) {}

  /// \brief Appends k, v of shape (b <= batch_size(), num_heads(), new_len, head_dim()),
  /// growing the storage when needed. Throws std::invalid_argument for a shape that does not
  /// fit, with the cache unchanged.
  template <class K, class V>
  void update(const K& k, const V& v) {
    this->append("DynamicKVCache::update", k, v, /*grow=*/true);
  }

  /// \brief Makes capacity() at least n positions, so that appends up to n do not reallocate.
  void reserve(Index n) {
    if (n > this->capacity()) this->storage_.reallocate(n, this->position_);
  }


};

namespace detail {
/// A DynamicKVCache record: ContiguousRecord with a capacity of at least 0.
template <class T, class Layout>
struct RecordTraits<DynamicKVCache<T, Layout>> : ContiguousRecord<DynamicKVCache<T, Layout>, 0> {
  static constexpr CacheKind kind = CacheKind::dynamic_cache;
  static DynamicKVCache<T, Layout> empty(const CacheHeader& h) {
    return DynamicKVCache<T, Layout>(h.batch_size, h.num_heads, h.head_dim, h.capacity);
  }
};
}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_DYNAMIC_CACHE_HPP
