// kvcache: PrefixKVCache - a sequence that starts with a shared, frozen prefix (never copied)
// and appends its own tokens after it.
#ifndef KVCACHE_PREFIX_CACHE_HPP
#define KVCACHE_PREFIX_CACHE_HPP

#include <kvcache/detail/kv_storage.hpp>
#include <kvcache/detail/kv_view.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/frozen_cache.hpp>

#include <cstddef>
#include <memory>
#include <utility>

namespace kvcache {

/// \brief One sequence over a shared FrozenKVCache: positions [0, prefix_length()) are read
/// from the frozen prefix in place, positions [prefix_length(), size()) from this object's own
/// storage of max_new_tokens positions.
///
/// Any number of PrefixKVCache objects (on any threads) may share one prefix: it is immutable
/// and held by std::shared_ptr, so it lives as long as any sequence reads it. attend() sees two
/// segments, the frozen prefix at positions 0.. and the own tokens right after it, and covers
/// both in one online-softmax pass: nothing is concatenated or copied. Copying a
/// PrefixKVCache copies its own tokens and shares the prefix: a cheap fork of a sequence
/// (beam search, parallel sampling).
///
/// Bookkeeping (size() == position() == prefix_length() + own tokens):
/// - update() appends after the last held position; at most max_new_tokens own tokens, else
///   std::length_error. An update with fewer batch rows than batch_size() zeroes the other
///   rows of the own storage at the new positions (the prefix is never written).
/// - reset() drops the own tokens and returns to the whole prefix (size() == prefix->size()),
///   even after a crop() into the prefix: the snapshot itself never changes.
/// - crop(n) with n >= prefix_length() keeps own tokens up to n. crop(n) with n below it keeps
///   the first n prefix positions (prefix_length() becomes n, still read in place) and drops
///   every own token; later updates continue at position n, written to the own storage. The
///   prefix positions dropped that way are not reused, so capacity() becomes
///   n + max_new_tokens (the own storage never grows or moves).
///
/// \tparam T      float, double, Eigen::half or Eigen::bfloat16
/// \tparam Layout BHSD (default) or BSHD: the prefix's layout and that of every tensor taken
///                or returned
template <class T, class Layout = BHSD>
class PrefixKVCache {
  static_assert((detail::check_cache_parameters<T, Layout>(), true));

 public:
  using element_type = T;
  using layout_type = Layout;
  using Prefix = FrozenKVCache<T, Layout>;

  /// \param prefix         the shared snapshot (not copied); batch_size(), num_heads() and
  ///                       head_dim() are the prefix's. Null: std::invalid_argument.
  /// \param max_new_tokens own positions to allocate: (prefix batch, heads, max_new_tokens,
  ///                       head_dim) keys and values. Zero or negative:
  ///                       std::invalid_argument.
  PrefixKVCache(std::shared_ptr<const Prefix> prefix, Index max_new_tokens)
      : prefix_(checked_prefix(std::move(prefix))),
        prefix_length_(prefix_->size()),
        own_(prefix_->batch_size(), prefix_->num_heads(), checked_length(max_new_tokens),
             prefix_->head_dim()) {}

  /// \brief Positions held for the next query: prefix_length() + own tokens.
  Index size() const { return prefix_length_ + own_length_; }
  /// \brief The absolute position of the next token; equal to size().
  Index position() const { return size(); }
  /// \brief prefix_length() + max_new_tokens(): positions storable without an error.
  Index capacity() const { return prefix_length_ + max_new_tokens(); }
  Index batch_size() const { return own_.shape().batch; }
  Index num_heads() const { return own_.shape().heads; }
  Index head_dim() const { return own_.shape().head_dim; }

  /// \brief The shared snapshot this sequence starts with.
  const std::shared_ptr<const Prefix>& prefix() const { return prefix_; }
  /// \brief Prefix positions in use: prefix()->size(), or less after crop() into the prefix.
  Index prefix_length() const { return prefix_length_; }
  /// \brief Own positions allocated (the constructor's max_new_tokens).
  Index max_new_tokens() const { return own_.capacity(); }

  /// \brief The size() held keys, prefix first: (batch_size, num_heads, size(), head_dim).
  Tensor4<T> keys() const {
    return detail::gather_held<Layout>(attention_view(), detail::KVPart::keys);
  }
  /// \brief The size() held values, prefix first: (batch_size, num_heads, size(), head_dim).
  Tensor4<T> values() const {
    return detail::gather_held<Layout>(attention_view(), detail::KVPart::values);
  }

  /// \brief Appends k, v of shape (b <= batch_size(), num_heads(), new_len, head_dim()) at
  /// position(). Accepts Tensor4<T> and Eigen::TensorMap of one.
  ///
  /// Throws std::invalid_argument for a shape that does not fit, std::length_error when the
  /// own tokens would exceed max_new_tokens(); in both cases the cache is unchanged.
  template <class K, class V>
  void update(const K& k, const V& v) {
    const char* const where = "PrefixKVCache::update";
    const auto [k_view, v_view, in] =
        detail::check_update<T, Layout>(where, k, v, batch_size(), num_heads(), head_dim());
    if (in.seq == 0) return;
    if (in.seq > max_new_tokens() - own_length_)  // not own_length_ + in.seq: it may overflow
      detail::throw_length_error(where, ": appending ", in.seq, " positions at position ",
                                 position(), " exceeds the capacity of ", capacity(), " (",
                                 prefix_length_, " prefix + ", max_new_tokens(),
                                 " max_new_tokens)");
    own_.write(k_view, v_view, own_length_);
    own_length_ += in.seq;
  }

  /// \brief Drops the own tokens and returns to the whole prefix: size() == prefix()->size().
  void reset() noexcept {
    prefix_length_ = prefix_->size();
    own_length_ = 0;
  }

  /// \brief Keeps the first n positions (speculative-decoding rollback); see the class notes
  /// for n below prefix_length(). Requires 0 <= n <= size(), else std::invalid_argument and
  /// nothing changes.
  void crop(Index n) {
    if (n < 0 || n > size())
      detail::throw_invalid_argument("PrefixKVCache::crop: n must be in [0, size()] = [0, ",
                                     size(), "], got ", n);
    if (n >= prefix_length_) {
      own_length_ = n - prefix_length_;
    } else {
      prefix_length_ = n;
      own_length_ = 0;
    }
  }

  /// \brief Bytes of K/V storage this object owns: its max_new_tokens() positions. The shared
  /// prefix is not counted (it is the FrozenKVCache's, see its memory_bytes()).
  std::size_t memory_bytes() const { return own_.memory_bytes(); }

  /// \brief The kernel's view: the prefix's first prefix_length() positions at 0.., then the
  /// own tokens at prefix_length().. . Valid until this cache is next modified.
  detail::KVView<T> attention_view() const {
    detail::KVView<T> view;
    view.batch_size = batch_size();
    view.num_heads = num_heads();
    view.head_dim = head_dim();
    view.position = position();
    view.add(prefix_->segment(prefix_length_, 0));
    view.add(own_.segment(0, own_length_, prefix_length_));
    return view;
  }

 private:
  static std::shared_ptr<const Prefix> checked_prefix(std::shared_ptr<const Prefix> prefix) {
    if (!prefix)
      detail::throw_invalid_argument("PrefixKVCache: prefix must not be null");
    return prefix;
  }

  static Index checked_length(Index max_new_tokens) {
    // API.md: constructor arguments that are zero or negative are errors. (A read-only view
    // of a prefix needs no PrefixKVCache: attend over the FrozenKVCache itself.)
    detail::require_positive("PrefixKVCache", "max_new_tokens", max_new_tokens);
    return max_new_tokens;
  }

  std::shared_ptr<const Prefix> prefix_;
  Index prefix_length_;               ///< prefix positions in use, <= prefix_->size()
  detail::KVStorage<T, Layout> own_;  ///< (batch, heads, max_new_tokens, head_dim)
  Index own_length_ = 0;              ///< own positions held, <= max_new_tokens()
};

}  // namespace kvcache

#endif  // KVCACHE_PREFIX_CACHE_HPP
