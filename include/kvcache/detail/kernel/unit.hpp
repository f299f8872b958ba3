// kvcache: what one work unit of the attention kernel is given - the query rows, the score
// parameters, where its scratch lives - and the sources a kernel reads K/V elements from. Shared
// by the scalar reference twin (detail/kernel/reference.hpp), every compiled variant
// (detail/kernel/variants.hpp) and the schedule (detail/kernel/schedule.hpp).
#ifndef KVCACHE_DETAIL_KERNEL_UNIT_HPP
#define KVCACHE_DETAIL_KERNEL_UNIT_HPP

#include <kvcache/detail/kv_view.hpp>
#include <kvcache/layout.hpp>
#include <kvcache/detail/mask.hpp>
#include <kvcache/detail/online_softmax.hpp>
#include <kvcache/detail/quantizer.hpp>

#include <algorithm>
#include <cstdint>
#include <utility>

/// Forces a small hot function (a vector loop of the kernel) into its caller, so its
/// accumulators stay in registers across the caller's loop. An attribute: no template or
/// constexpr can say it.
#if defined(__GNUC__) || defined(__clang__)
#define KVCACHE_ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define KVCACHE_ALWAYS_INLINE __forceinline
#else
#define KVCACHE_ALWAYS_INLINE inline
#endif

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

/// Rows at least this many take the prefill shape of a block (scores as a rows x keys tile
/// over the block's keys transposed; compute-bound); fewer take the decode shape (one dot
/// product per key and row, reading each key once in place; memory-bound).
inline constexpr Index kTileRows = 16;

/// The key codes of one quantized block as the integer dot products read them
/// (quantization.hpp, "channel quads"): row r of quad k is the 4 bytes at
/// codes + (k * quad_rows + r) * 4, channels 4k .. 4k + 3; int8: token r; int4: token r in the
/// low nibbles, token r + quad_rows in the high ones. A block has quad_rows * 8 / Bits tokens.
struct KeyQuads {
  const std::uint8_t* codes;
  Index quads;
  Index quad_rows;
};

/// Bytes of a cache line (x86-64 and most ARM cores): the unit of prefetching.
inline constexpr Index kCacheLine = 64;

/// Where one work unit's scratch lives: num_rows softmax states and the Acc scratch.
template <class Acc>
struct UnitScratch {
  SoftmaxState<Acc>* states;
  Acc* elements;
};

/// Scratch elements a quantized segment's blocks need for num_rows rows (group G, D channels,
/// P = 4 * ceil(D / 4) padded channels): key scales and zeros (2D), per row the folded query
/// (D), its zero term and the weights (G), value scales and zeros (2D), the block's values
/// dequantized (G x D), then for the integer scores per row the query's step (1), its int16
/// words and their bytes (4P bytes: P elements hold them), the int32 sums (G), and the folded
/// row's largest magnitude and their sum (2).
inline Index quantized_scratch_elements(Index num_rows, Index head_dim, Index group) {
  const Index padded = 4 * ((head_dim + 3) / 4);
  return 4 * head_dim + num_rows * (head_dim + 1 + group) + group * head_dim +
         num_rows * (1 + padded + group + 2);
}

/// Acc elements of scratch one work unit of num_rows rows needs: the score tile
/// (rows x kKeyBlock), a block's keys transposed and widened (kKeyBlock x head_dim) and a row
/// buffer (head_dim), the queries and the accumulators (rows x head_dim each), and the quantized blocks' scratch.
inline Index unit_scratch_elements(Index num_rows, Index head_dim, const QuantSegment& quantized) {
  Index n = num_rows * kKeyBlock + (kKeyBlock + 1) * head_dim + 2 * num_rows * head_dim;
  if (quantized.num_blocks > 0)
    n += quantized_scratch_elements(num_rows, head_dim, quantized.group_size);
  return n;
}

/// A source of K/V elements: T elements stored as they are, element c of a row at row[c].
template <class T>
struct Stored {
  using Element = T;  ///< what a row pointer points to; row strides count these
  template <class Acc>
  static Acc scalar(const T* row, Index c) {
    return static_cast<Acc>(row[c]);
  }
};

/// The rows of one work unit and where their state lives.
template <class Acc>
struct ItemRows {
  Index num_rows;
  Index head_dim;
  /// (num_rows, head_dim) row-major, already times score.scale; in channel order, except
  /// that the unit puts a decode's rows in to_score_order for its T blocks (block_math.inl).
  const Acc* queries;
  Acc* accumulators;          ///< (num_rows, head_dim) row-major; states[r].acc points into it
  SoftmaxState<Acc>* states;  ///< (num_rows)
  Index first_position;       ///< position of query row 0 of every head
  Index rows_per_head;        ///< row r is query position first_position + r % rows_per_head
  Index batch_idx;
  Index kv_head_idx;

  /// The absolute position of row r's query.
  Index row_position(Index r) const { return first_position + r % rows_per_head; }
};

/// What one work unit computes: the rows of (batch row, KV head, query positions
/// [q_begin, q_end)) over the held positions of `kv` (all, or one split). Leaves the rows'
/// softmax states in scratch.states. Every kernel variant has one of these.
template <class T, class Acc>
using UnitFunction = void (*)(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                              const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx,
                              Index q_begin, Index q_end, const UnitScratch<Acc>& scratch);

/// Copies the unit's query rows (GQA group x positions) into scratch, times the score scale,
/// and clears their softmax states; returns the rows.
template <class T, class Acc>
ItemRows<Acc> prepare_rows(const QueryArgs<T>& q, Index num_kv_heads, const ScoreParams<Acc>& score,
                           Index batch_idx, Index kv_head_idx, Index q_begin, Index q_end,
                           Acc* queries, Acc* accumulators, SoftmaxState<Acc>* states) {
  const Index head_dim = q.shape.head_dim;
  const Index rep = q.shape.heads / num_kv_heads;
  const Index rows_per_head = q_end - q_begin;
  const Index num_rows = rep * rows_per_head;
  // Row r = (local head r / rows_per_head, query position q_begin + r % rows_per_head).
  for (Index row = 0; row < num_rows; ++row) {
    const T* src = q.data + q.row_offset(batch_idx, kv_head_idx * rep + row / rows_per_head,
                                         q_begin + row % rows_per_head);
    for (Index c = 0; c < head_dim; ++c)
      queries[row * head_dim + c] = static_cast<Acc>(src[c]) * score.scale;
    states[row].acc = accumulators + row * head_dim;
    states[row].clear(head_dim);
  }
  return ItemRows<Acc>{num_rows,  head_dim,  queries,      accumulators, states,
                       q.first_position + q_begin, rows_per_head, batch_idx, kv_head_idx};
}

/// The K (or V) rows of one block of the kernel: listed one by one (row j at listed[j]: a block
/// of a paged cache spans pool blocks anywhere in memory), or at a fixed stride (row j at
/// first + j * stride: a segment). One type for both, so the kernel is compiled once.
template <class T>
struct RowsOf {
  const T* const* listed = nullptr;
  const T* first = nullptr;
  Index stride = 0;
  const T* operator()(Index j) const { return listed != nullptr ? listed[j] : first + j * stride; }
};

/// One block of the kernel over T rows: `length` <= kKeyBlock consecutive positions from
/// first_position; and the rows of the following block of the same run (next_length 0: none),
/// which the kernel prefetches meanwhile.
template <class T>
struct BlockRows {
  RowsOf<T> keys, values;
  Index length;
  Index first_position;
  RowsOf<T> next_keys, next_values;
  Index next_length;

  /// Whether the next block's rows continue this block's in memory (a segment, or a run of
  /// consecutive pool blocks): the hardware prefetcher is already streaming toward them.
  bool next_follows() const {
    return keys.listed == nullptr && next_keys.listed == nullptr &&
           next_keys.first == keys.first + length * keys.stride;
  }
};

/// The blocks of a run of `length` positions from first_position that a row at positions
/// [first_t, last_t] can see, in position order: calls visit(BlockRows) for each block of
/// kKeyBlock positions (the last may be shorter). rows_of(begin, count, table) gives the rows
/// of held indices [begin, begin + count) as a (keys, values) pair; `table` (0 or 1) names
/// where a run that lists rows may list them: the current and the next block use different
/// ones.
template <class T, class RowsOfRange, class Visit>
void for_each_visible_run_block(Index first_position, Index length, const MaskRules& mask,
                                Index first_t, Index last_t, RowsOfRange&& rows_of,
                                Visit&& visit) {
  int table = 0;
  for (Index block_begin = 0; block_begin < length; block_begin += kKeyBlock, table ^= 1) {
    const Index block_len = std::min(kKeyBlock, length - block_begin);
    const Index first_p = first_position + block_begin;
    if (mask.past_end(last_t, first_p)) break;  // positions only grow within a run
    if (mask.before_window(first_t, first_p, first_p + block_len - 1)) continue;
    const Index next_len = std::clamp<Index>(length - block_begin - kKeyBlock, 0, kKeyBlock);
    const auto current = rows_of(block_begin, block_len, table);
    const auto next = rows_of(block_begin + kKeyBlock, next_len, table ^ 1);
    visit(BlockRows<T>{current.first, current.second, block_len, first_p, next.first,
                       next.second, next_len});
  }
}

/// for_each_visible_run_block over a segment of one (batch row, KV head): strided rows.
template <class T, class Visit>
void for_each_visible_block(const KVSegment<T>& seg, const MaskRules& mask, Index batch_idx,
                            Index kv_head_idx, Index first_t, Index last_t, Visit&& visit) {
  const Index head_offset = batch_idx * seg.strides.batch + kv_head_idx * seg.strides.head;
  for_each_visible_run_block<T>(
      seg.first_position, seg.length, mask, first_t, last_t,
      [&](Index begin, Index, int) {
        const Index at = head_offset + begin * seg.strides.seq;
        return std::make_pair(RowsOf<T>{nullptr, seg.keys + at, seg.strides.seq},
                              RowsOf<T>{nullptr, seg.values + at, seg.strides.seq});
      },
      visit);
}

/// for_each_visible_run_block over a block table of one KV head (batch row 0): listed rows,
/// each block's listed once (as the next block of the one before, or when first visited).
template <class T, class Visit>
void for_each_visible_block(const BlockTable<T>& table, const MaskRules& mask, Index kv_head_idx,
                            Index first_t, Index last_t, Visit&& visit) {
  const Index head_offset = kv_head_idx * table.strides.head;
  const T* keys[2][kKeyBlock];
  const T* values[2][kKeyBlock];
  Index listed_from[2] = {-1, -1};  // the first held index each table lists
  for_each_visible_run_block<T>(
      table.first_position, table.length, mask, first_t, last_t,
      [&](Index begin, Index count, int t) {
        const Index slot = table.offset + begin;
        const std::int32_t* id = table.ids + slot / table.block_size;
        Index row = slot % table.block_size;
        // Pool blocks that follow each other in memory (a prefill into free blocks) hold
        // strided rows, as a segment does: no list, and the hardware sees one stream.
        if (count > 0) {
          const Index last_block = (slot + count - 1) / table.block_size - slot / table.block_size;
          bool consecutive = true;
          for (Index i = 1; i <= last_block && consecutive; ++i) consecutive = id[i] == id[0] + i;
          if (consecutive && table.block_stride == table.block_size * table.strides.seq) {
            const Index at = id[0] * table.block_stride + head_offset + row * table.strides.seq;
            return std::make_pair(RowsOf<T>{nullptr, table.keys + at, table.strides.seq},
                                  RowsOf<T>{nullptr, table.values + at, table.strides.seq});
          }
        }
        if (count > 0 && listed_from[t] != begin) {
          // One division per listing: then walk the rows of each pool block in turn.
          for (Index j = 0; j < count;) {
            const Index at = *id * table.block_stride + head_offset;
            const Index run = std::min(count - j, table.block_size - row);
            // Invariant: rows [0, j) are listed; row j is row `row` of pool block *id.
            for (Index r = 0; r < run; ++r, ++j) {
              keys[t][j] = table.keys + at + (row + r) * table.strides.seq;
              values[t][j] = table.values + at + (row + r) * table.strides.seq;
            }
            row = 0;
            ++id;
          }
          listed_from[t] = begin;
        }
        return std::make_pair(RowsOf<T>{keys[t]}, RowsOf<T>{values[t]});
      },
      visit);
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KERNEL_UNIT_HPP
