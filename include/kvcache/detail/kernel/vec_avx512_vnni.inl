// kvcache: the integer scores of a quantized block with AVX-512 VNNI (vpdpbusd). Included by
// detail/kernel/variants.hpp only, inside namespace kvcache::detail::isa_avx512_vnni and a
// region compiled for the AVX-512 variant's target plus "avx512vnni"; the AVX-512 variant calls
// it when the CPU has VNNI (Isa::kAvx512Vnni). Only this function needs the instruction, so only
// it is compiled for it: the rest of the AVX-512 variant runs on AVX-512 CPUs without VNNI.
// (No include guard: the region includes it once; no includes: variants.hpp brings them.)

/// acc + vpdpbusd(codes, the 4 signed bytes at `four` broadcast). Inline assembly under g++ and
/// clang: the broadcast rides in the instruction's memory operand ({1to16}), and the
/// accumulator stays in its register (g++ 12 copies each accumulator out and back around the
/// intrinsic, which doubled the loop's instructions).
KVCACHE_ALWAYS_INLINE __m512i dot_bytes(__m512i acc, __m512i codes, const std::int8_t* four) {
#if defined(__GNUC__) || defined(__clang__)
  __asm__("vpdpbusd %2%{1to16%}, %1, %0"
          : "+v"(acc)
          : "v"(codes), "m"(*reinterpret_cast<const std::int32_t*>(four)));
  return acc;
#else
  std::int32_t bytes;
  std::memcpy(&bytes, four, sizeof bytes);
  return _mm512_dpbusd_epi32(acc, codes, _mm512_set1_epi32(bytes));
#endif
}

/// key_code_dots for rows [row, row + Rows) (the contract: isa_avx2::FloatVec::key_code_dots).
/// vpdpbusd multiplies unsigned bytes by signed bytes, four to a 32-bit lane, and adds them to
/// the lane: one 64-byte load of a quad is 16 token rows x 4 codes, so lane m sums token m's 4
/// channels, no reduction across lanes. The 16-bit query words are split into signed bytes,
/// w = 256 hi + lo (lo = w's low byte as signed, hi = (w - lo) / 256, both in [-128, 127] for
/// |w| <= 32640): one dot with each, combined as 256 hi_sum + lo_sum, the exact sum.
template <int Bits, int Rows, class Prefetch>
void code_dot_rows(const KeyQuads& keys, const std::int8_t* low, const std::int8_t* high,
                   Index row, std::int32_t* sums, const Prefetch& prefetch, bool first) {
  const Index padded = 4 * keys.quads, tokens = keys.quad_rows * (8 / Bits);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  // Vectors of 16 token rows per step: int8 two loads (32 rows) when they fit, int4 one load's
  // two nibbles.
  constexpr int kVectors = 2;
  const Index rows_per_step = Bits == 8 ? 32 : 16;
  for (Index r0 = 0; r0 < keys.quad_rows; r0 += rows_per_step) {
    const bool whole = Bits == 4 || r0 + 32 <= keys.quad_rows;  // int8: a second load fits
    __m512i acc_low[count(Rows)][count(kVectors)], acc_high[count(Rows)][count(kVectors)];
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r)
      #pragma GCC unroll 16
      for (int i = 0; i < kVectors; ++i) acc_low[r][i] = acc_high[r][i] = _mm512_setzero_si512();
    // Invariant: lane m of acc_low[r][i] (acc_high) = the sum over quads < k of token
    // (vector i, m)'s 4 codes times the row's low (high) query bytes.
    for (Index k = 0; k < keys.quads; ++k) {
      if (first && r0 == 0) prefetch(k);
      const std::uint8_t* at = keys.codes + (k * keys.quad_rows + r0) * 4;
      __m512i codes[count(kVectors)];
      if constexpr (Bits == 8) {
        codes[0] = _mm512_loadu_si512(at);
        codes[1] = whole ? _mm512_loadu_si512(at + 64) : codes[0];
      } else {
        const __m512i bytes = _mm512_loadu_si512(at);
        codes[0] = _mm512_and_si512(bytes, nibble);
        codes[1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      }
      #pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r) {
        const std::int8_t* const q_low = low + (row + r) * padded + 4 * k;
        const std::int8_t* const q_high = high + (row + r) * padded + 4 * k;
        #pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) {
          acc_low[r][i] = dot_bytes(acc_low[r][i], codes[i], q_low);
          acc_high[r][i] = dot_bytes(acc_high[r][i], codes[i], q_high);
        }
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r)
      #pragma GCC unroll 16
      for (int i = 0; i < kVectors; ++i) {
        if (i == 1 && !whole) break;
        const __m512i dots = _mm512_add_epi32(_mm512_maskz_slli_epi32(__mmask16(0xFFFF), acc_high[r][i], 8), acc_low[r][i]);
        const Index token = Bits == 8 ? r0 + 16 * i : r0 + i * keys.quad_rows;
        _mm512_storeu_si512(sums + (row + r) * tokens + token, dots);
      }
  }
}

/// The integer scores of a block with vpdpbusd; false (nothing written) when the quad rows are
/// not a multiple of 16. split: 2 * num_rows * 4 * quads bytes of scratch for the query bytes.
template <int Bits, class Prefetch>
bool key_code_dots(const KeyQuads& keys, const std::int16_t* query, Index num_rows,
                   std::int32_t* sums, std::int8_t* split, const Prefetch& prefetch) {
  if (keys.quad_rows % 16 != 0) return false;
  const Index words = num_rows * 4 * keys.quads;
  std::int8_t* const low = split;
  std::int8_t* const high = split + words;
  // Split every word: 32 at a time, the last ones under a mask.
  for (Index i = 0; i < words; i += 32) {
    const Index left = std::min<Index>(32, words - i);
    const __mmask32 lanes = left == 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    const __m512i w = _mm512_maskz_loadu_epi16(lanes, query + i);
    const __m512i lo = _mm512_srai_epi16(_mm512_slli_epi16(w, 8), 8);
    const __m512i hi = _mm512_srai_epi16(_mm512_sub_epi16(w, lo), 8);
    _mm256_mask_storeu_epi8(low + i, lanes, _mm512_maskz_cvtepi16_epi8(lanes, lo));
    _mm256_mask_storeu_epi8(high + i, lanes, _mm512_maskz_cvtepi16_epi8(lanes, hi));
  }
  for_row_groups<4>(num_rows, [&](auto rows, Index row) {
    code_dot_rows<Bits, decltype(rows)::value>(keys, low, high, row, sums, prefetch, row == 0);
  });
  return true;
}
