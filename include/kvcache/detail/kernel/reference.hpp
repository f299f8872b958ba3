// kvcache: the scalar reference twin of the attention kernel - one key and one query row at a
// time, straight from the definitions (DESIGN.md 2-3). attend() never runs it; the tests compare
// every compiled variant with it (tests/test_kernel_variants.cpp).
#ifndef KVCACHE_DETAIL_KERNEL_REFERENCE_HPP
#define KVCACHE_DETAIL_KERNEL_REFERENCE_HPP

#include <kvcache/detail/kernel/unit.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kvcache {
namespace detail {
namespace reference {

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
template <int Bits, class Acc>
void attend_quantized_blocks(const QuantSegment& seg, const MaskRules& mask,
                             const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx,
                             const ItemRows<Acc>& rows) {
  const Index head_dim = rows.head_dim, num_rows = rows.num_rows;
  const Acc* const queries = rows.queries;
  SoftmaxState<Acc>* const states = rows.states;
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
    const std::uint8_t* const value_codes = block + format.value_codes_offset();
    const std::uint8_t* const value_zeros = block + format.value_zeros_offset();
    const std::uint8_t* const value_scales = block + format.value_scales_offset();
    for (Index c = 0; c < head_dim; ++c) {
      key_scales[c] = static_cast<Acc>(load_bfloat16(block + format.key_scales_offset() + 2 * c));
      key_zeros[c] = static_cast<Acc>(load_bfloat16(block + format.key_zeros_offset() + 2 * c));
    }

    for (Index row = 0; row < num_rows; ++row) {
      const Index t = rows.row_position(row);
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
        Acc dot = 0;
        for (Index c = 0; c < head_dim; ++c)
          dot += folded[c] * static_cast<Acc>(format.key_code(block, j, c));
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

/// One block of keys/values of T (a segment's or a block table's), at absolute positions
/// block.first_position, ... : the scalar twin. Per row, per key: the mask rule, a dot
/// product, the online update.
template <class T, class Acc>
void attend_block_reference(const ItemRows<Acc>& rows, const MaskRules& mask,
                            const ScoreParams<Acc>& score, const BlockRows<T>& block,
                            Acc* scores) {
  const Index block_len = block.length, first_p = block.first_position;
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
      const T* krow = block.keys(j);
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
      const T* vrow = block.values(j);
      for (Index c = 0; c < head_dim; ++c) state.acc[c] += weight * static_cast<Acc>(vrow[c]);
    }
  }
}

/// One work unit computed by the twin (UnitFunction): the quantized blocks first (their
/// positions precede every T segment's), then the T segments and the block table, block by
/// block.
template <class T, class Acc>
void attend_unit(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                 const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx, Index q_begin,
                 Index q_end, const UnitScratch<Acc>& scratch) {
  const Index head_dim = q.shape.head_dim;
  const Index num_rows = q.shape.heads / kv.num_heads * (q_end - q_begin);
  Acc* const scores = scratch.elements;                // (kKeyBlock)
  Acc* const queries = scores + kKeyBlock;             // (num_rows, head_dim)
  Acc* const accumulators = queries + num_rows * head_dim;
  const ItemRows<Acc> rows = prepare_rows(q, kv.num_heads, score, batch_idx, kv_head_idx, q_begin,
                                          q_end, queries, accumulators, scratch.states);
  if (kv.quantized.num_blocks > 0) {
    if (kv.quantized.bits == 8)
      attend_quantized_blocks<8>(kv.quantized, mask, score, batch_idx, kv_head_idx, rows);
    else
      attend_quantized_blocks<4>(kv.quantized, mask, score, batch_idx, kv_head_idx, rows);
  }
  const Index first_t = rows.row_position(0), last_t = rows.row_position(rows.rows_per_head - 1);
  auto block = [&](const BlockRows<T>& block_rows) {
    attend_block_reference(rows, mask, score, block_rows, scores);
  };
  for (int s = 0; s < kv.num_segments; ++s)
    for_each_visible_block(kv.segments[static_cast<std::size_t>(s)], mask, batch_idx, kv_head_idx,
                           first_t, last_t, block);
  if (kv.paged.length > 0)
    for_each_visible_block(kv.paged, mask, kv_head_idx, first_t, last_t, block);
}

}  // namespace reference
}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KERNEL_REFERENCE_HPP
