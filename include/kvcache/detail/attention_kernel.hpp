// kvcache: the attention kernel. It reads a KVView (runs of keys/values at absolute positions)
// in place, one pass, with an online softmax: no score matrix over the sequence, no copy of
// the cache. Swappable: attend() only calls run_attention().
#ifndef KVCACHE_DETAIL_ATTENTION_KERNEL_HPP
#define KVCACHE_DETAIL_ATTENTION_KERNEL_HPP

#include <kvcache/detail/kv_view.hpp>
#include <kvcache/detail/vector_math.hpp>
#include <kvcache/mask.hpp>
#include <kvcache/online_softmax.hpp>
#include <kvcache/quantization.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
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
};

/// Scalar parameters of the score: s = scale * (q . k), then softcap * tanh(s / softcap).
template <class Acc>
struct ScoreParams {
  Acc scale;
  Acc softcap;  ///< 0: none
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
        const Acc weight = std::exp(scores[j] - state.max);
        state.sum += weight;
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
      const Acc weight = std::exp(scores[j] - state.max);
      state.sum += weight;
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

/// One block of `block_len` keys/values of a T segment for every row of a work item, with
/// Eigen's vectorised products: scores S = Q K^T (rows x block), masking, softcap, the online
/// softmax update per row, then acc += P V. Keys and values of other types than Acc (half,
/// bfloat16) are widened into a block-sized scratch (L1/L2), never a copy of the cache.
template <class T, class Acc, class RowPosition>
void attend_block_fast(const ItemRows<Acc, RowPosition>& rows, const MaskRules& mask,
                       const ScoreParams<Acc>& score, const T* keys, const T* values,
                       Index seq_stride, Index block_len, Index first_p, Acc* score_tile,
                       Acc* widened) {
  using RowMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using StridedMap = Eigen::Map<const RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  const Index head_dim = rows.head_dim, n = block_len;

  const Acc* k_data = nullptr;
  const Acc* v_data = nullptr;
  Index stride = seq_stride;
  if constexpr (std::is_same_v<T, Acc>) {
    k_data = keys;
    v_data = values;
  } else {
    using TMap = Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                            Eigen::Unaligned, Eigen::OuterStride<>>;
    Eigen::Map<RowMatrix>(widened, n, head_dim) =
        TMap(keys, n, head_dim, Eigen::OuterStride<>(seq_stride)).template cast<Acc>();
    Eigen::Map<RowMatrix>(widened + kKeyBlock * head_dim, n, head_dim) =
        TMap(values, n, head_dim, Eigen::OuterStride<>(seq_stride)).template cast<Acc>();
    k_data = widened;
    v_data = widened + kKeyBlock * head_dim;
    stride = head_dim;
  }
  const StridedMap k(k_data, n, head_dim, Eigen::OuterStride<>(stride));
  const StridedMap v(v_data, n, head_dim, Eigen::OuterStride<>(stride));
  const Eigen::Map<const RowMatrix> q(rows.queries, rows.num_rows, head_dim);
  Eigen::Map<RowMatrix> acc(rows.accumulators, rows.num_rows, head_dim);
  Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>> s(
      score_tile, rows.num_rows, n, Eigen::OuterStride<>(kKeyBlock));
  const bool matrix_products = rows.num_rows >= kMatrixProductRows;

  if (matrix_products) {
    s.noalias() = q * k.transpose();
  } else {
    for (Index j = 0; j < n; ++j) {  // key j is read once, for every row
      const Acc* key = k_data + j * stride;
      Index row = 0;
      for (; row + 4 <= rows.num_rows; row += 4) {
        const Acc* group[4] = {rows.queries + row * head_dim, rows.queries + (row + 1) * head_dim,
                               rows.queries + (row + 2) * head_dim,
                               rows.queries + (row + 3) * head_dim};
        Acc scores[4];
        dot_rows<4>(group, key, head_dim, scores);
        for (int r = 0; r < 4; ++r) s(row + r, j) = scores[r];
      }
      for (; row < rows.num_rows; ++row) {
        const Acc* single[1] = {rows.queries + row * head_dim};
        dot_rows<1>(single, key, head_dim, &s(row, j));
      }
    }
  }
  if (score.softcap > 0)
    s = score.softcap * (s.array() * (Acc(1) / score.softcap)).tanh().matrix();

  for (Index row = 0; row < rows.num_rows; ++row) {
    auto s_row = s.row(row);
    mask_scores(s_row, mask, rows.batch_idx, rows.row_position(row), first_p);
    const Acc block_max = s_row.maxCoeff();
    if (block_max == minus_infinity) {  // nothing visible: contributes nothing
      s_row.setZero();
      continue;
    }
    SoftmaxState<Acc>& state = rows.states[row];
    state.rescale(std::max(state.max, block_max), head_dim);
    // Invariant: state.sum, state.acc are relative to state.max >= every score so far. Masked
    // keys get weight exactly 0 (a vectorised exp of -inf need not be exactly 0).
    s_row = (s_row.array() == minus_infinity)
                .select(Acc(0), (s_row.array() - state.max).exp())
                .matrix();
    state.sum += sum(score_tile + row * kKeyBlock, n);
  }

  // The product adds 0 * v for masked keys: NaN where a masked value is inf or NaN, so a
  // block holding such values takes the loop, which skips zero weights.
  if (matrix_products && v.allFinite()) {
    acc.noalias() += s * v;
  } else {
    // Value j is read once for every group of four rows. Zero weights (masked keys) are
    // skipped, so a masked inf or NaN value cannot reach a row.
    for (Index j = 0; j < n; ++j) {
      const Acc* value = v_data + j * stride;
      Index row = 0;
      for (; row + 4 <= rows.num_rows; row += 4) {
        const Acc weight[4] = {s(row, j), s(row + 1, j), s(row + 2, j), s(row + 3, j)};
        if (weight[0] != Acc(0) && weight[1] != Acc(0) && weight[2] != Acc(0) &&
            weight[3] != Acc(0)) {
          Acc* group[4] = {rows.accumulators + row * head_dim,
                           rows.accumulators + (row + 1) * head_dim,
                           rows.accumulators + (row + 2) * head_dim,
                           rows.accumulators + (row + 3) * head_dim};
          axpy_rows<4>(group, weight, value, head_dim);
          continue;
        }
        for (int r = 0; r < 4; ++r) {
          if (weight[r] == Acc(0)) continue;
          Acc* single[1] = {rows.accumulators + (row + r) * head_dim};
          axpy_rows<1>(single, weight + r, value, head_dim);
        }
      }
      for (; row < rows.num_rows; ++row) {
        const Acc weight = s(row, j);
        if (weight == Acc(0)) continue;
        Acc* single[1] = {rows.accumulators + row * head_dim};
        axpy_rows<1>(single, &weight, value, head_dim);
      }
    }
  }
}

/// One work item: batch row b, KV head kv_head, query positions [q_begin, q_end), and the
/// `rep` query heads that read this KV head. Reads each key/value block once for all rows.
template <KernelVariant Variant, class T, class Acc>
void attend_item(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                 const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx, Index q_begin,
                 Index q_end) {
  const Index head_dim = q.shape.head_dim;
  const Index rep = q.shape.heads / kv.num_heads;
  const Index rows_per_head = q_end - q_begin;
  const Index num_rows = rep * rows_per_head;

  // Row r = (local head g, query position i): g = r / rows_per_head, i = q_begin + r % ...
  // Aligned, so that Eigen's elementwise loops (exp, tanh) over the tile split into scalar
  // and vector parts the same way on every call: results do not depend on the heap.
  std::vector<Acc, Eigen::aligned_allocator<Acc>> workspace(static_cast<std::size_t>(
      num_rows * 2 * head_dim + num_rows * kKeyBlock + 2 * kKeyBlock * head_dim));
  Acc* const score_tile = workspace.data();                 // (num_rows, kKeyBlock)
  Acc* const widened = score_tile + num_rows * kKeyBlock;   // (2, kKeyBlock, head_dim)
  Acc* const queries = widened + 2 * kKeyBlock * head_dim;  // (num_rows, head_dim), pre-scaled
  Acc* const accumulators = queries + num_rows * head_dim;  // (num_rows, head_dim)
  std::vector<SoftmaxState<Acc>> states(static_cast<std::size_t>(num_rows));

  auto query_ptr = [&](Index row) {
    const Index head = kv_head_idx * rep + row / rows_per_head;
    const Index i = q_begin + row % rows_per_head;
    return batch_idx * q.strides.batch + head * q.strides.head + i * q.strides.seq;
  };
  auto row_position = [&](Index row) { return q.first_position + q_begin + row % rows_per_head; };

  for (Index row = 0; row < num_rows; ++row) {
    const T* src = q.data + query_ptr(row);
    for (Index c = 0; c < head_dim; ++c)
      queries[row * head_dim + c] = static_cast<Acc>(src[c]) * score.scale;
    states[static_cast<std::size_t>(row)].acc = accumulators + row * head_dim;
    states[static_cast<std::size_t>(row)].clear(head_dim);
  }

  // Quantized blocks first: their positions precede every T segment's.
  if (kv.quantized.num_blocks > 0) {
    if (kv.quantized.bits == 8)
      attend_quantized_blocks<8>(kv.quantized, mask, score, batch_idx, kv_head_idx, head_dim,
                                 num_rows, queries, row_position, states.data());
    else
      attend_quantized_blocks<4>(kv.quantized, mask, score, batch_idx, kv_head_idx, head_dim,
                                 num_rows, queries, row_position, states.data());
  }

  const ItemRows<Acc, decltype(row_position)> rows{num_rows,     head_dim,      queries,
                                                   accumulators, states.data(), row_position,
                                                   batch_idx};
  // The item's rows sit at positions [first_t, last_t]: a block no row can see is skipped.
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
      if constexpr (Variant == KernelVariant::kReference)
        attend_block_reference(rows, mask, score, keys, values, seg.strides.seq, block_len,
                               first_p, score_tile);
      else
        attend_block_fast(rows, mask, score, keys, values, seg.strides.seq, block_len, first_p,
                          score_tile, widened);
    }
  }

  for (Index row = 0; row < num_rows; ++row)
    states[static_cast<std::size_t>(row)].finish(q.out + query_ptr(row), head_dim);
}

/// Runs attention for every (batch row, KV head, chunk of query positions), on `device` when
/// given. Work items are independent and each is computed the same way whatever thread runs
/// it, so the result does not depend on the device.
template <KernelVariant Variant = KernelVariant::kFast, class T, class Acc>
void run_attention(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                   const ScoreParams<Acc>& score, const Eigen::ThreadPoolDevice* device) {
  const Index rep = q.shape.heads / kv.num_heads;
  const Index chunk = std::max<Index>(1, kRowsPerItem / rep);
  const Index num_chunks = (q.shape.seq + chunk - 1) / chunk;
  const Index num_items = q.shape.batch * kv.num_heads * num_chunks;

  auto run_items = [&](Index first, Index last) {
    for (Index item = first; item < last; ++item) {
      const Index chunk_idx = item % num_chunks;
      const Index kv_head_idx = (item / num_chunks) % kv.num_heads;
      const Index batch_idx = item / (num_chunks * kv.num_heads);
      const Index q_begin = chunk_idx * chunk;
      attend_item<Variant>(q, kv, mask, score, batch_idx, kv_head_idx, q_begin,
                  std::min(q.shape.seq, q_begin + chunk));
    }
  };

  if (device == nullptr || device->numThreads() <= 1 || num_items <= 1) {
    run_items(0, num_items);
    return;
  }
  // Cost per item: the K/V bytes it reads and the flops it does, so Eigen splits finely.
  Index kv_len = 0;
  for (int s = 0; s < kv.num_segments; ++s) kv_len += kv.segments[static_cast<std::size_t>(s)].length;
  kv_len += kv.quantized.num_blocks * kv.quantized.group_size;
  const double bytes = 2.0 * static_cast<double>(kv_len * q.shape.head_dim * Index(sizeof(T)));
  const double flops = 4.0 * static_cast<double>(rep * chunk * kv_len * q.shape.head_dim);
  device->parallelFor(num_items, Eigen::TensorOpCost(bytes, 0, flops), run_items);
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_ATTENTION_KERNEL_HPP
