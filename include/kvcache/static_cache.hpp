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
class StaticKVCache : public detail::ContiguousKVCache<T, Layout> {
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

  /// \brief Writes the cache to `out` (docs/persistence_format.md): shape, max_seq_len,
  /// position and the size() held positions, with a CRC-32C. Throws std::ios_base::failure
  /// when the stream fails (the stream may then hold a partial record).
  void save(std::ostream& out) const { this->template save_record<StaticKVCache>(out); }

  /// \brief Reads a cache written by save(): the same max_seq_len, position and contents, bit
  /// for bit. Throws kvcache::FormatError (naming the expected and the received value) when the
  /// stream does not hold an intact StaticKVCache<T, Layout> record or fails; the stream is
  /// left right after the record.
  static StaticKVCache load(std::istream& in) { return load(in, LoadLimits{}); }
  /// \brief load() with a bound on the memory the loaded cache may own (see LoadLimits).
  static StaticKVCache load(std::istream& in, const LoadLimits& limits) {
    return Base::template load_record<StaticKVCache>(
        in, limits, /*min_capacity=*/1, [](const detail::RecordHeader& h) {
          return StaticKVCache(h.batch_size, h.capacity, h.num_heads, h.head_dim);
        });
  }

 private:
  static Index positive_length(Index max_seq_len) {
    detail::require_positive("StaticKVCache", "max_seq_len", max_seq_len);
    return max_seq_len;
  }
};

namespace detail {
template <class T, class Layout>
struct record_kind<StaticKVCache<T, Layout>>
    : std::integral_constant<CacheKind, CacheKind::static_cache> {};
}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_STATIC_CACHE_HPP
