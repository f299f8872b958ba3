// kvcache: StaticKVCache - preallocated storage plus a position pointer (torchtune semantics).
#ifndef KVCACHE_STATIC_CACHE_HPP
#define KVCACHE_STATIC_CACHE_HPP

#include <kvcache/detail/contiguous_cache.hpp>
#include <kvcache/frozen_cache.hpp>  // freeze()

namespace kvcache {

/// \brief A cache of fixed capacity, allocated once: (batch_size, num_heads, max_seq_len,
/// head_dim) keys and values in Layout, and a position pointer.
///
/// \tparam T      float, double, Eigen::half or Eigen::bfloat16
/// \tparam Layout BHSD (default) or BSHD: the layout of the storage and of every tensor the
///                cache takes or returns
///
/// An update with fewer batch rows than batch_size() writes rows [0, b) and sets the other
/// rows to zero at the new positions.
template <class T, class Layout = BHSD>
class StaticKVCache : public detail::ContiguousKVCache<T, Layout>,
                      public detail::Persistent<StaticKVCache<T, Layout>> {
  using Base = detail::ContiguousKVCache<T, Layout>;

 public:
  /// \param batch_size, max_seq_len, num_heads, head_dim all positive, else
  ///        std::invalid_argument
  StaticKVCache(Index batch_size, Index max_seq_len, Index num_heads, Index head_dim)
      : Base("StaticKVCache", batch_size, positive_length(max_seq_len), num_heads, head_dim) {}

  /// \brief Appends k, v of shape (b <= batch_size(), num_heads(), new_len, head_dim()) at
  /// position(). Accepts Tensor4<T> and Eigen::TensorMap of one.
  ///
  /// Throws std::invalid_argument for a shape that does not fit, std::length_error past
  /// capacity(); in both cases the cache is unchanged.
  template <class K, class V>
  void update(const K& k, const V& v) {
    this->append("StaticKVCache::update", k, v, /*grow=*/false);
  }



 private:
  static Index positive_length(Index max_seq_len) {
    detail::require_positive("StaticKVCache", "max_seq_len", max_seq_len);
    return max_seq_len;
  }
};

namespace detail {
/// A StaticKVCache record: ContiguousRecord with a capacity of at least 1.
template <class T, class Layout>
struct RecordTraits<StaticKVCache<T, Layout>> : ContiguousRecord<StaticKVCache<T, Layout>, 1> {
  static constexpr CacheKind kind = CacheKind::static_cache;
  static StaticKVCache<T, Layout> empty(const CacheHeader& h) {
    return StaticKVCache<T, Layout>(h.batch_size, h.capacity, h.num_heads, h.head_dim);
  }
};
}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_STATIC_CACHE_HPP
