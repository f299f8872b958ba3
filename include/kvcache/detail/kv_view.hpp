// kvcache: what a cache shows the attention kernel - runs of keys and values at absolute
// positions. The kernel never sees a cache type, only these views, so every cache kind reuses
// the same kernel and the same masking rules.
#ifndef KVCACHE_DETAIL_KV_VIEW_HPP
#define KVCACHE_DETAIL_KV_VIEW_HPP

#include <kvcache/layout.hpp>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstdint>

namespace kvcache {
namespace detail {

/// A run of `length` consecutive absolute positions starting at `first_position`, stored at
/// `keys` / `values` with the given strides (position i of batch row b, head h is at
/// b * strides.batch + h * strides.head + i * strides.seq).
template <class T>
struct KVSegment {
  const T* keys = nullptr;
  const T* values = nullptr;
  Strides strides{0, 0, 0};
  Index first_position = 0;
  Index length = 0;
};

/// A run of `num_blocks` quantized blocks (QuantizedKVCache, KIVI): block i of batch row b,
/// head h holds absolute positions first_position + i * group_size + [0, group_size) and
/// starts at blocks + b * batch_stride + h * head_stride + i * bytes_per_block (strides in
/// bytes). Each block is in the byte format of QuantBlockFormat<bits>{group_size, head_dim}
/// (quantization.hpp): key codes, key zeros/scales per channel, value codes, value
/// zeros/scales per token and group. The kernel reads the codes in place.
struct QuantSegment {
  const std::uint8_t* blocks = nullptr;
  Index bytes_per_block = 0;
  Index batch_stride = 0;  ///< bytes between batch rows
  Index head_stride = 0;   ///< bytes between heads
  Index first_position = 0;
  Index num_blocks = 0;
  Index group_size = 0;
  int bits = 0;  ///< 8 or 4
};

/// A run of `length` consecutive absolute positions from `first_position` held in fixed-size
/// blocks of a pool (PagedKVCache), one sequence (batch row 0): held index i (position
/// first_position + i) is row (offset + i) % block_size of pool block ids[(offset + i) /
/// block_size], and element c of head h of row r of pool block b is at
/// keys / values + b * block_stride + h * strides.head + r * strides.seq + c.
template <class T>
struct BlockTable {
  const T* keys = nullptr;
  const T* values = nullptr;
  const std::int32_t* ids = nullptr;
  Index block_size = 0;
  Index block_stride = 0;  ///< elements between pool blocks
  Strides strides{0, 0, 0};  ///< within a block (batch unused)
  Index offset = 0;          ///< rows of the first listed block before held index 0
  Index first_position = 0;
  Index length = 0;
};

/// Everything the kernel reads of a cache: its runs of positions, oldest first and
/// non-overlapping, and the rules the cache itself imposes (a sliding window and its sinks).
/// Valid until the cache is next modified. The kernel visits, in this order: at most one
/// QuantSegment (a quantized cache's blocks), up to kMaxSegments T segments, then at most one
/// BlockTable (a paged sequence's blocks, any number of them).
template <class T>
struct KVView {
  static constexpr int kMaxSegments = 4;
  std::array<KVSegment<T>, kMaxSegments> segments{};
  int num_segments = 0;
  QuantSegment quantized{};  ///< num_blocks 0: none
  BlockTable<T> paged{};     ///< length 0: none
  Index batch_size = 0;
  Index num_heads = 0;
  Index head_dim = 0;
  Index position = 0;         ///< absolute position of the next token to be appended
  Index window = 0;           ///< the cache's own window (0: none)
  Index num_sink_tokens = 0;  ///< positions [0, num_sink_tokens) are exempt from the window
  /// Positions [num_sink_tokens, first_held_position) were evicted (a sliding window): a query
  /// whose window reaches below first_held_position cannot be answered. 0: nothing evicted.
  Index first_held_position = 0;

  void add(const KVSegment<T>& segment) {
    if (segment.length == 0) return;
    assert(num_segments < kMaxSegments && "kvcache: a cache gave more segments than KVView holds");
    segments[static_cast<std::size_t>(num_segments++)] = segment;
  }

  void add_quantized(const QuantSegment& segment) {
    if (segment.num_blocks == 0) return;
    assert(quantized.num_blocks == 0 && num_segments == 0 &&
           "kvcache: the quantized blocks come first and once");
    quantized = segment;
  }

  void add_block_table(const BlockTable<T>& table) {
    if (table.length == 0) return;
    assert(paged.length == 0 && "kvcache: one block table, after every other run");
    paged = table;
  }

  /// Positions held: those of the quantized blocks, of every segment and of the block table.
  Index held_length() const {
    Index n = quantized.num_blocks * quantized.group_size + paged.length;
    for (int s = 0; s < num_segments; ++s) n += segments[static_cast<std::size_t>(s)].length;
    return n;
  }

  /// The same view restricted to the held positions [begin, end) in held order (oldest
  /// first), for split-K. A cut inside the quantized blocks must fall on a block boundary.
  KVView clipped(Index begin, Index end) const {
    KVView part = *this;
    part.quantized = QuantSegment{};
    part.paged = BlockTable<T>{};
    part.num_segments = 0;
    Index offset = 0;  // held index of the current run's first position
    if (quantized.num_blocks > 0) {
      const Index length = quantized.num_blocks * quantized.group_size;
      const Index from = std::max(begin, offset), to = std::min(end, offset + length);
      if (from < to) {
        assert(from % quantized.group_size == 0 && to % quantized.group_size == 0 &&
               "kvcache: split-K cuts quantized blocks only at block boundaries");
        part.quantized = quantized;
        part.quantized.blocks += from / quantized.group_size * quantized.bytes_per_block;
        part.quantized.first_position += from;
        part.quantized.num_blocks = (to - from) / quantized.group_size;
      }
      offset += length;
    }
    for (int s = 0; s < num_segments; ++s) {
      const KVSegment<T>& seg = segments[static_cast<std::size_t>(s)];
      const Index from = std::max(begin, offset), to = std::min(end, offset + seg.length);
      if (from < to) {
        KVSegment<T> cut = seg;
        cut.keys += (from - offset) * seg.strides.seq;
        cut.values += (from - offset) * seg.strides.seq;
        cut.first_position += from - offset;
        cut.length = to - from;
        part.add(cut);
      }
      offset += seg.length;
    }
    if (paged.length > 0) {
      const Index from = std::max(begin, offset), to = std::min(end, offset + paged.length);
      if (from < to) {
        BlockTable<T> cut = paged;
        const Index slot = paged.offset + (from - offset);
        cut.ids += slot / paged.block_size;
        cut.offset = slot % paged.block_size;
        cut.first_position += from - offset;
        cut.length = to - from;
        part.paged = cut;
      }
    }
    return part;
  }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KV_VIEW_HPP
