// kvcache: the attention kernel. It reads a KVView (runs of keys/values at absolute positions)
// in place, one pass, with an online softmax: no score matrix over the sequence, no copy of
// the cache. Swappable: attend() only calls run_attention().
#ifndef KVCACHE_DETAIL_ATTENTION_KERNEL_HPP
#define KVCACHE_DETAIL_ATTENTION_KERNEL_HPP

#include <kvcache/detail/kv_view.hpp>
#include <kvcache/mask.hpp>
#include <kvcache/online_softmax.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
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

/// One work item: batch row b, KV head kv_head, query positions [q_begin, q_end), and the
/// `rep` query heads that read this KV head. Reads each key/value block once for all rows.
template <class T, class Acc>
void attend_item(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                 const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx, Index q_begin,
                 Index q_end) {
  const Index head_dim = q.shape.head_dim;
  const Index rep = q.shape.heads / kv.num_heads;
  const Index num_rows = rep * (q_end - q_begin);

  // Row r = (local head g, query position i): g = r / (q_end - q_begin), i = q_begin + r % ...
  std::vector<Acc> workspace(static_cast<std::size_t>(num_rows * 2 * head_dim + kKeyBlock));
  Acc* const queries = workspace.data();                 // (num_rows, head_dim), pre-scaled
  Acc* const accumulators = queries + num_rows * head_dim;  // (num_rows, head_dim)
  Acc* const scores = accumulators + num_rows * head_dim;   // (kKeyBlock)
  std::vector<SoftmaxState<Acc>> states(static_cast<std::size_t>(num_rows));

  const Index rows_per_head = q_end - q_begin;
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

  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  for (int seg_idx = 0; seg_idx < kv.num_segments; ++seg_idx) {
    const KVSegment<T>& seg = kv.segments[static_cast<std::size_t>(seg_idx)];
    const Index head_offset = batch_idx * seg.strides.batch + kv_head_idx * seg.strides.head;
    for (Index block_begin = 0; block_begin < seg.length; block_begin += kKeyBlock) {
      const Index block_len = std::min(kKeyBlock, seg.length - block_begin);
      const Index first_p = seg.first_position + block_begin;
      const T* keys = seg.keys + head_offset + block_begin * seg.strides.seq;
      const T* values = seg.values + head_offset + block_begin * seg.strides.seq;

      for (Index row = 0; row < num_rows; ++row) {
        const Index t = row_position(row);
        if (mask.past_end(t, first_p)) continue;
        const Acc* qrow = queries + row * head_dim;
        // Scores of the visible keys of this block; -inf marks a masked key.
        Acc block_max = minus_infinity;
        for (Index j = 0; j < block_len; ++j) {
          if (!mask.visible(batch_idx, t, first_p + j)) {
            scores[j] = minus_infinity;
            continue;
          }
          const T* krow = keys + j * seg.strides.seq;
          Acc dot = 0;
          for (Index c = 0; c < head_dim; ++c) dot += qrow[c] * static_cast<Acc>(krow[c]);
          if (score.softcap > 0) dot = score.softcap * std::tanh(dot / score.softcap);
          scores[j] = dot;
          block_max = std::max(block_max, dot);
        }
        if (block_max == minus_infinity) continue;  // nothing visible (or all scores -inf)

        SoftmaxState<Acc>& state = states[static_cast<std::size_t>(row)];
        state.rescale(std::max(state.max, block_max), head_dim);
        // Invariant: state.sum, state.acc are relative to state.max >= every score so far.
        for (Index j = 0; j < block_len; ++j) {
          if (scores[j] == minus_infinity) continue;
          const Acc weight = std::exp(scores[j] - state.max);
          state.sum += weight;
          const T* vrow = values + j * seg.strides.seq;
          for (Index c = 0; c < head_dim; ++c) state.acc[c] += weight * static_cast<Acc>(vrow[c]);
        }
      }
    }
  }

  for (Index row = 0; row < num_rows; ++row)
    states[static_cast<std::size_t>(row)].finish(q.out + query_ptr(row), head_dim);
}

/// Runs attention for every (batch row, KV head, chunk of query positions), on `device` when
/// given. Work items are independent and each is computed the same way whatever thread runs
/// it, so the result does not depend on the device.
template <class T, class Acc>
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
      attend_item(q, kv, mask, score, batch_idx, kv_head_idx, q_begin,
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
  const double bytes = 2.0 * static_cast<double>(kv_len * q.shape.head_dim * Index(sizeof(T)));
  const double flops = 4.0 * static_cast<double>(rep * chunk * kv_len * q.shape.head_dim);
  device->parallelFor(num_items, Eigen::TensorOpCost(bytes, 0, flops), run_items);
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_ATTENTION_KERNEL_HPP
