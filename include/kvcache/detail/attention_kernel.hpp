// kvcache: the attention kernel. It reads a KVView (runs of keys/values at absolute positions)
// in place, one pass, with an online softmax: no score matrix over the sequence, no copy of
// the cache. Swappable: attend() only calls run_attention().
#ifndef KVCACHE_DETAIL_ATTENTION_KERNEL_HPP
#define KVCACHE_DETAIL_ATTENTION_KERNEL_HPP

#include <kvcache/attend_workspace.hpp>
#include <kvcache/detail/kv_view.hpp>
#include <kvcache/detail/vector_math.hpp>
#include <kvcache/mask.hpp>
#include <kvcache/online_softmax.hpp>
#include <kvcache/quantization.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

namespace kvcache {
namespace detail {

/// The query tensor and the output tensor (same shape and strides).
template <class T>
struct QueryArgs {
  const T* data;
  T* out;
  Shape shape;  ///< (batch, num_q_heads, q_len, head_dim)
  Strides strides;
  Index first_position;  ///< absolute position of query row 0

  /// Offset of the query row (batch row, head, position i) in data and out.
  Index row_offset(Index batch_idx, Index head, Index i) const {
    return batch_idx * strides.batch + head * strides.head + i * strides.seq;
  }
};

/// Scalar parameters of the score: s = scale * (q . k), then softcap * tanh(s / softcap).
template <class Acc>
struct ScoreParams {
  Acc scale;
  Acc softcap;  ///< 0: none
  /// Value sums accumulate value_scale * w_j (1, or overflow_value_scale() on the second pass
  /// of a unit whose sums overflowed); the softmax denominator does not.
  Acc value_scale = Acc(1);
};

/// Keys per block: the scores of one block for one query row live in a small array, and a
/// block of K and V (2 x 64 x head_dim elements) stays in L1/L2 while every query row of the
/// GQA group reads it.
inline constexpr Index kKeyBlock = 64;

/// Query rows (GQA heads x positions) one work item handles at most.
inline constexpr Index kRowsPerItem = 64;

/// The quantized blocks of a QuantSegment (KIVI, quantization.hpp) for the rows of one work
/// item: batch row batch_idx, KV head kv_head_idx. Codes are read in place and dequantized in
/// registers, one block of group_size tokens at a time; nothing of the cache is copied. Same
/// SoftmaxState, MaskRules and ScoreParams as the T path of attend_item, so a quantized block
/// and a T block combine exactly like two T blocks.
///
/// Scores (queries already carry score.scale): with k[t][c] = kzero[c] + kscale[c] * code[t][c]
///   q . k[t] = sum_c (q[c] * kscale[c]) * code[t][c] + sum_c q[c] * kzero[c],
/// so the key scales fold into the query once per block and row, the zeros into one constant.
/// Values: with v[t][c] = vzero[t][g] + vscale[t][g] * code[t][c] (g = c / group_size),
///   sum_t w_t v[t][c] = sum_t (w_t * vscale[t][g]) * code[t][c] + sum_t w_t * vzero[t][g],
/// so the value scales fold into the probabilities and the zeros into one sum per group.
template <int Bits, class Acc, class RowPosition>
void attend_quantized_blocks(const QuantSegment& seg, const MaskRules& mask,
                             const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx,
                             Index head_dim, Index num_rows, const Acc* queries,
                             RowPosition row_position, SoftmaxState<Acc>* states) {
  constexpr Index per_byte = QuantBlockFormat<Bits>::codes_per_byte;
  constexpr unsigned low_mask = QuantBlockFormat<Bits>::levels;
  const QuantBlockFormat<Bits> format{seg.group_size, head_dim};
  const Index group = seg.group_size;
  const Index groups = format.groups_per_token();
  const Index row_bytes = format.code_row_bytes();
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();

  // Per block: key scales and zeros decoded once for all rows (2 * head_dim); per row: the
  // folded query (head_dim), the block's scores (group) and the value zero sums (groups).
  std::vector<Acc> scratch(static_cast<std::size_t>(4 * head_dim + group + groups));
  Acc* const key_scales = scratch.data();
  Acc* const key_zeros = key_scales + head_dim;
  Acc* const folded = key_zeros + head_dim;
  Acc* const scores = folded + head_dim;
  Acc* const zero_sums = scores + group;

  const std::uint8_t* const head_blocks =
      seg.blocks + batch_idx * seg.batch_stride + kv_head_idx * seg.head_stride;
  for (Index block_idx = 0; block_idx < seg.num_blocks; ++block_idx) {
    const std::uint8_t* const block = head_blocks + block_idx * seg.bytes_per_block;
    const Index first_p = seg.first_position + block_idx * group;
    const std::uint8_t* const key_codes = block + format.key_codes_offset();
    const std::uint8_t* const value_codes = block + format.value_codes_offset();
    const std::uint8_t* const value_zeros = block + format.value_zeros_offset();
    const std::uint8_t* const value_scales = block + format.value_scales_offset();
    for (Index c = 0; c < head_dim; ++c) {
      key_scales[c] = static_cast<Acc>(load_bfloat16(block + format.key_scales_offset() + 2 * c));
      key_zeros[c] = static_cast<Acc>(load_bfloat16(block + format.key_zeros_offset() + 2 * c));
    }

    for (Index row = 0; row < num_rows; ++row) {
      const Index t = row_position(row);
      if (mask.past_end(t, first_p)) continue;
      const Acc* qrow = queries + row * head_dim;
      // Fold the key scales into the query and the zeros into one constant for this block.
      Acc zero_term = 0;
      for (Index c = 0; c < head_dim; ++c) {
        folded[c] = qrow[c] * key_scales[c];
        zero_term += qrow[c] * key_zeros[c];
      }
      // Scores of the visible keys of this block; -inf marks a masked key.
      Acc block_max = minus_infinity;
      for (Index j = 0; j < group; ++j) {
        if (!mask.visible(batch_idx, t, first_p + j)) {
          scores[j] = minus_infinity;
          continue;
        }
        const std::uint8_t* codes = key_codes + j * row_bytes;
        Acc dot = 0;
        // Invariant: dot = sum of folded[c] * code[j][c] over the channels of bytes [0, i).
        for (Index i = 0; i < row_bytes; ++i) {
          const unsigned byte = codes[i];
          for (Index k = 0; k < per_byte; ++k)  // int4: channel 2i low nibble, 2i + 1 high
            dot += folded[i * per_byte + k] * static_cast<Acc>((byte >> (Bits * k)) & low_mask);
        }
        dot += zero_term;
        if (score.softcap > 0) dot = score.softcap * std::tanh(dot / score.softcap);
        scores[j] = dot;
        block_max = std::max(block_max, dot);
      }
      if (block_max == minus_infinity) continue;  // nothing visible (or all scores -inf)

      SoftmaxState<Acc>& state = states[row];
      state.rescale(std::max(state.max, block_max), head_dim);
      for (Index g = 0; g < groups; ++g) zero_sums[g] = 0;
      // Invariant: state.sum, state.acc are relative to state.max >= every score so far;
      // acc lacks the zero-point part sum_j w_j * vzero[j][g], which zero_sums[g] holds.
      for (Index j = 0; j < group; ++j) {
        if (scores[j] == minus_infinity) continue;
        const Acc probability = std::exp(scores[j] - state.max);
        state.sum += probability;
        const Acc weight = probability * score.value_scale;
        const std::uint8_t* codes = value_codes + j * row_bytes;
        for (Index g = 0; g < groups; ++g) {
          const Index at = 2 * format.value_group_index(j, g);
          const Acc scaled = weight * static_cast<Acc>(load_bfloat16(value_scales + at));
          zero_sums[g] += weight * static_cast<Acc>(load_bfloat16(value_zeros + at));
          Acc* acc = state.acc + g * group;
          const std::uint8_t* group_codes = codes + g * group / per_byte;
          // Channels g * group + [0, group): whole bytes, as group is a multiple of per_byte.
          for (Index i = 0; i < group / per_byte; ++i) {
            const unsigned byte = group_codes[i];
            for (Index k = 0; k < per_byte; ++k)
              acc[i * per_byte + k] += scaled * static_cast<Acc>((byte >> (Bits * k)) & low_mask);
          }
        }
      }
      for (Index c = 0; c < head_dim; ++c) state.acc[c] += zero_sums[c / group];
    }
  }
}

/// Which implementation of the T blocks attend_item uses. kFast is what attend() runs;
/// kReference is its scalar twin (one key and one query row at a time, straight from the
/// definitions), kept for the tests to compare with.
enum class KernelVariant { kFast, kReference };

/// The rows of one work item and where their state lives.
template <class Acc, class RowPosition>
struct ItemRows {
  Index num_rows;
  Index head_dim;
  const Acc* queries;          ///< (num_rows, head_dim) row-major, already times score.scale
  Acc* accumulators;           ///< (num_rows, head_dim) row-major; states[r].acc points into it
  SoftmaxState<Acc>* states;   ///< (num_rows)
  RowPosition row_position;    ///< row -> absolute position t of its query
  Index batch_idx;
  Index kv_head_idx;
};

/// One block of `block_len` keys/values of a T segment, at absolute positions first_p, ... :
/// the scalar twin. Per row, per key: the mask rule, a dot product, the online update.
template <class T, class Acc, class RowPosition>
void attend_block_reference(const ItemRows<Acc, RowPosition>& rows, const MaskRules& mask,
                            const ScoreParams<Acc>& score, const T* keys, const T* values,
                            Index seq_stride, Index block_len, Index first_p, Acc* scores) {
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  const Index head_dim = rows.head_dim;
  for (Index row = 0; row < rows.num_rows; ++row) {
    const Index t = rows.row_position(row);
    if (mask.past_end(t, first_p)) continue;
    const Acc* qrow = rows.queries + row * head_dim;
    // Scores of the visible keys of this block; -inf marks a masked key.
    Acc block_max = minus_infinity;
    for (Index j = 0; j < block_len; ++j) {
      if (!mask.visible(rows.batch_idx, t, first_p + j)) {
        scores[j] = minus_infinity;
        continue;
      }
      const T* krow = keys + j * seq_stride;
      Acc dot = 0;
      for (Index c = 0; c < head_dim; ++c) dot += qrow[c] * static_cast<Acc>(krow[c]);
      if (score.softcap > 0) dot = score.softcap * std::tanh(dot / score.softcap);
      scores[j] = dot;
      block_max = std::max(block_max, dot);
    }
    if (block_max == minus_infinity) continue;  // nothing visible (or all scores -inf)

    SoftmaxState<Acc>& state = rows.states[row];
    state.rescale(std::max(state.max, block_max), head_dim);
    // Invariant: state.sum, state.acc are relative to state.max >= every score so far.
    for (Index j = 0; j < block_len; ++j) {
      if (scores[j] == minus_infinity) continue;
      const Acc probability = std::exp(scores[j] - state.max);
      state.sum += probability;
      const Acc weight = probability * score.value_scale;
      const T* vrow = values + j * seq_stride;
      for (Index c = 0; c < head_dim; ++c) state.acc[c] += weight * static_cast<Acc>(vrow[c]);
    }
  }
}

/// Rows at least this many use matrix products for a block (prefill: compute-bound, a
/// rows x keys tile); fewer (decode: memory-bound) use one dot product / axpy per key and row,
/// which reads each key once into L1 and needs no packing.
inline constexpr Index kMatrixProductRows = 16;

/// Sets the scores of keys a query at t must not see to -inf. Causal and window rules cut a
/// contiguous range of the block; sinks and key masks go key by key.
template <class ScoreRow>
void mask_scores(ScoreRow&& s, const MaskRules& mask, Index batch_idx, Index t, Index first_p) {
  using Acc = typename std::decay_t<ScoreRow>::Scalar;
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  const Index n = s.size();
  const bool sinks_inside = mask.window > 0 && first_p < mask.num_sink_tokens;
  if (mask.key_mask != nullptr || sinks_inside) {
    for (Index j = 0; j < n; ++j)
      if (!mask.visible(batch_idx, t, first_p + j)) s(j) = minus_infinity;
    return;
  }
  // Visible: [begin, end) of the block.
  const Index end = mask.causal ? std::clamp<Index>(t - first_p + 1, 0, n) : n;
  const Index begin = mask.window > 0 ? std::clamp<Index>(t - mask.window + 1 - first_p, 0, n) : 0;
  for (Index j = 0; j < std::min(begin, n); ++j) s(j) = minus_infinity;
  for (Index j = std::max(begin, end); j < n; ++j) s(j) = minus_infinity;
}

/// The keys of the block after the current one in the same segment (length 0: none), for
/// prefetching.
template <class T>
struct NextBlock {
  const T* keys = nullptr;
  Index length = 0;
};

/// Bytes of a cache line (x86-64 and most ARM cores): the unit of prefetching.
inline constexpr Index kCacheLine = 64;

/// Asks the cache hierarchy for the cache lines of one row of head_dim elements.
template <class T>
void prefetch_row(const T* row, Index head_dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (Index b = 0; b < head_dim * Index(sizeof(T)); b += kCacheLine)
    Eigen::internal::prefetch(bytes + b);
}

/// The online-softmax step of one query row over one block of n keys at positions first_p, ...
/// whose scores (softcap applied) are at `scores`: masks them, raises the row's running max,
/// and turns them into the weights of the value sums, exp(s - max) * value_scale, exactly 0
/// for a masked key; the row's sum gets the unscaled weights. A row that sees no key of the
/// block gets all-zero weights and an unchanged state.
template <class Acc, class RowPosition>
void softmax_step(const ItemRows<Acc, RowPosition>& rows, Index row, const MaskRules& mask,
                  const ScoreParams<Acc>& score, Acc* scores, Index n, Index first_p) {
  Eigen::Map<Eigen::Matrix<Acc, 1, Eigen::Dynamic>> s_row(scores, n);
  mask_scores(s_row, mask, rows.batch_idx, rows.row_position(row), first_p);
  const Acc block_max = s_row.maxCoeff();
  if (block_max == -std::numeric_limits<Acc>::infinity()) {  // nothing visible
    s_row.setZero();
    return;
  }
  SoftmaxState<Acc>& state = rows.states[row];
  state.rescale(std::max(state.max, block_max), rows.head_dim);
  // Invariant: state.sum, state.acc are relative to state.max >= every score so far.
  exp_weights(scores, n, state.max);
  state.sum += sum(scores, n);
  if (score.value_scale != Acc(1))
    for (Index j = 0; j < n; ++j) scores[j] *= score.value_scale;
}

/// Scores of a block for fewer than kMatrixProductRows rows (decode): s(row, j) = q_row . k_j,
/// four rows at a time so each key chunk is loaded (and widened) once per four rows. Rows left
/// over take the one-row version of the same operations, so a score does not depend on the
/// group it was computed in.
template <class T, class Acc, class RowPosition, class ScoreTile>
void block_scores(const ItemRows<Acc, RowPosition>& rows, const T* keys, const T* values,
                  Index seq_stride, Index n, const NextBlock<T>& next, ScoreTile& s) {
  const Index head_dim = rows.head_dim;
  for (Index j = 0; j < n; ++j) {  // key j is read once, for every row
    const T* key = keys + j * seq_stride;
    // While key j is in use, fetch value j of this block and key j of the next one: the
    // memory streams stay busy during the arithmetic.
    prefetch_row(values + j * seq_stride, head_dim);
    if (j < next.length) prefetch_row(next.keys + j * seq_stride, head_dim);
    Index row = 0;
    for (; row + 4 <= rows.num_rows; row += 4) {
      const Acc* group[4] = {rows.queries + row * head_dim, rows.queries + (row + 1) * head_dim,
                             rows.queries + (row + 2) * head_dim,
                             rows.queries + (row + 3) * head_dim};
      Acc scores[4];
      dot_rows<4, Acc, Stored<T>>(group, key, head_dim, scores);
      for (int r = 0; r < 4; ++r) s(row + r, j) = scores[r];
    }
    for (; row < rows.num_rows; ++row) {
      const Acc* single[1] = {rows.queries + row * head_dim};
      dot_rows<1, Acc, Stored<T>>(single, key, head_dim, &s(row, j));
    }
  }
}

/// Whether every element of n value rows is finite (a masked key's weight is 0, and 0 * inf
/// is NaN: such a block must skip masked keys one by one).
template <class Acc, class T>
bool all_finite(const T* values, Index seq_stride, Index n, Index head_dim) {
  for (Index j = 0; j < n; ++j)
    for (Index c = 0; c < head_dim; ++c)
      if (!(Eigen::numext::isfinite)(static_cast<Acc>(values[j * seq_stride + c]))) return false;
  return true;
}

/// acc += P V for the rows of a work item, P the block's probabilities (score tile, zero for
/// masked keys). Groups of 4 rows keep their accumulators in registers (accumulate_rows);
/// a group with a zero weight whose block holds a non-finite value instead skips its zero
/// weights key by key, so a masked inf or NaN value cannot reach a row.
template <class T, class Acc, class RowPosition>
void block_values(const ItemRows<Acc, RowPosition>& rows, const Acc* probabilities,
                  const T* values, Index seq_stride, Index n) {
  const Index head_dim = rows.head_dim;
  int finite = -1;  // unknown until a group has a zero weight
  auto group = [&](auto rows_tag, Index row) {
    constexpr int kRows = decltype(rows_tag)::value;
    const Acc* weights = probabilities + row * kKeyBlock;
    Acc* acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = rows.accumulators + (row + r) * head_dim;
    bool has_zero = false;
    for (int r = 0; r < kRows; ++r)
      for (Index j = 0; j < n; ++j) has_zero |= weights[r * kKeyBlock + j] == Acc(0);
    if (has_zero && finite < 0) finite = all_finite<Acc>(values, seq_stride, n, head_dim);
    if (!has_zero || finite == 1) {
      accumulate_rows<kRows, Acc, Stored<T>>(acc, weights, kKeyBlock, values, seq_stride, n,
                                             head_dim);
      return;
    }
    for (int r = 0; r < kRows; ++r)
      for (Index j = 0; j < n; ++j) {
        const Acc weight = weights[r * kKeyBlock + j];
        if (weight != Acc(0)) axpy_rows<1>(acc + r, &weight, values + j * seq_stride, head_dim);
      }
  };
  Index row = 0;
  for (; row + 4 <= rows.num_rows; row += 4) group(std::integral_constant<int, 4>{}, row);
  for (; row < rows.num_rows; ++row) group(std::integral_constant<int, 1>{}, row);
}

/// One block of `block_len` keys/values of a T segment for every row of a work item, with
/// vectorised products: scores S = Q K^T (rows x block), masking, softcap, the online softmax
/// update per row, then acc += P V. Decode-sized row counts read keys and values in place,
/// widening half/bfloat16 in registers; prefill-sized ones use Eigen's matrix products, on a
/// block-sized widened copy (L1/L2) for half/bfloat16, never a copy of the cache.
template <class T, class Acc, class RowPosition>
void attend_block_fast(const ItemRows<Acc, RowPosition>& rows, const MaskRules& mask,
                       const ScoreParams<Acc>& score, const T* keys, const T* values,
                       Index seq_stride, Index block_len, Index first_p,
                       const NextBlock<T>& next, Acc* score_tile, Acc* widened) {
  using RowMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using StridedMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  const Index head_dim = rows.head_dim, n = block_len;
  Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>> s(
      score_tile, rows.num_rows, n, Eigen::OuterStride<>(kKeyBlock));
  const bool matrix_products = rows.num_rows >= kMatrixProductRows;

  // Matrix products read Acc rows: the block itself, or its widened copy.
  const Acc* k_data = nullptr;
  const Acc* v_data = nullptr;
  Index stride = seq_stride;
  if (matrix_products) {
    if constexpr (std::is_same_v<T, Acc>) {
      k_data = keys;
      v_data = values;
    } else {
      widen_rows(keys, seq_stride, n, head_dim, widened);
      widen_rows(values, seq_stride, n, head_dim, widened + kKeyBlock * head_dim);
      k_data = widened;
      v_data = widened + kKeyBlock * head_dim;
      stride = head_dim;
    }
    const StridedMap k(k_data, n, head_dim, Eigen::OuterStride<>(stride));
    const Eigen::Map<const RowMatrix> q(rows.queries, rows.num_rows, head_dim);
    s.noalias() = q * k.transpose();
  } else {
    block_scores(rows, keys, values, seq_stride, n, next, s);
  }
  if (score.softcap > 0)
    s = score.softcap * (s.array() * (Acc(1) / score.softcap)).tanh().matrix();

  for (Index row = 0; row < rows.num_rows; ++row)
    softmax_step(rows, row, mask, score, score_tile + row * kKeyBlock, n, first_p);

  if (!matrix_products) {
    block_values(rows, score_tile, values, seq_stride, n);
    return;
  }
  const StridedMap v(v_data, n, head_dim, Eigen::OuterStride<>(stride));
  // The product adds 0 * v for masked keys: NaN where a masked value is inf or NaN, so a
  // block holding such values takes the path that skips zero weights.
  if (v.allFinite()) {
    Eigen::Map<RowMatrix> acc(rows.accumulators, rows.num_rows, head_dim);
    acc.noalias() += s * v;
  } else {
    block_values(rows, score_tile, v_data, stride, n);
  }
}

/// to[i] = the bfloat16 stored little-endian at from + 2 i, for i in [0, n): exact, as a
/// bfloat16 is the upper half of a float. Eight at a time with AVX2.
template <class Acc>
void widen_bfloat16(const std::uint8_t* from, Index n, Acc* to) {
  Index i = 0;
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Acc, float>) {
    for (; i + 8 <= n; i += 8) {
      const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from + 2 * i));
      _mm256_storeu_ps(to + i, _mm256_castsi256_ps(
                                   _mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16)));
    }
  }
#endif
  for (; i < n; ++i) to[i] = static_cast<Acc>(load_bfloat16(from + 2 * i));
}

/// Scratch elements attend_quantized_blocks_fast needs for num_rows rows.
inline Index quantized_scratch_size(Index num_rows, Index head_dim, Index group) {
  const Index groups = head_dim / group;
  return 4 * head_dim + 2 * group * groups + num_rows * (head_dim + 1 + 2 * group + groups);
}

/// The vectorised twin of attend_quantized_blocks (same folding of scales and zeros, same
/// results up to rounding): per block, the scores of every row come from dot_rows over the key
/// codes (each code row converted to floats in registers once per four rows), the value sum
/// from accumulate_rows over the value codes, one value group (its own scale per token) at a
/// time. A masked key's weight is 0 and codes are finite, so no key needs skipping.
template <int Bits, class Acc, class RowPosition>
void attend_quantized_blocks_fast(const QuantSegment& seg, const MaskRules& mask,
                                  const ScoreParams<Acc>& score,
                                  const ItemRows<Acc, RowPosition>& rows, Acc* scratch) {
  using Source = Codes<Bits>;
  const Index head_dim = rows.head_dim, num_rows = rows.num_rows;
  const QuantBlockFormat<Bits> format{seg.group_size, head_dim};
  const Index group = seg.group_size;
  const Index groups = format.groups_per_token();
  const Index row_bytes = format.code_row_bytes();

  Acc* const key_scales = scratch;                         // (head_dim)
  Acc* const key_zeros = key_scales + head_dim;            // (head_dim)
  Acc* const value_scales = key_zeros + head_dim;          // (groups, group)
  Acc* const value_zeros = value_scales + group * groups;  // (groups, group)
  Acc* const staging = value_zeros + group * groups;       // (2, head_dim): as stored
  Acc* const folded = staging + 2 * head_dim;              // (num_rows, head_dim)
  Acc* const zero_terms = folded + num_rows * head_dim;    // (num_rows)
  Acc* const weights = zero_terms + num_rows;              // (num_rows, group)
  Acc* const scaled = weights + num_rows * group;          // (num_rows, group)
  Acc* const zero_sums = scaled + num_rows * group;        // (num_rows, groups)

  const std::uint8_t* const head_blocks = seg.blocks + rows.batch_idx * seg.batch_stride +
                                         rows.kv_head_idx * seg.head_stride;
  for (Index block_idx = 0; block_idx < seg.num_blocks; ++block_idx) {
    const std::uint8_t* const block = head_blocks + block_idx * seg.bytes_per_block;
    const Index first_p = seg.first_position + block_idx * group;
    const std::uint8_t* const key_codes = block + format.key_codes_offset();
    const std::uint8_t* const value_codes = block + format.value_codes_offset();
    // Each metadata run is head_dim bfloat16 values. Value ones are stored token-major
    // (j * groups + g) and used group-major (g * group + j): widen, then transpose.
    widen_bfloat16(block + format.key_scales_offset(), head_dim, key_scales);
    widen_bfloat16(block + format.key_zeros_offset(), head_dim, key_zeros);
    widen_bfloat16(block + format.value_scales_offset(), group * groups, staging);
    widen_bfloat16(block + format.value_zeros_offset(), group * groups, staging + head_dim);
    for (Index j = 0; j < group; ++j)
      for (Index g = 0; g < groups; ++g) {
        value_scales[g * group + j] = staging[j * groups + g];
        value_zeros[g * group + j] = staging[head_dim + j * groups + g];
      }

    // Fold the key scales into each query row and the zeros into one constant per row.
    for (Index row = 0; row < num_rows; ++row) {
      const Acc* q = rows.queries + row * head_dim;
      for (Index c = 0; c < head_dim; ++c) folded[row * head_dim + c] = q[c] * key_scales[c];
      const Acc* single[1] = {q};
      dot_rows<1, Acc, Stored<Acc>>(single, key_zeros, head_dim, zero_terms + row);
    }
    // Scores: each key code row is read once for every four rows. Meanwhile the next block
    // is fetched, a share per key: its parts are not read in address order, and it spans
    // pages, which stops the hardware prefetcher.
    const bool has_next = block_idx + 1 < seg.num_blocks;
    const Index lines = (seg.bytes_per_block + kCacheLine - 1) / kCacheLine;
    const Index lines_per_key = (lines + group - 1) / group;
    for (Index j = 0; j < group; ++j) {
      const std::uint8_t* codes = key_codes + j * row_bytes;
      if (has_next)
        for (Index line = j * lines_per_key; line < std::min(lines, (j + 1) * lines_per_key);
             ++line)
          Eigen::internal::prefetch(block + seg.bytes_per_block + line * kCacheLine);
      Index row = 0;
      for (; row + 4 <= num_rows; row += 4) {
        const Acc* four[4] = {folded + row * head_dim, folded + (row + 1) * head_dim,
                              folded + (row + 2) * head_dim, folded + (row + 3) * head_dim};
        Acc out[4];
        dot_rows<4, Acc, Source>(four, codes, head_dim, out);
        for (int r = 0; r < 4; ++r) weights[(row + r) * group + j] = out[r] + zero_terms[row + r];
      }
      for (; row < num_rows; ++row) {
        const Acc* single[1] = {folded + row * head_dim};
        dot_rows<1, Acc, Source>(single, codes, head_dim, weights + row * group + j);
        weights[row * group + j] += zero_terms[row];
      }
    }
    // Online softmax update per row; weights become exp(s - max), 0 where masked.
    // (acc gets the zero-point part sum_j w_j * vzero[j][g] through zero_sums below.)
    for (Index row = 0; row < num_rows; ++row) {
      if (score.softcap > 0) {
        Eigen::Map<Eigen::Array<Acc, 1, Eigen::Dynamic>> s_row(weights + row * group, group);
        s_row = score.softcap * (s_row * (Acc(1) / score.softcap)).tanh();
      }
      softmax_step(rows, row, mask, score, weights + row * group, group, first_p);
    }
    // Values, one group of channels at a time: acc[c] += sum_j (w_j * vscale[j][g]) * code[j][c]
    // + sum_j w_j * vzero[j][g].
    for (Index g = 0; g < groups; ++g) {
      const Acc* zeros = value_zeros + g * group;
      Index row = 0;
      for (; row + 4 <= num_rows; row += 4) {
        const Acc* four[4] = {weights + row * group, weights + (row + 1) * group,
                              weights + (row + 2) * group, weights + (row + 3) * group};
        Acc out[4];
        dot_rows<4, Acc, Stored<Acc>>(four, zeros, group, out);
        for (int r = 0; r < 4; ++r) zero_sums[(row + r) * groups + g] = out[r];
      }
      for (; row < num_rows; ++row) {
        const Acc* single[1] = {weights + row * group};
        dot_rows<1, Acc, Stored<Acc>>(single, zeros, group, zero_sums + row * groups + g);
      }
    }
    for (Index g = 0; g < groups; ++g) {
      const Acc* scales = value_scales + g * group;
      for (Index row = 0; row < num_rows; ++row)
        for (Index j = 0; j < group; ++j)
          scaled[row * group + j] = weights[row * group + j] * scales[j];
      const std::uint8_t* group_codes = value_codes + g * group * Bits / 8;
      auto accumulate = [&](auto rows_tag, Index row) {
        constexpr int kRows = decltype(rows_tag)::value;
        Acc* acc[kRows];
        for (int r = 0; r < kRows; ++r) acc[r] = rows.accumulators + (row + r) * head_dim + g * group;
        accumulate_rows<kRows, Acc, Source>(acc, scaled + row * group, group, group_codes,
                                            row_bytes, group, group);
      };
      Index row = 0;
      for (; row + 4 <= num_rows; row += 4) accumulate(std::integral_constant<int, 4>{}, row);
      for (; row < num_rows; ++row) accumulate(std::integral_constant<int, 1>{}, row);
    }
    for (Index row = 0; row < num_rows; ++row)
      for (Index g = 0; g < groups; ++g) {
        Acc* acc = rows.accumulators + row * head_dim + g * group;
        const Acc zero_sum = zero_sums[row * groups + g];
        for (Index c = 0; c < group; ++c) acc[c] += zero_sum;
      }
  }
}

/// Where one work unit's scratch lives: num_rows softmax states and the Acc scratch.
template <class Acc>
struct UnitScratch {
  SoftmaxState<Acc>* states;
  Acc* elements;
};

/// Acc elements of scratch one work unit of num_rows rows needs: score tile, widened K/V
/// block, queries, accumulators, and the quantized blocks' scratch when there are any.
template <class Acc>
Index unit_scratch_elements(Index num_rows, Index head_dim, const QuantSegment& quantized) {
  Index n = num_rows * kKeyBlock + 2 * kKeyBlock * head_dim + 2 * num_rows * head_dim;
  if (quantized.num_blocks > 0)
    n += quantized_scratch_size(num_rows, head_dim, quantized.group_size);
  return n;
}

/// One work unit: batch row b, KV head kv_head, query positions [q_begin, q_end), and the
/// `rep` query heads that read this KV head, over the held positions of `kv` (all of them, or
/// one split of them). Reads each key/value block once for all rows. Leaves the rows' softmax
/// states in scratch.states (their acc in scratch.elements).
template <KernelVariant Variant, class T, class Acc>
void attend_unit(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                 const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx, Index q_begin,
                 Index q_end, const UnitScratch<Acc>& scratch) {
  const Index head_dim = q.shape.head_dim;
  const Index rep = q.shape.heads / kv.num_heads;
  const Index rows_per_head = q_end - q_begin;
  const Index num_rows = rep * rows_per_head;

  // Row r = (local head g, query position i): g = r / rows_per_head, i = q_begin + r % ...
  // The scratch is 64-byte aligned, so Eigen's elementwise loops (tanh) over the tile split
  // into scalar and vector parts the same way on every call: results do not depend on memory.
  Acc* const score_tile = scratch.elements;                 // (num_rows, kKeyBlock)
  Acc* const widened = score_tile + num_rows * kKeyBlock;   // (2, kKeyBlock, head_dim)
  Acc* const queries = widened + 2 * kKeyBlock * head_dim;  // (num_rows, head_dim), pre-scaled
  Acc* const accumulators = queries + num_rows * head_dim;  // (num_rows, head_dim)
  Acc* const quantized_scratch = accumulators + num_rows * head_dim;
  SoftmaxState<Acc>* const states = scratch.states;

  auto row_position = [&](Index row) { return q.first_position + q_begin + row % rows_per_head; };
  for (Index row = 0; row < num_rows; ++row) {
    const T* src = q.data + q.row_offset(batch_idx, kv_head_idx * rep + row / rows_per_head,
                                         q_begin + row % rows_per_head);
    for (Index c = 0; c < head_dim; ++c)
      queries[row * head_dim + c] = static_cast<Acc>(src[c]) * score.scale;
    states[row].acc = accumulators + row * head_dim;
    states[row].clear(head_dim);
  }

  const ItemRows<Acc, decltype(row_position)> rows{
      num_rows,     head_dim,  queries, accumulators, states, row_position,
      batch_idx, kv_head_idx};

  // Quantized blocks first: their positions precede every T segment's.
  if (kv.quantized.num_blocks > 0) {
    const QuantSegment& seg = kv.quantized;
    if constexpr (Variant == KernelVariant::kReference) {
      if (seg.bits == 8)
        attend_quantized_blocks<8>(seg, mask, score, batch_idx, kv_head_idx, head_dim, num_rows,
                                   queries, row_position, states);
      else
        attend_quantized_blocks<4>(seg, mask, score, batch_idx, kv_head_idx, head_dim, num_rows,
                                   queries, row_position, states);
    } else {
      if (seg.bits == 8)
        attend_quantized_blocks_fast<8>(seg, mask, score, rows, quantized_scratch);
      else
        attend_quantized_blocks_fast<4>(seg, mask, score, rows, quantized_scratch);
    }
  }

  // The unit's rows sit at positions [first_t, last_t]: a block no row can see is skipped.
  const Index first_t = q.first_position + q_begin, last_t = q.first_position + q_end - 1;
  for (int seg_idx = 0; seg_idx < kv.num_segments; ++seg_idx) {
    const KVSegment<T>& seg = kv.segments[static_cast<std::size_t>(seg_idx)];
    const Index head_offset = batch_idx * seg.strides.batch + kv_head_idx * seg.strides.head;
    for (Index block_begin = 0; block_begin < seg.length; block_begin += kKeyBlock) {
      const Index block_len = std::min(kKeyBlock, seg.length - block_begin);
      const Index first_p = seg.first_position + block_begin;
      if (mask.past_end(last_t, first_p)) break;  // positions only grow within a segment
      if (mask.before_window(first_t, first_p, first_p + block_len - 1)) continue;
      const T* keys = seg.keys + head_offset + block_begin * seg.strides.seq;
      const T* values = seg.values + head_offset + block_begin * seg.strides.seq;
      NextBlock<T> next;
      if (block_begin + kKeyBlock < seg.length) {
        next.keys = keys + kKeyBlock * seg.strides.seq;
        next.length = std::min(kKeyBlock, seg.length - block_begin - kKeyBlock);
      }
      if constexpr (Variant == KernelVariant::kReference)
        attend_block_reference(rows, mask, score, keys, values, seg.strides.seq, block_len,
                               first_p, score_tile);
      else
        attend_block_fast(rows, mask, score, keys, values, seg.strides.seq, block_len, first_p,
                          next, score_tile, widened);
    }
  }
}

/// Split-K: a work item whose cache is long is cut into splits of the held positions, each a
/// unit of its own, and their softmax states merged in split order. The number of splits
/// depends only on the shapes (never on the device), so the serial path and any thread pool
/// compute the same units and give the same bits.
/// Units aimed at: enough for a pool to balance when there are few items (batch 1, few KV
/// heads, one query token).
inline constexpr Index kTargetUnits = 16;
/// Shortest split: below it, the merge and the partial states cost more than they save.
inline constexpr Index kMinSplitLength = 2048;

/// How a call is cut into work units, and where their scratch lives in an AttendWorkspace.
struct AttentionPlan {
  Index rep = 1, chunk = 1, num_chunks = 0, num_items = 0;
  Index splits = 1, split_length = 0;
  Index max_rows = 0;       ///< rows of the largest unit
  Index slots = 1;          ///< scratch slots: one per thread that may run units at once
  std::size_t slot_bytes = 0;
  std::size_t partial_bytes = 0;  ///< per unit, when splits > 1: states, scale, accumulators

  Index num_units() const { return num_items * splits; }
  std::size_t workspace_bytes() const {
    return static_cast<std::size_t>(slots) * slot_bytes +
           (splits > 1 ? static_cast<std::size_t>(num_units()) * partial_bytes : 0);
  }
};

inline std::size_t round_up_to_line(std::size_t bytes) {
  return (bytes + kCacheLine - 1) / kCacheLine * kCacheLine;
}

template <class T, class Acc>
AttentionPlan plan_attention(const QueryArgs<T>& q, const KVView<T>& kv,
                             const Eigen::ThreadPoolDevice* device) {
  AttentionPlan plan;
  plan.rep = q.shape.heads / kv.num_heads;
  plan.chunk = std::max<Index>(1, kRowsPerItem / plan.rep);
  plan.num_chunks = (q.shape.seq + plan.chunk - 1) / plan.chunk;
  plan.num_items = q.shape.batch * kv.num_heads * plan.num_chunks;
  plan.max_rows = plan.rep * std::min(plan.chunk, q.shape.seq);

  const Index held = kv.held_length();
  plan.split_length = held;
  if (plan.num_items > 0 && plan.num_items < kTargetUnits && held >= 2 * kMinSplitLength) {
    const Index wanted = std::min(kTargetUnits / plan.num_items, held / kMinSplitLength);
    // Cuts fall on key blocks and on quantized blocks.
    Index align = kKeyBlock;
    if (kv.quantized.num_blocks > 0) align = std::lcm(kKeyBlock, kv.quantized.group_size);
    const Index length = ((held + wanted - 1) / wanted + align - 1) / align * align;
    plan.splits = (held + length - 1) / length;
    plan.split_length = length;
  }
  if (device != nullptr && device->numThreads() > 1 && plan.num_units() > 1)
    plan.slots = device->numThreads() + 1;  // pool threads and the caller
  const Index elements = unit_scratch_elements<Acc>(plan.max_rows, q.shape.head_dim, kv.quantized);
  plan.slot_bytes = round_up_to_line(sizeof(SoftmaxState<Acc>) * plan.max_rows) +
                    round_up_to_line(sizeof(Acc) * elements);
  plan.partial_bytes = round_up_to_line(sizeof(Acc) * plan.max_rows * (q.shape.head_dim + 3));
  return plan;
}

/// A unit's softmax states, saved for the merge: per row, max, sum, the value scale its sums
/// were accumulated with, then head_dim accumulators.
template <class Acc>
void save_partial(const SoftmaxState<Acc>* states, Index num_rows, Index head_dim,
                  Acc value_scale, Acc* to) {
  for (Index row = 0; row < num_rows; ++row, to += head_dim + 3) {
    to[0] = states[row].max;
    to[1] = states[row].sum;
    to[2] = value_scale;
    std::copy(states[row].acc, states[row].acc + head_dim, to + 3);
  }
}

/// Whether every accumulator of num_rows states is finite.
template <class Acc>
bool accumulators_finite(const SoftmaxState<Acc>* states, Index num_rows, Index head_dim) {
  for (Index row = 0; row < num_rows; ++row)
    for (Index c = 0; c < head_dim; ++c)
      if (!(Eigen::numext::isfinite)(states[row].acc[c])) return false;
  return true;
}

/// Runs attention for every (batch row, KV head, chunk of query positions) and, for long
/// caches with few such items, every split of the positions; on `device` when given. Scratch
/// comes from `workspace` (grown if needed; nothing else is allocated on the serial path).
/// Every unit is computed the same way whatever thread runs it, and splits merge in order,
/// so the result does not depend on the device.
template <KernelVariant Variant = KernelVariant::kFast, class T, class Acc>
void run_attention(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                   const ScoreParams<Acc>& score, const Eigen::ThreadPoolDevice* device,
                   AttendWorkspace& workspace) {
  const AttentionPlan plan = plan_attention<T, Acc>(q, kv, device);
  workspace.reserve(plan.workspace_bytes());
  unsigned char* const base = workspace.data();
  unsigned char* const partials = base + static_cast<std::size_t>(plan.slots) * plan.slot_bytes;
  const Index head_dim = q.shape.head_dim;

  struct Item {
    Index batch_idx, kv_head_idx, q_begin, q_end, num_rows;
  };
  auto item_at = [&](Index item) {
    const Index chunk_idx = item % plan.num_chunks;
    const Index kv_head_idx = (item / plan.num_chunks) % kv.num_heads;
    const Index batch_idx = item / (plan.num_chunks * kv.num_heads);
    const Index q_begin = chunk_idx * plan.chunk;
    const Index q_end = std::min(q.shape.seq, q_begin + plan.chunk);
    return Item{batch_idx, kv_head_idx, q_begin, q_end, plan.rep * (q_end - q_begin)};
  };
  // Query row `row` of item `it` gets acc / sum of its state (value sums scaled as given).
  auto write_row = [&](const Item& it, Index row, const SoftmaxState<Acc>& state,
                       Acc value_scale) {
    const Index rows_per_head = it.q_end - it.q_begin;
    const Index head = it.kv_head_idx * plan.rep + row / rows_per_head;
    state.finish(q.out + q.row_offset(it.batch_idx, head, it.q_begin + row % rows_per_head),
                 head_dim, value_scale);
  };

  auto run_units = [&](Index first, Index last) {
    // The slot of this thread: pool threads 0 .. n-1 take slots 1 .. n, the caller slot 0.
    const Index slot = plan.slots > 1 ? device->currentThreadId() + 1 : 0;
    unsigned char* const mine = base + static_cast<std::size_t>(slot) * plan.slot_bytes;
    auto* const states = reinterpret_cast<SoftmaxState<Acc>*>(mine);
    std::uninitialized_default_construct_n(states, plan.max_rows);
    UnitScratch<Acc> scratch{
        states,
        reinterpret_cast<Acc*>(mine + round_up_to_line(sizeof(SoftmaxState<Acc>) * plan.max_rows))};
    for (Index unit = first; unit < last; ++unit) {
      const Item it = item_at(unit / plan.splits);
      const Index split = unit % plan.splits;
      const KVView<T> part =
          plan.splits == 1 ? kv
                           : kv.clipped(split * plan.split_length, (split + 1) * plan.split_length);
      ScoreParams<Acc> unit_score = score;
      attend_unit<Variant>(q, part, mask, unit_score, it.batch_idx, it.kv_head_idx, it.q_begin,
                           it.q_end, scratch);
      // Value sums beyond Acc's range (|v| near its maximum): once more with scaled weights.
      if (!accumulators_finite(scratch.states, it.num_rows, head_dim)) {
        unit_score.value_scale = overflow_value_scale<Acc>();
        attend_unit<Variant>(q, part, mask, unit_score, it.batch_idx, it.kv_head_idx,
                             it.q_begin, it.q_end, scratch);
      }
      if (plan.splits == 1) {
        for (Index row = 0; row < it.num_rows; ++row)
          write_row(it, row, scratch.states[row], unit_score.value_scale);
      } else {
        save_partial(scratch.states, it.num_rows, head_dim, unit_score.value_scale,
                     reinterpret_cast<Acc*>(partials + static_cast<std::size_t>(unit) *
                                                           plan.partial_bytes));
      }
    }
  };

  if (plan.slots == 1) {
    run_units(0, plan.num_units());
  } else {
    // Cost per unit: the K/V bytes it reads and the flops it does, so Eigen splits finely.
    const double length = static_cast<double>(plan.split_length);
    const double bytes = 2.0 * length * static_cast<double>(head_dim * Index(sizeof(T)));
    const double flops = 4.0 * static_cast<double>(plan.max_rows) * length * head_dim;
    device->parallelFor(plan.num_units(), Eigen::TensorOpCost(bytes, 0, flops), run_units);
  }
  if (plan.splits == 1) return;

  // Merge each item's splits in order (split 0 absorbs the others) and write its rows. Splits
  // are brought to the smallest value scale among them (exact powers of two); if the merged
  // sums overflow at scale 1, the merge runs again at overflow_value_scale().
  SoftmaxState<Acc>* const states = reinterpret_cast<SoftmaxState<Acc>*>(base);
  std::uninitialized_default_construct_n(states, plan.max_rows);
  Acc* const merged = reinterpret_cast<Acc*>(
      base + round_up_to_line(sizeof(SoftmaxState<Acc>) * plan.max_rows));  // (row, head_dim)
  Acc* const rescaled = merged + plan.max_rows * head_dim;                  // (head_dim)
  for (Index item = 0; item < plan.num_items; ++item) {
    const Item it = item_at(item);
    auto partial = [&](Index split, Index row) {
      return reinterpret_cast<const Acc*>(partials + static_cast<std::size_t>(
                                                         item * plan.splits + split) *
                                                         plan.partial_bytes) +
             row * (head_dim + 3);
    };
    for (Index row = 0; row < it.num_rows; ++row) {
      auto merge_at = [&](Acc target_scale) {
        SoftmaxState<Acc>& state = states[row];
        state = SoftmaxState<Acc>{partial(0, row)[0], partial(0, row)[1], merged + row * head_dim};
        const Acc first_factor = target_scale / partial(0, row)[2];
        for (Index c = 0; c < head_dim; ++c) state.acc[c] = partial(0, row)[3 + c] * first_factor;
        for (Index split = 1; split < plan.splits; ++split) {
          const Acc* other = partial(split, row);
          const Acc factor = target_scale / other[2];
          for (Index c = 0; c < head_dim; ++c) rescaled[c] = other[3 + c] * factor;
          state.merge(SoftmaxState<Acc>{other[0], other[1], rescaled}, head_dim);
        }
      };
      Acc target_scale = Acc(1);
      for (Index split = 0; split < plan.splits; ++split)
        target_scale = std::min(target_scale, partial(split, row)[2]);
      merge_at(target_scale);
      if (target_scale == Acc(1) && !accumulators_finite(states + row, 1, head_dim)) {
        target_scale = overflow_value_scale<Acc>();
        merge_at(target_scale);
      }
      write_row(it, row, states[row], target_scale);
    }
  }
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_ATTENTION_KERNEL_HPP
