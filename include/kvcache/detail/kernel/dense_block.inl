// kvcache: one block of up to kKeyBlock keys/values of T (float, double, half, bfloat16) for
// every query row of a work unit - scores, masking, softcap, the online-softmax step, the value
// sums - in the variant's vectors. Compiled once per variant (detail/kernel/variants.hpp; no
// include guard, no includes).

/// The online-softmax step of one query row over one block of n keys at positions first_p, ...
/// whose scores (softcap applied) are at `scores`: masks them, raises the row's running max,
/// and turns them into the weights of the value sums, exp(s - max) * value_scale, exactly 0 for
/// a masked key; the row's sum gets the unscaled weights. A row that sees no key of the block
/// gets all-zero weights and an unchanged state.
template <class Acc>
void softmax_step(const ItemRows<Acc>& rows, Index row, const MaskRules& mask,
                  const ScoreParams<Acc>& score, Acc* scores, Index n, Index first_p) {
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  const Index t = rows.row_position(row);
  if (mask.per_key(first_p)) {
    for (Index j = 0; j < n; ++j)
      if (!mask.visible(rows.batch_idx, t, first_p + j)) scores[j] = minus_infinity;
  } else {
    Index begin, end;
    mask.visible_range(t, first_p, n, begin, end);
    for (Index j = 0; j < begin; ++j) scores[j] = minus_infinity;
    for (Index j = end; j < n; ++j) scores[j] = minus_infinity;
  }
  const Acc block_max = max_score(scores, n);
  if (block_max == minus_infinity) {  // nothing visible
    for (Index j = 0; j < n; ++j) scores[j] = Acc(0);
    return;
  }
  SoftmaxState<Acc>& state = rows.states[row];
  state.rescale(std::max(state.max, block_max), rows.head_dim);
  // Invariant: state.sum, state.acc are relative to state.max >= every score so far.
  state.sum += exp_weights(scores, n, state.max);
  if (score.value_scale != Acc(1))
    for (Index j = 0; j < n; ++j) scores[j] *= score.value_scale;
}

/// score = softcap * tanh(score / softcap) over rows x n of a tile (row stride kKeyBlock).
template <class Acc>
void apply_softcap(Acc* tile, Index num_rows, Index n, Acc softcap) {
  using RowMatrix = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<RowMatrix, Eigen::Unaligned, Eigen::OuterStride<>> s(tile, num_rows, n,
                                                                   Eigen::OuterStride<>(kKeyBlock));
  s = softcap * (s.array() * (Acc(1) / softcap)).tanh().matrix();
}

/// Scores of a block for fewer than kTileRows rows (decode), in place (score_block): each key
/// row is read once, for every row of the unit. Before key j's tile, value row j of this block
/// is fetched (and block_values fetches the next block's key rows the same way): each stream
/// arrives one phase before it is used, and each phase keeps the bus busy during its
/// arithmetic.
///
/// A next block that does not follow this one in memory (the next run of a paged sequence's
/// pool blocks) gets no help from the hardware prefetcher, which has just been streaming past
/// this block's end: its keys are fetched from this phase on too, a phase earlier.
template <class T, class Acc>
void decode_scores(const ItemRows<Acc>& rows, const BlockRows<T>& block, Acc* tile) {
  const RowPrefetch<T> values = prefetch_rows(block.values, block.length, rows.head_dim);
  if (block.next_length == 0 || block.next_follows()) {
    score_block<Stored<T>>(rows.queries, rows.num_rows, rows.head_dim, block.keys, block.length,
                           tile, kKeyBlock, values);
    return;
  }
  const RowPrefetch<T> next_keys = prefetch_rows(block.next_keys, block.next_length, rows.head_dim);
  score_block<Stored<T>>(rows.queries, rows.num_rows, rows.head_dim, block.keys, block.length,
                         tile, kKeyBlock, [&](Index j) {
                           values(j);
                           next_keys(j);
                         });
}

/// Whether every element of the value rows of a block is finite (a masked key's weight is 0,
/// and 0 * inf is NaN: such a block must skip masked keys one by one).
template <class Acc, class T>
bool all_finite(const BlockRows<T>& block, Index head_dim) {
  for (Index j = 0; j < block.length; ++j)
    for (Index c = 0; c < head_dim; ++c)
      if (!(Eigen::numext::isfinite)(static_cast<Acc>(block.values(j)[c]))) return false;
  return true;
}

/// acc += P V for the rows of a unit, P the block's weights (zero for masked keys). When some
/// weight is zero and the block holds a non-finite value, zero weights are skipped key by key,
/// so a masked inf or NaN value cannot reach a row; otherwise accumulate_all_rows.
template <class T, class Acc>
void block_values(const ItemRows<Acc>& rows, const Acc* weights, const BlockRows<T>& block) {
  const Index head_dim = rows.head_dim, n = block.length;
  bool has_zero = false;
  for (Index row = 0; row < rows.num_rows && !has_zero; ++row)
    has_zero = any_zero_weight(weights + row * kKeyBlock, n);
  if (!has_zero || all_finite<Acc>(block, head_dim)) {
    accumulate_all_rows<Stored<T>>(rows.accumulators, rows.num_rows, head_dim, head_dim, weights,
                                   kKeyBlock, block.values, n,
                                   prefetch_rows(block.next_keys, block.next_length, head_dim));
    return;
  }
  for (Index row = 0; row < rows.num_rows; ++row) {
    Acc* acc[1] = {rows.accumulators + row * head_dim};
    for (Index j = 0; j < n; ++j) {
      const Acc weight = weights[row * kKeyBlock + j];
      if (weight != Acc(0)) axpy_rows<1>(acc, &weight, block.values(j), head_dim);
    }
  }
}

/// One block of keys/values of T for every row of a unit: scores (decode: dot products in
/// place; prefill: a tile over the keys transposed into `keys_t`, kKeyBlock x head_dim plus a
/// head_dim row buffer), softcap, the online softmax per row, then acc += P V; the next block
/// is prefetched meanwhile.
template <class T, class Acc>
void attend_block(const ItemRows<Acc>& rows, const MaskRules& mask, const ScoreParams<Acc>& score,
                  const BlockRows<T>& block, Acc* tile, Acc* keys_t) {
  const Index n = block.length;
  if (rows.num_rows >= kTileRows) {
    transpose_keys(block.keys, n, rows.head_dim, keys_t, keys_t + kKeyBlock * rows.head_dim);
    tile_scores(rows.queries, rows.num_rows, rows.head_dim, keys_t, n, tile);
  } else {
    decode_scores(rows, block, tile);
  }
  if (score.softcap > 0) apply_softcap(tile, rows.num_rows, n, score.softcap);
  for (Index row = 0; row < rows.num_rows; ++row)
    softmax_step(rows, row, mask, score, tile + row * kKeyBlock, n, block.first_position);
  block_values(rows, tile, block);
}
