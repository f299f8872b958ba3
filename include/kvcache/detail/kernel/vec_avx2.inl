// kvcache: the AVX2 + FMA + F16C float vector (8 lanes). Included by detail/kernel/variants.hpp
// only, inside namespace kvcache::detail::isa_avx2 and a region compiled for
// "avx2,fma,f16c": every function here is compiled for that target whatever the build's flags.
// (No include guard: the region includes it once; no includes: variants.hpp brings them.)

struct FloatVec {
  using Scalar = float;
  static constexpr Index width = 8;
  __m256 v;

  static FloatVec broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static FloatVec zero() { return {_mm256_setzero_ps()}; }
  static FloatVec load(const float* from) { return {_mm256_loadu_ps(from)}; }
  /// Eight halves widened by F16C's vcvtph2ps (exact).
  static FloatVec load(const Eigen::half* from) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)))};
  }
  /// Eight bfloat16 widened exactly: a bfloat16 is the upper half of a float.
  static FloatVec load(const Eigen::bfloat16* from) {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))};
  }
  /// Elements 0 .. 15 of a bfloat16 row split by parity (isa_avx512::FloatVec::load_pairs):
  /// a shift and a mask.
  static void load_pairs(const Eigen::bfloat16* from, FloatVec& even, FloatVec& odd) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
    even = {_mm256_castsi256_ps(_mm256_slli_epi32(words, 16))};
    odd = {_mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(-65536)))};
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
  /// Eight int32 converted to float (exact below 2^24, else rounded to nearest).
  static FloatVec load(const std::int32_t* from) {
    return {_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)))};
  }
  void store(float* to) const { _mm256_storeu_ps(to, v); }
  /// The lanes rounded to the nearest integer (ties to even) as int16. Requires |lane| < 32768.
  void store_rounded(std::int16_t* to) const {
    const __m256i words = _mm256_cvtps_epi32(v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to),
                     _mm_packs_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1)));
  }

  /// The integer scores of a block: sums[r * tokens + t] = sum over the 4 * quads channels c of
  /// query[r * 4 * quads + c] * key code (t, c), exact in int32 (the caller bounds the query so
  /// no sum overflows), for num_rows rows; false (nothing written) when the block's shape has
  /// no vector path here (quad rows not a multiple of 8), and the caller takes the portable
  /// twin. vpmaddwd: a 32-byte load is 8 token rows x 4 codes, widened to two vectors of 16-bit
  /// codes (rows 0-3, 4-7); each multiplies the row's 4 query words broadcast, summing
  /// channel pairs into 32-bit lanes (lanes 2i, 2i + 1 = token i's channels 0-1, 2-3), which
  /// one horizontal add per 8 tokens folds at the end. Two rows at a time: 8 accumulators.
  /// prefetch(k) runs once per quad k, in the first pass over the quads. (`split`, scratch of
  /// 2 * num_rows * 4 * quads bytes, is for the AVX-512 VNNI path; unused here.)
  template <int Bits, class Prefetch>
  static bool key_code_dots(const KeyQuads& keys, const std::int16_t* query, Index num_rows,
                            std::int32_t* sums, std::int8_t* split, const Prefetch& prefetch) {
    (void)split;
    if (keys.quad_rows % 8 != 0) return false;
    for_row_groups<2>(num_rows, [&](auto rows, Index row) {
      code_dot_rows<Bits, decltype(rows)::value>(keys, query, row, sums, prefetch, row == 0);
    });
    return true;
  }

  /// Channels c .. c + 7 of a row of codes (PortableVec::load_codes for the nibble order).
  template <int Bits>
  static FloatVec load_codes(const std::uint8_t* row, Index c) {
    if constexpr (Bits == 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c));
      return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes))};
    } else {
      std::int32_t four;
      std::memcpy(&four, row + c / 2, sizeof four);
      const __m128i bytes = _mm_cvtsi32_si128(four);
      const __m128i nibble = _mm_set1_epi8(0x0F);
      const __m128i low = _mm_and_si128(bytes, nibble);
      const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
      return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(low, high)))};
    }
  }

  /// The 4-bit codes of channels c .. c + 15 of a code row (c even), by parity: even lane i =
  /// channel c + 2i, odd lane i = channel c + 2i + 1 - the low and high nibbles of byte
  /// c / 2 + i, so one 8-byte load, a mask and a shift, no byte shuffle.
  static void load_nibble_pairs(const std::uint8_t* row, Index c, FloatVec& even, FloatVec& odd) {
    const __m256i bytes =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c / 2)));
    even = {_mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(0x0F)))};
    odd = {_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4))};
  }
  /// even = lanes 0, 2, .., 14 of the 16 lanes (a, b), odd = lanes 1, 3, .., 15.
  static void deinterleave(FloatVec a, FloatVec b, FloatVec& even, FloatVec& odd) {
    // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; the 64-bit pairs then reordered.
    const __m256 e = _mm256_shuffle_ps(a.v, b.v, 0x88), o = _mm256_shuffle_ps(a.v, b.v, 0xDD);
    even = {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xD8))};
    odd = {_mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xD8))};
  }
  /// The inverse of deinterleave: (a, b) = even 0, odd 0, even 1, odd 1, ...
  static void interleave(FloatVec even, FloatVec odd, FloatVec& a, FloatVec& b) {
    const __m256 low = _mm256_unpacklo_ps(even.v, odd.v), high = _mm256_unpackhi_ps(even.v, odd.v);
    a = {_mm256_permute2f128_ps(low, high, 0x20)};
    b = {_mm256_permute2f128_ps(low, high, 0x31)};
  }

  static FloatVec mul_add(FloatVec a, FloatVec b, FloatVec c) {
    return {_mm256_fmadd_ps(a.v, b.v, c.v)};
  }
  static FloatVec add(FloatVec a, FloatVec b) { return {_mm256_add_ps(a.v, b.v)}; }
  static FloatVec mul(FloatVec a, FloatVec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  /// Lane-wise min / max; where a lane of either is NaN, b's lane (vminps / vmaxps).
  static FloatVec min(FloatVec a, FloatVec b) { return {_mm256_min_ps(a.v, b.v)}; }
  static FloatVec max(FloatVec a, FloatVec b) { return {_mm256_max_ps(a.v, b.v)}; }

  /// exp(x - shift), exactly 0 where x is -inf. Cody-Waite reduction x = n ln2 + r with
  /// |r| <= ln2 / 2 and the Cephes degree-6 polynomial (about 1 ulp); exponents below -126 give
  /// 0 (those weights are below float's normal range relative to the row's largest, 1).
  static FloatVec exp_shifted(FloatVec x, float shift) {
    const __m256 masked = _mm256_cmp_ps(x.v, _mm256_set1_ps(-std::numeric_limits<float>::infinity()),
                                        _CMP_EQ_OQ);
    __m256 a = _mm256_sub_ps(x.v, _mm256_set1_ps(shift));
    a = _mm256_max_ps(a, _mm256_set1_ps(-87.0f));
    a = _mm256_min_ps(a, _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), a);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 w = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return {_mm256_blendv_ps(w, _mm256_setzero_ps(), masked)};
  }

  /// The sum of the 8 lanes by a fixed tree: lane l += lane l + w for w = 4, 2, 1.
  static float sum_lanes(FloatVec x) {
    const __m128 fours = _mm_add_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
    const __m128 twos = _mm_add_ps(fours, _mm_movehl_ps(fours, fours));
    return _mm_cvtss_f32(_mm_add_ss(twos, _mm_shuffle_ps(twos, twos, 1)));
  }

  /// The largest (smallest) of the 8 lanes, none of them NaN: halves, pairs, neighbours, in
  /// registers (a store and 8 scalar loads would wait on store forwarding).
  static float max_lanes(FloatVec x) { return fold_lanes<true>(x.v); }
  static float min_lanes(FloatVec x) { return fold_lanes<false>(x.v); }

  /// Dot products a reduction handles at once: a tile of 4 query rows x 2 keys, or 1 x 8.
  /// Vectors per accumulator row that accumulate_rows keeps in registers.
  static constexpr int accumulator_strip = 2;
  static constexpr int tile_dots = 8;

  /// Dot i = the sum of acc[i]'s 8 lanes, for 8 vectors, by one fixed tree for every i:
  /// neighbours and pairs (two rounds of horizontal adds), then the 128-bit halves. Rows 4:
  /// out[r * row_stride + k] = dot 2r + k (64-bit stores straight from the register); Rows 1:
  /// one store of the 8.
  template <int Rows>
  static void reduce(const FloatVec (&acc)[8], float* out, Index row_stride) {
    static_assert(Rows == 1 || Rows == 4, "kvcache: an AVX2 tile is 4 x 2 or 1 x 8");
    const __m256 h01 = _mm256_hadd_ps(acc[0].v, acc[1].v), h23 = _mm256_hadd_ps(acc[2].v, acc[3].v);
    const __m256 h45 = _mm256_hadd_ps(acc[4].v, acc[5].v), h67 = _mm256_hadd_ps(acc[6].v, acc[7].v);
    const __m256 low = _mm256_hadd_ps(h01, h23), high = _mm256_hadd_ps(h45, h67);
    // low: [0..3 of vectors 0-3 | 4..7 of vectors 0-3]; high likewise for vectors 4-7.
    const __m256 dots = _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                                      _mm256_permute2f128_ps(low, high, 0x31));
    if constexpr (Rows == 1) {
      _mm256_storeu_ps(out, dots);
    } else {
      const __m128 first = _mm256_castps256_ps128(dots), second = _mm256_extractf128_ps(dots, 1);
      _mm_storel_pi(reinterpret_cast<__m64*>(out), first);
      _mm_storeh_pi(reinterpret_cast<__m64*>(out + row_stride), first);
      _mm_storel_pi(reinterpret_cast<__m64*>(out + 2 * row_stride), second);
      _mm_storeh_pi(reinterpret_cast<__m64*>(out + 3 * row_stride), second);
    }
  }

 private:
  /// key_code_dots for rows [row, row + Rows).
  template <int Bits, int Rows, class Prefetch>
  static void code_dot_rows(const KeyQuads& keys, const std::int16_t* query, Index row,
                            std::int32_t* sums, const Prefetch& prefetch, bool first) {
    const Index padded = 4 * keys.quads, tokens = keys.quad_rows * (8 / Bits);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    // Vectors of 8 token rows per step: int8 two loads (16 rows), int4 one load's two nibbles.
    constexpr int kVectors = 2;
    const Index rows_per_step = Bits == 8 ? 16 : 8;
    for (Index r0 = 0; r0 < keys.quad_rows; r0 += rows_per_step) {
      const bool whole = Bits == 4 || r0 + 16 <= keys.quad_rows;  // int8: a second load fits
      __m256i acc[count(Rows)][count(kVectors)][2];
      #pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
        #pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) acc[r][i][0] = acc[r][i][1] = _mm256_setzero_si256();
      // Invariant: acc[r][i][h] lane 2m + p = the sum over quads < k of token
      // (vector i, m + 4h)'s channels 4k' + 2p, 4k' + 2p + 1 times the query's.
      for (Index k = 0; k < keys.quads; ++k) {
        if (first && r0 == 0) prefetch(k);
        const std::uint8_t* at = keys.codes + (k * keys.quad_rows + r0) * 4;
        __m256i codes[count(kVectors)];
        if constexpr (Bits == 8) {
          codes[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
          codes[1] = whole ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + 32)) : codes[0];
        } else {
          const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
          codes[0] = _mm256_and_si256(bytes, nibble);
          codes[1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
        }
        __m256i words[count(kVectors)][2];
        #pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) {
          words[i][0] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(codes[i]));
          words[i][1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(codes[i], 1));
        }
        #pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          std::int64_t four;
          std::memcpy(&four, query + (row + r) * padded + 4 * k, sizeof four);
          const __m256i q = _mm256_set1_epi64x(four);
          #pragma GCC unroll 16
          for (int i = 0; i < kVectors; ++i)
            #pragma GCC unroll 16
            for (int h = 0; h < 2; ++h)
              acc[r][i][h] = _mm256_add_epi32(acc[r][i][h], _mm256_madd_epi16(words[i][h], q));
        }
      }
      #pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
        #pragma GCC unroll 16
        for (int i = 0; i < kVectors; ++i) {
          if (i == 1 && !whole) break;
          // [t0, t1, t4, t5 | t2, t3, t6, t7] -> tokens in order.
          const __m256i pairs = _mm256_hadd_epi32(acc[r][i][0], acc[r][i][1]);
          const __m256i dots = _mm256_permute4x64_epi64(pairs, 0xD8);
          const Index token = Bits == 8 ? r0 + 8 * i : r0 + i * keys.quad_rows;
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + (row + r) * tokens + token), dots);
        }
    }
  }

  template <bool Largest>
  static __m128 pick(__m128 a, __m128 b) { return Largest ? _mm_max_ps(a, b) : _mm_min_ps(a, b); }
  template <bool Largest>
  static float fold_lanes(__m256 x) {
    const __m128 fours = pick<Largest>(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    const __m128 twos = pick<Largest>(fours, _mm_movehl_ps(fours, fours));
    return _mm_cvtss_f32(pick<Largest>(twos, _mm_shuffle_ps(twos, twos, 1)));
  }
};
