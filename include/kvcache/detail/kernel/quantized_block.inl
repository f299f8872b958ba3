// kvcache: the quantized blocks of a QuantSegment (KIVI, quantization.hpp) for every query row
// of a work unit, reading the codes in place and converting them to Acc in registers. Compiled
// once per variant (detail/kernel/variants.hpp; no include guard, no includes).
//
// Scores (queries already carry score.scale): with k[t][c] = kzero[c] + kscale[c] * code[t][c]
//   q . k[t] = sum_c (q[c] * kscale[c]) * code[t][c] + sum_c q[c] * kzero[c],
// so the key scales fold into the query once per block and row, the zeros into one constant.
// Values: each value row is dequantized in registers, v[t][c] = vzero[t][g] + vscale[t][g] *
// code[t][c] (one FMA per vector, the group's zero and scale broadcast), into a block of Acc
// rows that the dense value sums then read from L1: the per-token metadata is used where it is
// stored, no pass reorders it. A masked key's weight is 0 and dequantized values are finite
// (clamped as quantization.hpp's dequantizer clamps), so no key needs skipping.

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

/// rows[t][c] = the dequantized values of the n tokens of a block (row stride head_dim):
/// zero + scale * code per group, in Acc vectors where no value of the group can reach
/// kBfloat16Max, else by quantization.hpp's dequantizer (in double, clamped).
template <int Bits, class Acc>
void dequantize_values(const std::uint8_t* block, const QuantBlockFormat<Bits>& format, Index n,
                       Acc* rows) {
  using V = VecOf<Acc>;
  const Index group = format.group_size, groups = format.groups_per_token();
  const Acc limit = static_cast<Acc>(kBfloat16Max);
  const std::uint8_t* const zeros = block + format.value_zeros_offset();
  const std::uint8_t* const scales = block + format.value_scales_offset();
  for (Index t = 0; t < n; ++t) {
    const std::uint8_t* codes = block + format.value_code_row_offset(t);
    Acc* row = rows + t * format.head_dim;
    for (Index g = 0; g < groups; ++g) {
      const Acc zero = static_cast<Acc>(load_bfloat16(zeros + 2 * (t * groups + g)));
      const Acc scale = static_cast<Acc>(load_bfloat16(scales + 2 * (t * groups + g)));
      const bool may_clamp = std::abs(zero) + scale * Acc(QuantBlockFormat<Bits>::levels) >= limit;
      Index c = g * group;
      const Index end = c + group;
      if (group % V::width == 0 && !may_clamp)
        for (; c < end; c += V::width)
          V::mul_add(V::template load_codes<Bits>(codes, c), V::broadcast(scale), V::broadcast(zero))
              .store(row + c);
      for (; c < end; ++c)  // the reference's arithmetic: in double, clamped
        row[c] = dequantized<Acc>(static_cast<float>(zero), static_cast<float>(scale),
                                  unpack_code<Bits>(codes, c));
    }
  }
}

template <int Bits, class Acc>
void attend_quantized_blocks(const QuantSegment& seg, const MaskRules& mask,
                             const ScoreParams<Acc>& score, const ItemRows<Acc>& rows,
                             Acc* scratch) {
  using Source = Codes<Bits>;
  using V = VecOf<Acc>;
  const Index head_dim = rows.head_dim, num_rows = rows.num_rows;
  const QuantBlockFormat<Bits> format{seg.group_size, head_dim};
  const Index group = seg.group_size;
  const Index row_bytes = format.code_row_bytes();

  Acc* const key_scales = scratch;                       // (head_dim)
  Acc* const key_zeros = key_scales + head_dim;          // (head_dim)
  Acc* const folded = key_zeros + head_dim;              // (num_rows, head_dim)
  Acc* const zero_terms = folded + num_rows * head_dim;  // (num_rows)
  Acc* const weights = zero_terms + num_rows;            // (num_rows, group)
  Acc* const values = weights + num_rows * group;       // (group, head_dim)

  const std::uint8_t* const head_blocks = seg.blocks + rows.batch_idx * seg.batch_stride +
                                         rows.kv_head_idx * seg.head_stride;
  const Index lines = (seg.bytes_per_block + kCacheLine - 1) / kCacheLine;
  const Index lines_per_key = (lines + group - 1) / group;
  for (Index block_idx = 0; block_idx < seg.num_blocks; ++block_idx) {
    const std::uint8_t* const block = head_blocks + block_idx * seg.bytes_per_block;
    const Index first_p = seg.first_position + block_idx * group;
    const std::uint8_t* const key_codes = block + format.key_codes_offset();
    widen_bfloat16(block + format.key_scales_offset(), head_dim, key_scales);
    widen_bfloat16(block + format.key_zeros_offset(), head_dim, key_zeros);

    // Fold the key scales into each query row and the zeros into one constant per row.
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
    const std::uint8_t* const next = block_idx + 1 < seg.num_blocks ? block + seg.bytes_per_block
                                                                    : nullptr;
    score_block<Source>(folded, num_rows, head_dim, key_codes, row_bytes, group, weights, group,
                        [&](Index j) {
                          if (next == nullptr) return;
                          const Index end = std::min(lines, (j + 1) * lines_per_key);
                          for (Index line = j * lines_per_key; line < end; ++line)
                            FloatVec::prefetch(next + line * kCacheLine);
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
    dequantize_values(block, format, group, values);
    accumulate_all_rows<Stored<Acc>>(rows.accumulators, num_rows, head_dim, head_dim, weights,
                                     group, values, head_dim, group);
  }
}
