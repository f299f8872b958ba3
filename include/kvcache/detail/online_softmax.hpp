// kvcache: the online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for
// softmax"; the FlashAttention recurrence). The only place these numerics live.
//
// A state over a set of keys is (m, l, acc): m the largest score seen, l = sum exp(s - m),
// acc = sum exp(s - m) * v. Natural exponent. The attention output is acc / l.
#ifndef KVCACHE_DETAIL_ONLINE_SOFTMAX_HPP
#define KVCACHE_DETAIL_ONLINE_SOFTMAX_HPP

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

/// A softmax state saved for a later merge (split-K: one per split of a sequence), in a flat
/// run of elements(head_dim) numbers of Acc: the max, the sum, the value scale its
/// accumulators were summed with (1 or overflow_value_scale()), then head_dim accumulators.
template <class Acc>
class PartialState {
 public:
  static constexpr Index elements(Index head_dim) { return kAccumulators + head_dim; }

  /// Writes `state` (value sums at value_scale) to `to`, elements(head_dim) numbers.
  static void save(const SoftmaxState<Acc>& state, Acc value_scale, Index head_dim, Acc* to) {
    to[kMax] = state.max;
    to[kSum] = state.sum;
    to[kValueScale] = value_scale;
    for (Index c = 0; c < head_dim; ++c) to[kAccumulators + c] = state.acc[c];
  }

  explicit PartialState(const Acc* saved) : saved_(saved) {}
  Acc max() const { return saved_[kMax]; }
  Acc sum() const { return saved_[kSum]; }
  Acc value_scale() const { return saved_[kValueScale]; }
  const Acc* acc() const { return saved_ + kAccumulators; }

  /// Merges `count` saved states over disjoint key ranges, in order, the first at `parts`, the
  /// others `part_stride` numbers apart, into `into` (whose acc points at head_dim
  /// accumulators), with every value sum brought to target_scale (an exact power of two, at
  /// most each part's value_scale()). `rescaled`: head_dim scratch.
  static void merge(const Acc* parts, Index part_stride, Index count, Index head_dim,
                    Acc target_scale, SoftmaxState<Acc>& into, Acc* rescaled) {
    const PartialState first(parts);
    into.max = first.max();
    into.sum = first.sum();
    const Acc first_factor = target_scale / first.value_scale();
    for (Index c = 0; c < head_dim; ++c) into.acc[c] = first.acc()[c] * first_factor;
    for (Index i = 1; i < count; ++i) {
      const PartialState other(parts + i * part_stride);
      const Acc factor = target_scale / other.value_scale();
      for (Index c = 0; c < head_dim; ++c) rescaled[c] = other.acc()[c] * factor;
      into.merge(SoftmaxState<Acc>{other.max(), other.sum(), rescaled}, head_dim);
    }
  }

 private:
  static constexpr Index kMax = 0, kSum = 1, kValueScale = 2, kAccumulators = 3;
  const Acc* saved_;
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_ONLINE_SOFTMAX_HPP
