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

/// Dot products of `Rows` query rows (rows[r], head_dim each) with one key row, in Eigen's
/// native packets: the key chunk is loaded once for all rows (a GQA group reads each key
/// once), each row keeps one packet accumulator. Unaligned loads and a fixed reduction, so the
/// result does not depend on addresses; a row's score is the same alone or in a group.
template <int Rows, class Acc>
void dot_rows(const Acc* const* rows, const Acc* key, Index head_dim, Acc* out) {
  using Packet = typename Eigen::internal::packet_traits<Acc>::type;
  constexpr Index kWidth = Eigen::internal::packet_traits<Acc>::size;
  Packet lane[Rows];
  for (int r = 0; r < Rows; ++r) lane[r] = Eigen::internal::pset1<Packet>(Acc(0));
  Index c = 0;
  // Invariant: lane[r] holds the partial sums of rows[r][i] * key[i] over i < c, by i % kWidth.
  for (; c + kWidth <= head_dim; c += kWidth) {
    const Packet k = Eigen::internal::ploadu<Packet>(key + c);
    for (int r = 0; r < Rows; ++r)
      lane[r] = Eigen::internal::pmadd(Eigen::internal::ploadu<Packet>(rows[r] + c), k, lane[r]);
  }
  for (int r = 0; r < Rows; ++r) {
    Acc tail = 0;
    for (Index i = c; i < head_dim; ++i) tail += rows[r][i] * key[i];
    out[r] = Eigen::internal::predux(lane[r]) + tail;
  }
}

/// acc[r][c] += weight[r] * value[c] for `Rows` accumulator rows, in Eigen's native packets:
/// the value chunk is loaded once for all rows. Every element gets the same operation alone or
/// in a group, so grouping does not change results.
template <int Rows, class Acc>
void axpy_rows(Acc* const* acc, const Acc* weight, const Acc* value, Index head_dim) {
  using Packet = typename Eigen::internal::packet_traits<Acc>::type;
  constexpr Index kWidth = Eigen::internal::packet_traits<Acc>::size;
  Packet w[Rows];
  for (int r = 0; r < Rows; ++r) w[r] = Eigen::internal::pset1<Packet>(weight[r]);
  Index c = 0;
  for (; c + kWidth <= head_dim; c += kWidth) {
    const Packet v = Eigen::internal::ploadu<Packet>(value + c);
    for (int r = 0; r < Rows; ++r)
      Eigen::internal::pstoreu(
          acc[r] + c, Eigen::internal::pmadd(w[r], v, Eigen::internal::ploadu<Packet>(acc[r] + c)));
  }
  for (; c < head_dim; ++c)
    for (int r = 0; r < Rows; ++r) acc[r][c] += weight[r] * value[c];
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_VECTOR_MATH_HPP
