// kvcache: one work unit of a variant (UnitFunction, detail/kernel/unit.hpp): the rows of one
// (batch row, KV head, query chunk) over the held positions of a view - the quantized blocks
// first (their positions precede every T segment's), then each T segment and the block table,
// block by block.
// Compiled once per variant (detail/kernel/variants.hpp; no include guard, no includes).

template <class T, class Acc, bool QuantizedBlocks>
void attend_unit(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                 const ScoreParams<Acc>& score, Index batch_idx, Index kv_head_idx, Index q_begin,
                 Index q_end, const UnitScratch<Acc>& scratch) {
  const Index head_dim = q.shape.head_dim;
  const Index num_rows = q.shape.heads / kv.num_heads * (q_end - q_begin);
  // The scratch is 64-byte aligned, so Eigen's elementwise loops (tanh) over the tile split
  // into scalar and vector parts the same way on every call: results do not depend on memory.
  Acc* const tile = scratch.elements;                          // (num_rows, kKeyBlock)
  Acc* const keys_t = tile + num_rows * kKeyBlock;             // (kKeyBlock + 1, head_dim)
  Acc* const queries = keys_t + (kKeyBlock + 1) * head_dim;    // (num_rows, head_dim)
  Acc* const accumulators = queries + num_rows * head_dim;     // (num_rows, head_dim)
  Acc* const quantized_scratch = accumulators + num_rows * head_dim;
  const ItemRows<Acc> rows = prepare_rows(q, kv.num_heads, score, batch_idx, kv_head_idx, q_begin,
                                          q_end, queries, accumulators, scratch.states);

  if constexpr (QuantizedBlocks) {  // compiled only for caches that may hold them
    if (kv.quantized.num_blocks > 0) {
      if (kv.quantized.bits == 8)
        attend_quantized_blocks<8>(kv.quantized, mask, score, rows, quantized_scratch);
      else
        attend_quantized_blocks<4>(kv.quantized, mask, score, rows, quantized_scratch);
    }
  } else {
    (void)quantized_scratch;
  }
  // From here on the queries are read only by the T blocks' scores: in decode, dot_tile's
  // order for T (the quantized blocks, done, read them in channel order).
  if (num_rows < kTileRows)
    for (Index row = 0; row < num_rows; ++row) to_score_order<T>(queries + row * head_dim, head_dim);
  // The unit's rows sit at positions [first_t, last_t]: a block no row can see is skipped.
  const Index first_t = rows.row_position(0), last_t = rows.row_position(rows.rows_per_head - 1);
  auto block = [&](const BlockRows<T>& rows_of_block) {
    attend_block(rows, mask, score, rows_of_block, tile, keys_t);
  };
  for (int s = 0; s < kv.num_segments; ++s)
    for_each_visible_block(kv.segments[static_cast<std::size_t>(s)], mask, batch_idx, kv_head_idx,
                           first_t, last_t, block);
  if (kv.paged.length > 0)
    for_each_visible_block(kv.paged, mask, kv_head_idx, first_t, last_t, block);
}
