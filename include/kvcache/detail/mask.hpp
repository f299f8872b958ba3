// kvcache: the masking rules of attend(), written once in terms of absolute positions.
#ifndef KVCACHE_DETAIL_MASK_HPP
#define KVCACHE_DETAIL_MASK_HPP

#include <kvcache/layout.hpp>

namespace kvcache {
namespace detail {

/// Which keys a query sees. Every cache kind and every kernel uses this one definition.
struct MaskRules {
  static constexpr Index clamp(Index x, Index low, Index high) {
    return x < low ? low : (x > high ? high : x);
  }

  bool causal = true;
  Index window = 0;           ///< effective window (the tighter of the option's and the cache's); 0: none
  Index num_sink_tokens = 0;  ///< positions below this are exempt from the window rule
  const bool* key_mask = nullptr;  ///< row-major (rows, key_mask_row_stride); null: none
  Index key_mask_row_stride = 0;

  /// Rules 1-3 of AttendOptions for batch row b, a query at absolute position t and a key at
  /// absolute position p.
  bool visible(Index batch_idx, Index t, Index p) const {
    if (causal && p > t) return false;
    if (window > 0 && p <= t - window && p >= num_sink_tokens) return false;
    if (key_mask != nullptr && !key_mask[batch_idx * key_mask_row_stride + p]) return false;
    return true;
  }

  /// True when no key at a position >= p is visible to the query at t (keys are visited in
  /// increasing position, so the kernel can stop).
  bool past_end(Index t, Index p) const { return causal && p > t; }

  /// Whether the keys [first_p, first_p + n) need the rules key by key (a key mask, or sinks
  /// inside the window's reach); otherwise visible_range() says which keys a query sees.
  bool per_key(Index first_p) const {
    return key_mask != nullptr || (window > 0 && first_p < num_sink_tokens);
  }

  /// The keys j in [begin, end) of the n keys at positions first_p + j that the query at t sees
  /// under rules 1 and 2, when !per_key(first_p): causal and window each cut one range.
  void visible_range(Index t, Index first_p, Index n, Index& begin, Index& end) const {
    end = causal ? clamp(t - first_p + 1, 0, n) : n;
    begin = window > 0 ? clamp(t - window + 1 - first_p, 0, n) : 0;
    if (begin > end) begin = end;
  }

  /// True when the window rule hides every key at positions [first_p, last_p] from the query
  /// at t, none of them a sink (then it hides them from every later query too).
  bool before_window(Index t, Index first_p, Index last_p) const {
    return window > 0 && last_p <= t - window && first_p >= num_sink_tokens;
  }
};

/// The tighter of two windows where 0 means none.
constexpr Index combine_windows(Index a, Index b) {
  if (a == 0) return b;
  if (b == 0) return a;
  return a < b ? a : b;
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_MASK_HPP
