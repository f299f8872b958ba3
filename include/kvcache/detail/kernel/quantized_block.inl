// kvcache: the quantized blocks of a QuantSegment (KIVI, quantization.hpp) for every query row
// of a work unit, reading the codes in place and converting them to Acc in registers. Compiled
// once per variant (detail/kernel/variants.hpp; no include guard, no includes).
//
// Scores (queries already carry score.scale): with k[t][c] = kzero[c] + kscale[c] * code[t][c]
//   q . k[t] = sum_c (q[c] * kscale[c]) * code[t][c] + sum_c q[c] * kzero[c],
// so the key scales fold into the query once per block and row, the zeros into one constant.
// The folded query is then rounded to integers (about 15 bits per row and block: far finer
// than the 8- or 4-bit codes it multiplies) and the codes, in channel quads, enter integer
// dot-product instructions as they are stored, no widening to float and no reduction across
// lanes (docs/kernel.md, "Integer scores").
// Values: each value row is dequantized in registers, v[t][c] = vzero[t][g] + vscale[t][g] *
// code[t][c] (one FMA per vector, the group's zero and scale broadcast), into a block of Acc
// rows that the dense value sums then read from L1: the per-token metadata is used where it is
// stored, no pass reorders it. A masked key's weight is 0 and dequantized values are finite
// (clamped as quantization.hpp's dequantizer clamps), so no key needs skipping.

/// The integer scores of a block, the portable loop (and the twin of every vector path:
/// integers, so each gives the same sums): sums[r * tokens + t] = sum over the 4 * quads
/// channels c of query[r * 4 * quads + c] * key code (t, c), for num_rows rows.
template <int Bits>
void key_code_dots_portable(const KeyQuads& keys, const std::int16_t* query, Index num_rows,
                            std::int32_t* sums) {
  constexpr Index per_byte = 8 / Bits;
  constexpr unsigned levels = (1u << Bits) - 1u;
  const Index padded = 4 * keys.quads, tokens = keys.quad_rows * per_byte;
  for (Index row = 0; row < num_rows; ++row) {
    std::int32_t* out = sums + row * tokens;
    const std::int16_t* q = query + row * padded;
    std::fill_n(out, tokens, 0);
    for (Index k = 0; k < keys.quads; ++k)
      for (Index r = 0; r < keys.quad_rows; ++r) {
        const std::uint8_t* at = keys.codes + (k * keys.quad_rows + r) * 4;
        for (Index part = 0; part < per_byte; ++part) {  // int4: the high nibbles are tokens
          std::int32_t dot = 0;                          // r + quad_rows
          for (Index j = 0; j < 4; ++j)
            dot += std::int32_t(q[4 * k + j]) * std::int32_t((at[j] >> (Bits * part)) & levels);
          out[part * keys.quad_rows + r] += dot;
        }
      }
  }
}

/// The largest magnitude of an integer query word: 127 * 256, so a word splits into two
/// signed bytes (the VNNI path's w = 256 hi + lo).
inline constexpr float kLargestQueryWord = 32512;

/// The largest sum of |word| over a query row's channels for Bits-bit codes, 2^30 / levels: a
/// sum of words times codes then stays within 2^30 (plus levels * padded / 2 for the rounding),
/// and the VNNI path's 256 * (sum of high bytes times codes) within 2^31 when integer_scores_fit.
template <int Bits>
constexpr float integer_sum_limit() {
  return static_cast<float>((std::int64_t(1) << 30) / std::int64_t(QuantBlockFormat<Bits>::levels));
}

/// Whether blocks of `padded` channels can take the integer scores: levels * padded * 129 <
/// 2^30, so the rounding's half steps and the high bytes' offsets cannot reach 2^31 either
/// (padded up to 32,640 channels for int8).
template <int Bits>
constexpr bool integer_scores_fit(Index padded) {
  return Index(QuantBlockFormat<Bits>::levels) * padded * 129 < (Index(1) << 30);
}

/// The folded query rows of a block, one pass per row: folded[r][c] = q[r][c] * key_scales[c]
/// (the key scales fold into the query) and zero_terms[r] = sum_c q[r][c] * key_zeros[c] (the
/// zeros into one constant); for float also each folded row's magnitudes for integer_query,
/// tops[r] = max_c |folded[r][c]| and totals[r] = sum_c |folded[r][c]|. A NaN or infinite
/// folded value makes the total NaN or infinite: |x| is taken as max(x, -x), and vmaxps (like
/// the portable max) yields its second operand, -x, when one is NaN.
template <class Acc>
void fold_query_rows(const ItemRows<Acc>& rows, const Acc* key_scales, const Acc* key_zeros,
                     Acc* folded, Acc* zero_terms, Acc* tops, Acc* totals) {
  using V = VecOf<Acc>;
  const Index head_dim = rows.head_dim;
  const V minus_one = V::broadcast(Acc(-1));
  for (Index row = 0; row < rows.num_rows; ++row) {
    const Acc* q = rows.queries + row * head_dim;
    Acc* f = folded + row * head_dim;
    V zero_term = V::zero(), high = V::zero(), sum = V::zero();
    Index c = 0;
    for (; c + V::width <= head_dim; c += V::width) {
      const V query = V::load(q + c);
      const V x = V::mul(query, V::load(key_scales + c));
      x.store(f + c);
      zero_term = V::mul_add(query, V::load(key_zeros + c), zero_term);
      if constexpr (std::is_same_v<Acc, float>) {
        const V magnitude = V::max(x, V::mul(x, minus_one));
        high = V::max(magnitude, high);
        sum = V::add(sum, magnitude);
      }
    }
    Acc tail = 0, top = 0, total = 0;
    if constexpr (std::is_same_v<Acc, float>) {
      if (c > 0) {
        top = V::max_lanes(high);
        total = V::sum_lanes(sum);
      }
    }
    for (; c < head_dim; ++c) {
      f[c] = q[c] * key_scales[c];
      tail += q[c] * key_zeros[c];
      top = std::max(top, std::abs(f[c]));
      total += std::abs(f[c]);
    }
    zero_terms[row] = V::sum_lanes(zero_term) + tail;
    tops[row] = top;
    totals[row] = total;
  }
}

/// The folded query rows of a block as integers for the integer scores: words[r * padded + c]
/// = folded[r][c] / steps[r] rounded to the nearest integer, the step the larger of
/// max_c |folded[r][c]| / kLargestQueryWord and sum_c |folded[r][c]| / sum_limit (the second
/// only for long rows of even magnitudes: it keeps every sum of words times codes within
/// int32), so each folded value is off by at most half a step; channels [head_dim, padded)
/// are 0. tops, totals: fold_query_rows's. False when some folded value is infinite or NaN,
/// their sum overflows, or the step would underflow: such a block takes the float scores,
/// which propagate them as the reference does.
template <class V>
bool integer_query(const float* folded, const float* tops, const float* totals, Index num_rows,
                   Index head_dim, Index padded, float sum_limit, std::int16_t* words,
                   float* steps) {
  constexpr float kInfinity = std::numeric_limits<float>::infinity();
  for (Index row = 0; row < num_rows; ++row) {
    const float* f = folded + row * head_dim;
    std::int16_t* w = words + row * padded;
    const float top = tops[row], total = totals[row];
    if (!(total < kInfinity)) return false;
    // scale = 1 / step, each computed from its own quotient (both correctly rounded).
    const bool by_top = top / kLargestQueryWord >= total / sum_limit;
    const float scale = by_top ? kLargestQueryWord / top : sum_limit / total;
    if (top > 0 && !(scale < kInfinity)) return false;
    steps[row] = by_top ? top / kLargestQueryWord : total / sum_limit;
    Index c = 0;
    if (top > 0) {
      const V by = V::broadcast(scale);
      for (; c + V::width <= head_dim; c += V::width) V::mul(V::load(f + c), by).store_rounded(w + c);
      for (; c < head_dim; ++c) w[c] = static_cast<std::int16_t>(std::nearbyint(f[c] * scale));
    }
    std::fill(w + c, w + padded, std::int16_t{0});
  }
  return true;
}

/// rows[t * head_dim + c] = key code (t, c) as Acc, for every token of a block: the quads
/// read in order.
template <int Bits, class Acc>
void codes_as_rows(const KeyQuads& keys, Index head_dim, Acc* rows) {
  constexpr Index per_byte = 8 / Bits;
  constexpr unsigned levels = (1u << Bits) - 1u;
  for (Index k = 0; k < keys.quads; ++k) {
    const Index channels = std::min<Index>(4, head_dim - 4 * k);
    for (Index r = 0; r < keys.quad_rows; ++r) {
      const std::uint8_t* at = keys.codes + (k * keys.quad_rows + r) * 4;
      for (Index part = 0; part < per_byte; ++part) {
        Acc* row = rows + (part * keys.quad_rows + r) * head_dim + 4 * k;
        for (Index j = 0; j < channels; ++j) row[j] = static_cast<Acc>((at[j] >> (Bits * part)) & levels);
      }
    }
  }
}

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

/// Asks for the cache lines [first, first + lines) of a block spread over `steps` calls: call j
/// fetches its share, so a loop of `steps` iterations keeps the stream busy throughout (the
/// parts of a quantized block are not read in address order, and a block spans pages, which
/// stops the hardware prefetcher). base nullptr: nothing.
struct SpreadPrefetch {
  const std::uint8_t* base = nullptr;
  Index lines = 0;
  Index per_step = 1;

  static SpreadPrefetch of(const std::uint8_t* from, Index bytes, Index steps) {
    const Index lines = (bytes + kCacheLine - 1) / kCacheLine;
    return {from, lines, (lines + steps - 1) / steps};
  }
  void operator()(Index j) const {
    if (base == nullptr) return;
    const Index end = std::min(lines, (j + 1) * per_step);
    for (Index line = j * per_step; line < end; ++line) FloatVec::prefetch(base + line * kCacheLine);
  }
};

/// How many blocks ahead attend_quantized_blocks fetches: 2 (see there).
inline constexpr Index kQuantBlocksAhead = 2;

/// Columns [c, c + Strip * width) of acc[r] += sum_t w[r][t] * (zero[t][g] + scale[t][g] *
/// code[t][c]) for Rows rows over the n tokens of a block: each value vector is dequantized in
/// registers (one FMA, its group's zero and scale broadcast; group a multiple of the width, so a
/// vector lies in one group) and used for every row. The same operations as dequantize_values
/// followed by accumulate_rows over the dequantized rows.
template <int Rows, int Strip, int Bits, class Acc, class Prefetch>
KVCACHE_ALWAYS_INLINE void accumulate_codes_strip(Acc* const* acc, const Acc* weights,
                                                  Index weight_stride, const std::uint8_t* codes,
                                                  Index row_bytes, const Acc* scales,
                                                  const Acc* zeros, Index groups, Index group,
                                                  Index n, Index c, const Prefetch& prefetch) {
  using V = VecOf<Acc>;
  constexpr Index kWidth = V::width;
  Index group_of[count(Strip)];
  #pragma GCC unroll 16
  for (int s = 0; s < Strip; ++s) group_of[s] = (c + s * kWidth) / group;
  V lane[count(Rows)][count(Strip)];
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
    #pragma GCC unroll 16
    for (int s = 0; s < Strip; ++s) lane[r][s] = V::load(acc[r] + c + s * kWidth);
  // Invariant: lane[r][s] = acc[r][c + s * kWidth ...] plus the terms of tokens < t.
  for (Index t = 0; t < n; ++t) {
    prefetch(t);
    V v[count(Strip)];
    #pragma GCC unroll 16
    for (int s = 0; s < Strip; ++s)
      v[s] = V::mul_add(V::template load_codes<Bits>(codes + t * row_bytes, c + s * kWidth),
                        V::broadcast(scales[t * groups + group_of[s]]),
                        V::broadcast(zeros[t * groups + group_of[s]]));
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const V w = V::broadcast(weights[r * weight_stride + t]);
      #pragma GCC unroll 16
      for (int s = 0; s < Strip; ++s) lane[r][s] = V::mul_add(w, v[s], lane[r][s]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
    #pragma GCC unroll 16
    for (int s = 0; s < Strip; ++s) lane[r][s].store(acc[r] + c + s * kWidth);
}

/// accumulate_codes_strip for 4-bit codes over Pairs pairs of vectors, columns [c, c + 2 * Pairs
/// * width), each pair's 2 * width channels in one value group: accumulate_pair_strip, a pair
/// loaded by parity (V::load_nibble_pairs: the low and high nibbles of the same bytes, a mask
/// and a shift, where channel order would take a byte interleave per vector) and dequantized in
/// registers. Each element receives the operations of accumulate_codes_strip, in the same order.
template <int Rows, int Pairs, class Acc, class Prefetch>
KVCACHE_ALWAYS_INLINE void accumulate_nibble_strip(Acc* const* acc, const Acc* weights,
                                                   Index weight_stride, const std::uint8_t* codes,
                                                   Index row_bytes, const Acc* scales,
                                                   const Acc* zeros, Index groups, Index group,
                                                   Index n, Index c, const Prefetch& prefetch) {
  using V = VecOf<Acc>;
  constexpr Index kWidth = V::width;
  Index group_of[count(Pairs)];
  #pragma GCC unroll 16
  for (int p = 0; p < Pairs; ++p) group_of[p] = (c + 2 * p * kWidth) / group;
  accumulate_pair_strip<Rows, Pairs>(
      acc, weights, weight_stride, n, c, prefetch, [&](Index t, int p, V& even, V& odd) {
        V::load_nibble_pairs(codes + t * row_bytes, c + 2 * p * kWidth, even, odd);
        const V scale = V::broadcast(scales[t * groups + group_of[p]]);
        const V zero = V::broadcast(zeros[t * groups + group_of[p]]);
        even = V::mul_add(even, scale, zero);
        odd = V::mul_add(odd, scale, zero);
      });
}

/// acc += P V for every row of a unit over the n tokens of a block whose value groups are whole
/// vectors (head_dim and group multiples of the width), dequantizing in registers:
/// accumulate_codes_strip over strips of V::accumulator_strip vectors (int4 with groups of a
/// multiple of 2 x width: accumulate_nibble_strip over pairs of vectors), four rows at a time,
/// then one. The first pass over the tokens runs `prefetch` token by token.
template <int Bits, class Acc, class Prefetch>
void accumulate_codes(const ItemRows<Acc>& rows, const Acc* weights, Index weight_stride,
                      const std::uint8_t* codes, Index row_bytes, const Acc* scales,
                      const Acc* zeros, Index group, Index n, const Prefetch& prefetch) {
  using V = VecOf<Acc>;
  constexpr int kStrip = V::accumulator_strip;
  const Index head_dim = rows.head_dim, groups = head_dim / group;
  const SpreadPrefetch none{};
  for_row_groups<4>(rows.num_rows, [&](auto rows_tag, Index row) {
    constexpr int kRows = decltype(rows_tag)::value;
    bool first = row == 0;
    Acc* acc[count(kRows)];
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) acc[r] = rows.accumulators + (row + r) * head_dim;
    const Acc* w = weights + row * weight_stride;
    Index c = 0;
    if constexpr (Bits == 4) {
      // Pairs of vectors by parity where a pair lies in one group (the default group 32 with
      // 16 or 8 lanes): kStrip vectors at a time, then one pair.
      constexpr int kPairs = kStrip / 2 > 0 ? kStrip / 2 : 1;
      auto pairs = [&](auto pairs_tag) {
        constexpr int kCount = decltype(pairs_tag)::value;
        for (; c + 2 * kCount * V::width <= head_dim; c += 2 * kCount * V::width, first = false) {
          if (first)
            accumulate_nibble_strip<kRows, kCount>(acc, w, weight_stride, codes, row_bytes, scales,
                                                   zeros, groups, group, n, c, prefetch);
          else
            accumulate_nibble_strip<kRows, kCount>(acc, w, weight_stride, codes, row_bytes, scales,
                                                   zeros, groups, group, n, c, none);
        }
      };
      if (group % (2 * V::width) == 0) {
        pairs(std::integral_constant<int, kPairs>{});
        if constexpr (kPairs > 1) pairs(std::integral_constant<int, 1>{});
      }
    }
    for (; c + kStrip * V::width <= head_dim; c += kStrip * V::width, first = false) {
      if (first)
        accumulate_codes_strip<kRows, kStrip, Bits>(acc, w, weight_stride, codes, row_bytes,
                                                    scales, zeros, groups, group, n, c, prefetch);
      else
        accumulate_codes_strip<kRows, kStrip, Bits>(acc, w, weight_stride, codes, row_bytes,
                                                    scales, zeros, groups, group, n, c, none);
    }
    for (; c < head_dim; c += V::width, first = false) {
      if (first)
        accumulate_codes_strip<kRows, 1, Bits>(acc, w, weight_stride, codes, row_bytes, scales,
                                               zeros, groups, group, n, c, prefetch);
      else
        accumulate_codes_strip<kRows, 1, Bits>(acc, w, weight_stride, codes, row_bytes, scales,
                                               zeros, groups, group, n, c, none);
    }
  });
}

/// Whether some value group of a block can dequantize to kBfloat16Max or beyond in magnitude
/// (|zero| + scale * levels, the largest it can reach): such a block takes dequantize_values,
/// which clamps as the reference dequantizer does.
template <int Bits, class Acc>
bool may_need_clamp(const Acc* scales, const Acc* zeros, Index count) {
  using V = VecOf<Acc>;
  const Acc levels = Acc(QuantBlockFormat<Bits>::levels);
  Acc reach = 0;
  Index i = 0;
  if (count >= V::width) {
    V high = V::zero();
    const V top = V::broadcast(levels), minus_one = V::broadcast(Acc(-1));
    for (; i + V::width <= count; i += V::width) {
      const V scale = V::load(scales + i), zero = V::load(zeros + i);
      // scale * levels + |zero|, |zero| = max(zero, -zero): an infinite scale and zero give
      // inf (not inf - inf = NaN, which the max would drop), as in the scalar tail.
      const V magnitude = V::max(zero, V::mul(zero, minus_one));
      high = V::max(V::mul_add(scale, top, magnitude), high);
    }
    reach = V::max_lanes(high);  // no lane is NaN: vmaxps keeps `high`'s lane over a NaN
  }
  for (; i < count; ++i) reach = std::max(reach, scales[i] * levels + std::abs(zeros[i]));
  return !(reach < static_cast<Acc>(kBfloat16Max));
}

template <int Bits, class Acc>
void attend_quantized_blocks(const QuantSegment& seg, const MaskRules& mask,
                             const ScoreParams<Acc>& score, const ItemRows<Acc>& rows,
                             Acc* scratch) {
  using V = VecOf<Acc>;
  const Index head_dim = rows.head_dim, num_rows = rows.num_rows;
  const QuantBlockFormat<Bits> format{seg.group_size, head_dim};
  const Index group = seg.group_size;
  const Index row_bytes = format.code_row_bytes();
  const Index padded = 4 * format.key_quads();

  Acc* const key_scales = scratch;                       // (head_dim)
  Acc* const key_zeros = key_scales + head_dim;          // (head_dim)
  Acc* const folded = key_zeros + head_dim;              // (num_rows, head_dim)
  Acc* const zero_terms = folded + num_rows * head_dim;  // (num_rows)
  Acc* const weights = zero_terms + num_rows;            // (num_rows, group)
  Acc* const value_scales = weights + num_rows * group;  // (group, groups): as stored
  Acc* const value_zeros = value_scales + head_dim;      // (group, groups)
  Acc* const values = value_zeros + head_dim;            // (group, head_dim)
  // The integer scores (float only): steps (num_rows), words (num_rows, padded) int16 and
  // their bytes (2 x num_rows x padded) in num_rows * padded elements, sums (num_rows, group).
  Acc* const steps = values + group * head_dim;
  auto* const words = reinterpret_cast<std::int16_t*>(steps + num_rows);
  auto* const split = reinterpret_cast<std::int8_t*>(words + num_rows * padded);
  auto* const sums = reinterpret_cast<std::int32_t*>(steps + num_rows + num_rows * padded);
  // The folded rows' magnitudes (num_rows each).
  Acc* const tops = steps + num_rows + num_rows * padded + num_rows * group;
  Acc* const totals = tops + num_rows;
  const bool integer_scores = std::is_same_v<Acc, float> && integer_scores_fit<Bits>(padded);
  // Values dequantize in registers when a vector lies in one value group.
  const bool whole_vectors = group % V::width == 0 && head_dim % V::width == 0;

  const std::uint8_t* const head_blocks = seg.blocks + rows.batch_idx * seg.batch_stride +
                                         rows.kv_head_idx * seg.head_stride;
  // Block b + kQuantBlocksAhead is fetched while block b is computed: its first half of lines
  // during the scores, a share per key quad, the rest during the value sums, a share per token.
  // A line then arrives a whole block's time (~0.5 us at D 128) before it is used; fetched one
  // block ahead, the last lines asked for (the next block's key scales) were still on their way
  // from DRAM when the next block began with them. The first blocks are asked for up front.
  const Index block_bytes = seg.bytes_per_block;
  // Whole lines, and never past the block (a block of fewer than 64 bytes is all first half).
  const Index half_block =
      std::min(block_bytes, (block_bytes / 2 + kCacheLine - 1) / kCacheLine * kCacheLine);
  for (Index b = 0; b < std::min<Index>(kQuantBlocksAhead, seg.num_blocks); ++b)
    SpreadPrefetch::of(head_blocks + b * block_bytes, block_bytes, 1)(0);
  for (Index block_idx = 0; block_idx < seg.num_blocks; ++block_idx) {
    const std::uint8_t* const block = head_blocks + block_idx * block_bytes;
    const Index first_p = seg.first_position + block_idx * group;
    const KeyQuads keys{block + format.key_codes_offset(), format.key_quads(), format.key_quad_rows()};
    widen_bfloat16(block + format.key_scales_offset(), head_dim, key_scales);
    widen_bfloat16(block + format.key_zeros_offset(), head_dim, key_zeros);

    fold_query_rows(rows, key_scales, key_zeros, folded, zero_terms, tops, totals);
    // Scores: the key codes are read once for all rows.
    const std::uint8_t* const ahead = block_idx + kQuantBlocksAhead < seg.num_blocks
                                          ? block + kQuantBlocksAhead * block_bytes
                                          : nullptr;
    const SpreadPrefetch first_half = SpreadPrefetch::of(ahead, half_block, keys.quads);
    bool scored = false;
    if constexpr (std::is_same_v<Acc, float>) {
      // Integer dot products of the folded query, rounded to steps, with the codes; times the
      // step they are the scores to within half a step per channel.
      if (integer_scores && integer_query<V>(folded, tops, totals, num_rows, head_dim, padded,
                                             integer_sum_limit<Bits>(), words, steps)) {
        if (!V::template key_code_dots<Bits>(keys, words, num_rows, sums, split, first_half)) {
          key_code_dots_portable<Bits>(keys, words, num_rows, sums);
          for (Index k = 0; k < keys.quads; ++k) first_half(k);
        }
        // The scores: sum times step plus the zero term, in one pass.
        for (Index row = 0; row < num_rows; ++row) {
          const std::int32_t* from = sums + row * group;
          Acc* w = weights + row * group;
          const V step = V::broadcast(steps[row]), zero_term = V::broadcast(zero_terms[row]);
          Index j = 0;
          for (; j + V::width <= group; j += V::width)
            V::mul_add(V::load(from + j), step, zero_term).store(w + j);
          for (; j < group; ++j) w[j] = static_cast<Acc>(from[j]) * steps[row] + zero_terms[row];
        }
        scored = true;
      }
    }
    if (!scored) {
      // double, or a float block whose folded query is not finite: the codes as Acc rows (in
      // `values`, free until the value phase), then the T blocks' tiles over them.
      codes_as_rows<Bits>(keys, head_dim, values);
      score_block<Stored<Acc>>(folded, num_rows, head_dim, RowsOf<Acc>{nullptr, values, head_dim},
                               group, weights, group, SpreadPrefetch::of(ahead, half_block, group));
      for (Index row = 0; row < num_rows; ++row) {
        // In vectors: softmax_step reads the scores back as vectors, which scalar stores would
        // keep waiting on store forwarding.
        Acc* w = weights + row * group;
        const V zero_term = V::broadcast(zero_terms[row]);
        Index j = 0;
        for (; j + V::width <= group; j += V::width) V::add(V::load(w + j), zero_term).store(w + j);
        for (; j < group; ++j) w[j] += zero_terms[row];
      }
    }
    // Online softmax update per row; weights become exp(s - max), 0 where masked.
    for (Index row = 0; row < num_rows; ++row) {
      Acc* w = weights + row * group;
      if (score.softcap > 0) {
        Eigen::Map<Eigen::Array<Acc, 1, Eigen::Dynamic>> s_row(w, group);
        s_row = score.softcap * (s_row * (Acc(1) / score.softcap)).tanh();
      }
      softmax_step(rows, row, mask, score, w, group, first_p);
    }
    const SpreadPrefetch second_half =
        SpreadPrefetch::of(ahead == nullptr ? nullptr : ahead + half_block, block_bytes - half_block, group);
    widen_bfloat16(block + format.value_scales_offset(), head_dim, value_scales);
    widen_bfloat16(block + format.value_zeros_offset(), head_dim, value_zeros);
    if (whole_vectors && !may_need_clamp<Bits>(value_scales, value_zeros, head_dim)) {
      accumulate_codes<Bits>(rows, weights, group, block + format.value_codes_offset(), row_bytes,
                             value_scales, value_zeros, group, group, second_half);
    } else {
      for (Index t = 0; t < group; ++t) second_half(t);
      dequantize_values(block, format, group, values);
      accumulate_all_rows<Stored<Acc>>(rows.accumulators, num_rows, head_dim, head_dim, weights,
                                       group, RowsOf<Acc>{nullptr, values, head_dim}, group);
    }
  }
}
