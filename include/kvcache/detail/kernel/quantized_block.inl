// kvcache: the quantized blocks of a QuantSegment (KIVI, quantization.hpp) for every query row
// of a work unit, reading the codes in place and converting them to Acc in registers. Compiled
// once per variant (detail/kernel/variants.hpp; no include guard, no includes).
//
// Scores (queries already carry score.scale): with k[t][c] = kzero[c] + kscale[c] * code[t][c]
//   q . k[t] = sum_c (q[c] * kscale[c]) * code[t][c] + sum_c q[c] * kzero[c],
// so the key scales fold into the query once per block and row, the zeros into one constant.
// Values: with v[t][c] = vzero[t][g] + vscale[t][g] * code[t][c] (g = c / group_size),
//   sum_t w_t v[t][c] = sum_t (w_t * vscale[t][g]) * code[t][c] + sum_t w_t * vzero[t][g],
// so the value scales fold into the weights and the zeros into one sum per group. A masked
// key's weight is 0 and codes are finite, so no key needs skipping.

/// dst[i] = the n bfloat16 numbers at `from` (little-endian bytes), widened to Acc.
template <class Acc>
void widen_bfloat16(const std::uint8_t* from, Index n, Acc* dst) {
  using V = VecOf<Acc>;
  const auto* numbers = reinterpret_cast<const Eigen::bfloat16*>(from);
  Index i = 0;
  if constexpr (std::is_same_v<Acc, float>)
    for (; i + V::width <= n; i += V::width) V::load(numbers + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<Acc>(load_bfloat16(from + 2 * i));
}

template <int Bits, class Acc>
void attend_quantized_blocks(const QuantSegment& seg, const MaskRules& mask,
                             const ScoreParams<Acc>& score, const ItemRows<Acc>& rows,
                             Acc* scratch) {
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
  const Index lines = (seg.bytes_per_block + kCacheLine - 1) / kCacheLine;
  const Index lines_per_key = (lines + group - 1) / group;
  for (Index block_idx = 0; block_idx < seg.num_blocks; ++block_idx) {
    const std::uint8_t* const block = head_blocks + block_idx * seg.bytes_per_block;
    const Index first_p = seg.first_position + block_idx * group;
    const std::uint8_t* const key_codes = block + format.key_codes_offset();
    const std::uint8_t* const value_codes = block + format.value_codes_offset();
    // Each metadata run is head_dim bfloat16 numbers. Value ones are stored token-major
    // (j * groups + g) and used group-major (g * group + j): widen, then transpose.
    widen_bfloat16(block + format.key_scales_offset(), head_dim, key_scales);
    widen_bfloat16(block + format.key_zeros_offset(), head_dim, key_zeros);
    if (groups == 1) {
      widen_bfloat16(block + format.value_scales_offset(), group, value_scales);
      widen_bfloat16(block + format.value_zeros_offset(), group, value_zeros);
    } else {
      widen_bfloat16(block + format.value_scales_offset(), group * groups, staging);
      widen_bfloat16(block + format.value_zeros_offset(), group * groups, staging + head_dim);
      for (Index j = 0; j < group; ++j)
        for (Index g = 0; g < groups; ++g) {
          value_scales[g * group + j] = staging[j * groups + g];
          value_zeros[g * group + j] = staging[head_dim + j * groups + g];
        }
    }

    // Fold the key scales into each query row and the zeros into one constant per row.
    using V = VecOf<Acc>;
    for (Index row = 0; row < num_rows; ++row) {
      const Acc* q = rows.queries + row * head_dim;
      Acc* f = folded + row * head_dim;
      Index c = 0;
      for (; c + V::width <= head_dim; c += V::width)
        V::mul(V::load(q + c), V::load(key_scales + c)).store(f + c);
      for (; c < head_dim; ++c) f[c] = q[c] * key_scales[c];
    }
    score_block<Stored<Acc>>(rows.queries, num_rows, head_dim, key_zeros, 0, 1, zero_terms, 1,
                             [](Index) {});
    // Scores: each key code row is read once for every row. Meanwhile the next block is
    // fetched, a share per key: its parts are not read in address order, and it spans pages,
    // which stops the hardware prefetcher.
    const bool has_next = block_idx + 1 < seg.num_blocks;
    score_block<Source>(folded, num_rows, head_dim, key_codes, row_bytes, group, weights, group,
                        [&](Index j) {
                          if (!has_next) return;
                          for (Index line = j * lines_per_key;
                               line < std::min(lines, (j + 1) * lines_per_key); ++line)
                            FloatVec::prefetch(block + seg.bytes_per_block + line * kCacheLine);
                        });
    // Online softmax update per row; weights become exp(s - max), 0 where masked.
    for (Index row = 0; row < num_rows; ++row) {
      Acc* w = weights + row * group;
      for (Index j = 0; j < group; ++j) w[j] += zero_terms[row];
      if (score.softcap > 0) {
        Eigen::Map<Eigen::Array<Acc, 1, Eigen::Dynamic>> s_row(w, group);
        s_row = score.softcap * (s_row * (Acc(1) / score.softcap)).tanh();
      }
      softmax_step(rows, row, mask, score, w, group, first_p);
    }
    // Values, one group of channels at a time: acc[c] += sum_j (w_j * vscale[j][g]) * code[j][c]
    // + sum_j w_j * vzero[j][g].
    for (Index g = 0; g < groups; ++g)
      score_block<Stored<Acc>>(weights, num_rows, group, value_zeros + g * group, 0, 1,
                               zero_sums + g, groups, [](Index) {});
    for (Index g = 0; g < groups; ++g) {
      const Acc* scales = value_scales + g * group;
      for (Index row = 0; row < num_rows; ++row) {
        const Acc* w = weights + row * group;
        Acc* sw = scaled + row * group;
        Index j = 0;
        for (; j + V::width <= group; j += V::width)
          V::mul(V::load(w + j), V::load(scales + j)).store(sw + j);
        for (; j < group; ++j) sw[j] = w[j] * scales[j];
      }
      // Accumulators of group g: row r's at accumulators + r * head_dim + g * group.
      accumulate_all_rows<Source>(rows.accumulators + g * group, num_rows, head_dim, group, scaled,
                                  group, value_codes + g * group * Bits / 8, row_bytes, group);
    }
    for (Index row = 0; row < num_rows; ++row)
      for (Index g = 0; g < groups; ++g) {
        Acc* acc = rows.accumulators + row * head_dim + g * group;
        const Acc zero_sum = zero_sums[row * groups + g];
        for (Index c = 0; c < group; ++c) acc[c] += zero_sum;
      }
  }
}
