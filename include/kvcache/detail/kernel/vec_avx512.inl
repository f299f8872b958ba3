// kvcache: the AVX-512 float vector (16 lanes). Included by detail/kernel/variants.hpp only,
// inside namespace kvcache::detail::isa_avx512 and a region compiled for
// "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c".
// (No include guard: the region includes it once; no includes: variants.hpp brings them.)

// The zero-masked forms with every lane selected (kAll) compile to the same instructions as the
// plain ones; g++ 12 reports the plain ones' _mm512_undefined_* starting values as
// uninitialized once inlined (a false positive that #pragma GCC diagnostic cannot silence
// through a precompiled header).
struct FloatVec {
  using Scalar = float;
  static constexpr Index width = 16;
  static constexpr __mmask16 kAll = 0xFFFF;
  __m512 v;

  static FloatVec broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static FloatVec zero() { return {_mm512_setzero_ps()}; }
  static FloatVec load(const float* from) { return {_mm512_loadu_ps(from)}; }
  static FloatVec load(const Eigen::half* from) {
    return {_mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)))};
  }
  static FloatVec load(const Eigen::bfloat16* from) {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
    return {_mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, _mm512_maskz_cvtepu16_epi32(kAll, halves), 16))};
  }
  /// Elements 0 .. 31 of a bfloat16 row split by parity, exactly: even lane i = element 2i,
  /// odd lane i = element 2i + 1. Each 32-bit word holds a pair (the even one in its low half),
  /// so a shift and a mask widen 32 elements where widening in order takes two zero-extends
  /// and two shifts.
  static void load_pairs(const Eigen::bfloat16* from, FloatVec& even, FloatVec& odd) {
    const __m512i words = _mm512_loadu_si512(from);
    even = {_mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, words, 16))};
    odd = {_mm512_castsi512_ps(_mm512_and_si512(words, _mm512_set1_epi32(-65536)))};
  }
  /// Asks for the cache line holding `address` (a hint; never faults). Inline assembly: once
  /// Eigen's headers are in, g++ 12 emits nothing for __builtin_prefetch or _mm_prefetch
  /// inside a target region.
  static void prefetch(const void* address) {
#if defined(__GNUC__) || defined(__clang__)
    __asm__ volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(address)));
#else
    _mm_prefetch(static_cast<const char*>(address), _MM_HINT_T0);
#endif
  }
  /// Sixteen int32 converted to float (exact below 2^24, else rounded to nearest).
  static FloatVec load(const std::int32_t* from) {
    return {_mm512_maskz_cvtepi32_ps(kAll, _mm512_loadu_si512(from))};
  }
  void store(float* to) const { _mm512_storeu_ps(to, v); }
  /// The lanes rounded to the nearest integer (ties to even) as int16. Requires |lane| < 32768.
  void store_rounded(std::int16_t* to) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to),
                        _mm512_maskz_cvtepi32_epi16(kAll, _mm512_maskz_cvtps_epi32(kAll, v)));
  }

  /// The integer scores of a block (isa_avx2::FloatVec::key_code_dots has the contract): with
  /// AVX-512 VNNI, vpdpbusd on 64 codes at a time (detail/kernel/vec_avx512_vnni.inl); without
  /// (Skylake-SP generation), the AVX2 variant's vpmaddwd loop on 512-bit vectors: a 64-byte
  /// load is 16 token rows, widened to two vectors of 8 tokens' 16-bit codes. Quad rows not a
  /// multiple of 16 take the AVX2 loop itself (with or without VNNI).
  template <int Bits, class Prefetch>
  static bool key_code_dots(const KeyQuads& keys, const std::int16_t* query, Index num_rows,
                            std::int32_t* sums, std::int8_t* split, const Prefetch& prefetch) {
    if (selected_isa() == Isa::kAvx512Vnni && keys.quad_rows % 16 == 0)
      return isa_avx512_vnni::key_code_dots<Bits>(keys, query, num_rows, sums, split, prefetch);
    if (keys.quad_rows % 16 != 0)
      return isa_avx2::FloatVec::key_code_dots<Bits>(keys, query, num_rows, sums, split, prefetch);
    for_row_groups<4>(num_rows, [&](auto rows, Index row) {
      code_dot_rows<Bits, decltype(rows)::value>(keys, query, row, sums, prefetch, row == 0);
    });
    return true;
  }

  /// Channels c .. c + 15 of a row of codes (PortableVec::load_codes for the nibble order).
  template <int Bits>
  static FloatVec load_codes(const std::uint8_t* row, Index c) {
    if constexpr (Bits == 8) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c));
      return {_mm512_maskz_cvtepi32_ps(kAll, _mm512_maskz_cvtepu8_epi32(kAll, bytes))};
    } else {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c / 2));
      const __m128i nibble = _mm_set1_epi8(0x0F);
      const __m128i low = _mm_and_si128(bytes, nibble);
      const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      return {_mm512_maskz_cvtepi32_ps(kAll, _mm512_maskz_cvtepu8_epi32(kAll, _mm_unpacklo_epi8(low, high)))};
    }
  }

  /// The 4-bit codes of channels c .. c + 31 of a code row (c even), by parity: even lane i =
  /// channel c + 2i, odd lane i = channel c + 2i + 1 - the low and high nibbles of byte
  /// c / 2 + i, so one 16-byte load, a mask and a shift, no byte shuffle.
  static void load_nibble_pairs(const std::uint8_t* row, Index c, FloatVec& even, FloatVec& odd) {
    const __m512i bytes = _mm512_maskz_cvtepu8_epi32(
        kAll, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
    even = {_mm512_maskz_cvtepi32_ps(kAll, _mm512_and_si512(bytes, _mm512_set1_epi32(0x0F)))};
    odd = {_mm512_maskz_cvtepi32_ps(kAll, _mm512_maskz_srli_epi32(kAll, bytes, 4))};
  }
  /// even = lanes 0, 2, .., 30 of the 32 lanes (a, b), odd = lanes 1, 3, .., 31.
  static void deinterleave(FloatVec a, FloatVec b, FloatVec& even, FloatVec& odd) {
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    even = {_mm512_permutex2var_ps(a.v, evens, b.v)};
    odd = {_mm512_permutex2var_ps(a.v, odds, b.v)};
  }
  /// The inverse of deinterleave: (a, b) = even 0, odd 0, even 1, odd 1, ...
  static void interleave(FloatVec even, FloatVec odd, FloatVec& a, FloatVec& b) {
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    a = {_mm512_permutex2var_ps(even.v, low, odd.v)};
    b = {_mm512_permutex2var_ps(even.v, high, odd.v)};
  }

  static FloatVec mul_add(FloatVec a, FloatVec b, FloatVec c) {
    return {_mm512_fmadd_ps(a.v, b.v, c.v)};
  }
  static FloatVec add(FloatVec a, FloatVec b) { return {_mm512_add_ps(a.v, b.v)}; }
  static FloatVec mul(FloatVec a, FloatVec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  /// Lane-wise min / max; where a lane of either is NaN, b's lane (vminps / vmaxps).
  static FloatVec min(FloatVec a, FloatVec b) { return {_mm512_maskz_min_ps(kAll, a.v, b.v)}; }
  static FloatVec max(FloatVec a, FloatVec b) { return {_mm512_maskz_max_ps(kAll, a.v, b.v)}; }

  /// exp(x - shift), exactly 0 where x is -inf: the reduction and polynomial of the AVX2
  /// vector, with vscalefps applying 2^n (it gives 0 below the normal range itself).
  static FloatVec exp_shifted(FloatVec x, float shift) {
    const __mmask16 masked = _mm512_cmp_ps_mask(
        x.v, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
    __m512 a = _mm512_sub_ps(x.v, _mm512_set1_ps(shift));
    a = _mm512_maskz_max_ps(kAll, a, _mm512_set1_ps(-87.0f));
    a = _mm512_maskz_min_ps(kAll, a, _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_maskz_roundscale_ps(kAll, _mm512_mul_ps(a, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), a);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    return {_mm512_maskz_scalef_ps(static_cast<__mmask16>(~masked), y, n)};
  }

  /// The sum of the 16 lanes by a fixed tree: lane l += lane l + w for w = 8, 4, 2, 1.
  static float sum_lanes(FloatVec x) {
    const __m256 eights = _mm256_add_ps(_mm512_maskz_extractf32x8_ps(0xFF, x.v, 0),
                                        _mm512_maskz_extractf32x8_ps(0xFF, x.v, 1));
    const __m128 fours = _mm_add_ps(_mm256_castps256_ps128(eights), _mm256_extractf128_ps(eights, 1));
    const __m128 twos = _mm_add_ps(fours, _mm_movehl_ps(fours, fours));
    return _mm_cvtss_f32(_mm_add_ss(twos, _mm_shuffle_ps(twos, twos, 1)));
  }

  /// The largest (smallest) of the 16 lanes, none of them NaN: halves, quarters, pairs,
  /// neighbours, in registers (a store and 16 scalar loads would wait on store forwarding).
  static float max_lanes(FloatVec x) { return fold_lanes<true>(x.v); }
  static float min_lanes(FloatVec x) { return fold_lanes<false>(x.v); }

  /// Dot products a reduction handles at once: a tile of 4 query rows x 4 keys, or 1 x 16.
  /// Vectors per accumulator row that accumulate_rows keeps in registers.
  static constexpr int accumulator_strip = 4;
  static constexpr int tile_dots = 16;

  /// Dot i = the sum of acc[i]'s 16 lanes, for 16 vectors, by one fixed tree for every i (a
  /// transposing reduction: halves, quarters, pairs, neighbours), so a dot product's last bits
  /// do not depend on the other 15. Rows 4: out[r * row_stride + k] = dot 4r + k, four 128-bit
  /// stores straight from the register; Rows 1: out[i] = dot i, one store of the 16.
  template <int Rows>
  static void reduce(const FloatVec (&acc)[16], float* out, Index row_stride) {
    static_assert(Rows == 1 || Rows == 4, "kvcache: an AVX-512 tile is 4 x 4 or 1 x 16");
    __m512 half[8], quarter[4];
    #pragma GCC unroll 16
    for (int i = 0; i < 8; ++i)  // [a.q0 + a.q2, a.q1 + a.q3, b.q2 + b.q0, b.q3 + b.q1]: a blend
      // [a.q0, a.q1, b.q2, b.q3] (any vector port) plus one shuffle [a.q2, a.q3, b.q0, b.q1]
      half[i] = _mm512_add_ps(_mm512_mask_blend_ps(0xFF00, acc[2 * i].v, acc[2 * i + 1].v),
                              _mm512_maskz_shuffle_f32x4(kAll, acc[2 * i].v, acc[2 * i + 1].v, 0x4E));
    #pragma GCC unroll 16
    for (int i = 0; i < 4; ++i)  // quarter k: four partial sums of vector 4i + k
      quarter[i] = _mm512_add_ps(_mm512_maskz_shuffle_f32x4(kAll, half[2 * i], half[2 * i + 1], 0x88),
                                 _mm512_maskz_shuffle_f32x4(kAll, half[2 * i], half[2 * i + 1], 0xDD));
    // Within each 128-bit quarter k: pairs, then neighbours; lane 4k + m ends as vector 4m + k.
    const __m512 pairs01 = _mm512_add_ps(_mm512_maskz_shuffle_ps(kAll, quarter[0], quarter[1], 0x44),
                                         _mm512_maskz_shuffle_ps(kAll, quarter[0], quarter[1], 0xEE));
    const __m512 pairs23 = _mm512_add_ps(_mm512_maskz_shuffle_ps(kAll, quarter[2], quarter[3], 0x44),
                                         _mm512_maskz_shuffle_ps(kAll, quarter[2], quarter[3], 0xEE));
    const __m512 sums = _mm512_add_ps(_mm512_maskz_shuffle_ps(kAll, pairs01, pairs23, 0x88),
                                      _mm512_maskz_shuffle_ps(kAll, pairs01, pairs23, 0xDD));
    // Lane 4k + m holds vector 4m + k: gather lane i's source 4 (i % 4) + i / 4.
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 dots = _mm512_maskz_permutexvar_ps(kAll, order, sums);
    if constexpr (Rows == 1) {
      _mm512_storeu_ps(out, dots);
    } else {
      _mm_storeu_ps(out, quarter_of<0>(dots));
      _mm_storeu_ps(out + row_stride, quarter_of<1>(dots));
      _mm_storeu_ps(out + 2 * row_stride, quarter_of<2>(dots));
      _mm_storeu_ps(out + 3 * row_stride, quarter_of<3>(dots));
    }
  }

 private:
  /// key_code_dots without VNNI for rows [row, row + Rows) (isa_avx2::FloatVec::code_dot_rows
  /// on 16 tokens a vector).
  template <int Bits, int Rows, class Prefetch>
  static void code_dot_rows(const KeyQuads& keys, const std::int16_t* query, Index row,
                            std::int32_t* sums, const Prefetch& prefetch, bool first) {
    const Index padded = 4 * keys.quads, tokens = keys.quad_rows * (8 / Bits);
    constexpr int kVectors = Bits == 8 ? 1 : 2;  // int4: a load's low and high nibbles
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (Index r0 = 0; r0 < keys.quad_rows; r0 += 16) {
      __m512i acc[count(Rows)][count(kVectors)][2];
      #pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
        #pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) acc[r][i][0] = acc[r][i][1] = _mm512_setzero_si512();
      // Invariant: acc[r][i][h] lane 2m + p = the sum over quads < k of token
      // (vector i, m + 8h)'s channels 4k' + 2p, 4k' + 2p + 1 times the query's.
      for (Index k = 0; k < keys.quads; ++k) {
        if (first && r0 == 0) prefetch(k);
        const __m512i bytes = _mm512_loadu_si512(keys.codes + (k * keys.quad_rows + r0) * 4);
        __m512i codes[count(kVectors)];
        if constexpr (Bits == 8) {
          codes[0] = bytes;
        } else {
          codes[0] = _mm512_and_si512(bytes, nibble);
          codes[kVectors - 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
        }
        __m512i words[count(kVectors)][2];
        #pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) {
          words[i][0] = _mm512_cvtepu8_epi16(_mm512_maskz_extracti64x4_epi64(0xFF, codes[i], 0));
          words[i][1] = _mm512_cvtepu8_epi16(_mm512_maskz_extracti64x4_epi64(0xFF, codes[i], 1));
        }
        #pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          std::int64_t four;
          std::memcpy(&four, query + (row + r) * padded + 4 * k, sizeof four);
          const __m512i q = _mm512_set1_epi64(four);
          #pragma GCC unroll 16
          for (int i = 0; i < kVectors; ++i)
            #pragma GCC unroll 16
            for (int h = 0; h < 2; ++h)
              acc[r][i][h] = _mm512_add_epi32(acc[r][i][h], _mm512_madd_epi16(words[i][h], q));
        }
      }
      #pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
        #pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) {
          // Lanes 2m and 2m + 1 of the two vectors: tokens 0-7 and 8-15, in order.
          const __m512i dots =
              _mm512_add_epi32(_mm512_permutex2var_epi32(acc[r][i][0], even, acc[r][i][1]),
                               _mm512_permutex2var_epi32(acc[r][i][0], odd, acc[r][i][1]));
          const Index token = i == 0 ? r0 : r0 + keys.quad_rows;
          _mm512_storeu_si512(sums + (row + r) * tokens + token, dots);
        }
    }
  }

  /// 128-bit quarter Q of x (the zero-masked extract: g++ 12 implements the cast to __m128
  /// with the plain one, whose undefined starting value it reports, as above).
  template <int Q>
  static __m128 quarter_of(__m512 x) {
    return _mm512_maskz_extractf32x4_ps(0xF, x, Q);
  }
  template <bool Largest>
  static __m256 pick(__m256 a, __m256 b) { return Largest ? _mm256_max_ps(a, b) : _mm256_min_ps(a, b); }
  template <bool Largest>
  static __m128 pick(__m128 a, __m128 b) { return Largest ? _mm_max_ps(a, b) : _mm_min_ps(a, b); }
  template <bool Largest>
  static float fold_lanes(__m512 x) {
    const __m256 eights = pick<Largest>(_mm512_maskz_extractf32x8_ps(0xFF, x, 0),
                                        _mm512_maskz_extractf32x8_ps(0xFF, x, 1));
    const __m128 fours = pick<Largest>(_mm256_castps256_ps128(eights), _mm256_extractf128_ps(eights, 1));
    const __m128 twos = pick<Largest>(fours, _mm_movehl_ps(fours, fours));
    return _mm_cvtss_f32(pick<Largest>(twos, _mm_shuffle_ps(twos, twos, 1)));
  }
};
