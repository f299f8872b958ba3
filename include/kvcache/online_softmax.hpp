// kvcache: the online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
// softmax"; the FlashAttention recurrence). The only place these numerics live.
//
// A state over a set of keys is (m, l, acc): m the largest score seen, l = sum exp(s - m),
// acc = sum exp(s - m) * v. Natural exponent. The attention output is acc / l.
#ifndef KVCACHE_ONLINE_SOFTMAX_HPP
#define KVCACHE_ONLINE_SOFTMAX_HPP

#include <kvcache/layout.hpp>

#include <cmath>
#include <limits>

namespace kvcache {
namespace detail {

/// One query row's running state; acc points at head_dim accumulators owned by the caller.
/// The value scale of the second pass over a row whose value sums overflowed: acc holds at
/// most (number of keys) x max |v|, which exceeds the accumulator's range for |v| near it
/// (float: ~3.4e38) although every output, a weighted mean, is within it. Accumulating
/// value_scale * w_j instead (an exact power of two) keeps acc finite; finish() divides it out.
/// Weights below ~1e-38 relative to the largest then vanish: far below Acc's precision.
template <class Acc>
Acc overflow_value_scale() {
  return std::ldexp(Acc(1), sizeof(Acc) >= 8 ? -512 : -64);
}

template <class Acc>
struct SoftmaxState {
  Acc max = -std::numeric_limits<Acc>::infinity();
  Acc sum = 0;
  Acc* acc = nullptr;

  /// Zeroes the state over head_dim accumulators.
  void clear(Index head_dim) {
    max = -std::numeric_limits<Acc>::infinity();
    sum = 0;
    for (Index c = 0; c < head_dim; ++c) acc[c] = 0;
  }

  /// Raises the running max to new_max (>= max), rescaling sum and acc so they stay relative
  /// to it. From an empty state (max = -inf) the factor is exp(-inf) = 0, and sum, acc are 0.
  void rescale(Acc new_max, Index head_dim) {
    if (new_max == max) return;
    const Acc factor = std::exp(max - new_max);
    sum *= factor;
    for (Index c = 0; c < head_dim; ++c) acc[c] *= factor;
    max = new_max;
  }

  /// Merges a state over a disjoint set of keys into this one (split-K, prefix + suffix,
  /// sinks + ring). Empty states (max = -inf) are skipped, so no (-inf) - (-inf) = NaN.
  void merge(const SoftmaxState& other, Index head_dim) {
    if (other.sum == 0) return;
    const Acc new_max = max > other.max ? max : other.max;
    rescale(new_max, head_dim);
    const Acc factor = std::exp(other.max - new_max);
    sum += other.sum * factor;
    for (Index c = 0; c < head_dim; ++c) acc[c] += other.acc[c] * factor;
  }

  /// Writes acc / sum, or zeros when no key was visible (rule 4: never NaN). value_scale: the
  /// power of two the value sums were accumulated with (acc = value_scale * sum_j w_j v_j,
  /// see overflow_value_scale), divided out after the normalisation.
  template <class T>
  void finish(T* out, Index head_dim, Acc value_scale = Acc(1)) const {
    const Acc inverse = sum > 0 ? Acc(1) / sum : Acc(0);
    if (value_scale == Acc(1)) {
      for (Index c = 0; c < head_dim; ++c) out[c] = static_cast<T>(acc[c] * inverse);
      return;
    }
    const Acc unscale = Acc(1) / value_scale;
    for (Index c = 0; c < head_dim; ++c) out[c] = static_cast<T>((acc[c] * inverse) * unscale);
  }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_ONLINE_SOFTMAX_HPP
