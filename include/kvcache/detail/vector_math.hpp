// kvcache: reductions whose summation order is fixed by the code, not by the data's address.
//
// Eigen's vectorised reductions (dot, sum) peel scalar iterations until the data is aligned,
// so the order of additions - and the last bits of the result - depends on where a buffer
// happens to sit. Attention results must not change between two calls, two caches holding the
// same tokens, or a thread pool and the serial path. These loops keep kLanes independent
// partial sums (the compiler turns each lane group into vector registers: 4 AVX or 8 SSE
// accumulators, enough to hide the add latency) and combine them in one fixed order.
#ifndef KVCACHE_DETAIL_VECTOR_MATH_HPP
#define KVCACHE_DETAIL_VECTOR_MATH_HPP

#include <kvcache/layout.hpp>

namespace kvcache {
namespace detail {

inline constexpr int kLanes = 32;

/// Adds the lanes pairwise: ((l0 + l16) + (l8 + l24)) ... in a fixed tree.
template <class Acc>
Acc combine_lanes(Acc (&lane)[kLanes]) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
  return lane[0];
}

/// sum_c a[c] * b[c] over c in [0, n).
template <class Acc>
Acc dot_product(const Acc* a, const Acc* b, Index n) {
  Acc lane[kLanes] = {};
  Index c = 0;
  // Invariant: lane[l] = sum of a[i] * b[i] over i < c with i % kLanes == l.
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += a[c + l] * b[c + l];
  Acc tail = 0;
  for (; c < n; ++c) tail += a[c] * b[c];
  return combine_lanes(lane) + tail;
}

/// sum_c a[c] over c in [0, n).
template <class Acc>
Acc sum(const Acc* a, Index n) {
  Acc lane[kLanes] = {};
  Index c = 0;
  // Invariant: lane[l] = sum of a[i] over i < c with i % kLanes == l.
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += a[c + l];
  Acc tail = 0;
  for (; c < n; ++c) tail += a[c];
  return combine_lanes(lane) + tail;
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_VECTOR_MATH_HPP
