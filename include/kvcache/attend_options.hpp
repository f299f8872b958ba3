// kvcache: the options of attend().
#ifndef KVCACHE_ATTEND_OPTIONS_HPP
#define KVCACHE_ATTEND_OPTIONS_HPP

#include <kvcache/layout.hpp>

#include <optional>

namespace kvcache {

/// \brief Options of attend(). Masking rules, for query row i of q_len, at absolute position
/// t = position() - q_len + i:
///  1. a key at absolute position p is visible only if p <= t when `causal`;
///  2. and t - window < p when a window is set (here or by a sliding-window cache), except for
///     a sliding-window cache's sink positions;
///  3. and (*key_mask)(b, p) is true when a key mask is given;
///  4. a row with no visible key is zeros.
struct AttendOptions {
  /// Multiplies q . k; default 1 / sqrt(head_dim).
  std::optional<float> scale;
  /// Rule 1.
  bool causal = true;
  /// Rule 2; 0: none. Must not be negative.
  Index window = 0;
  /// 0: none; else score = softcap * tanh(score / softcap) (Gemma 2). Must not be negative.
  float softcap = 0;
  /// (rows >= q's batch, position()): false marks padding. Not owned; may be null.
  const Eigen::Tensor<bool, 2, Eigen::RowMajor, Index>* key_mask = nullptr;
  /// Runs the kernel on this pool when given; the result is the same as without. Not owned.
  const Eigen::ThreadPoolDevice* device = nullptr;
};

}  // namespace kvcache

#endif  // KVCACHE_ATTEND_OPTIONS_HPP
