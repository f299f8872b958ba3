// kvcache: FrozenKVCache - an immutable snapshot of a cache's valid prefix, shared by pointer.
#ifndef KVCACHE_FROZEN_CACHE_HPP
#define KVCACHE_FROZEN_CACHE_HPP

#include <kvcache/detail/kv_view.hpp>
#include <kvcache/errors.hpp>

#include <cstddef>
#include <utility>

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

 private:
  Shape shape() const { return Layout::shape(keys_.dimensions()); }

  Tensor4<T> keys_;
  Tensor4<T> values_;
};

}  // namespace kvcache

#endif  // KVCACHE_FROZEN_CACHE_HPP
