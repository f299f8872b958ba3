// kvcache: the portable vector of the kernel - W lanes of Acc in plain C++, no intrinsics.
//
// The "scalar" variant's float vector and every variant's double vector. Under g++ and clang it
// is a GCC vector extension type, which the compiler lowers to the target's registers (SSE2 on
// x86-64, NEON on AArch64); elsewhere an array the optimiser may vectorise. Every operation is
// lane by lane, and sum() adds the lanes in one fixed order, so a result never depends on where
// the data sits in memory.
#ifndef KVCACHE_DETAIL_KERNEL_VEC_PORTABLE_HPP
#define KVCACHE_DETAIL_KERNEL_VEC_PORTABLE_HPP

#include <kvcache/layout.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace kvcache {
namespace detail {

template <class Acc, int W>
struct PortableVec {
  static_assert(W >= 1 && (W & (W - 1)) == 0, "kvcache: PortableVec width must be a power of 2");
  using Scalar = Acc;
  static constexpr Index width = W;
#if defined(__GNUC__)
  typedef Acc Lanes __attribute__((vector_size(sizeof(Acc) * W)));
#else
  struct Lanes {
    Acc lane[count(W)];
    Acc& operator[](int i) { return lane[i]; }
    Acc operator[](int i) const { return lane[i]; }
  };
#endif
  Lanes v;

  static PortableVec broadcast(Acc x) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static PortableVec zero() { return broadcast(Acc(0)); }

  /// W elements of T from `from`, converted to Acc (a bfloat16 by a 16-bit shift: it is the
  /// upper half of a float; Eigen's conversion goes through a slower general path).
  template <class T>
  static PortableVec load(const T* from) {
    PortableVec r;
    if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<Acc, float>) {
      #pragma GCC unroll 16
      for (int i = 0; i < W; ++i) {
        std::uint16_t upper;
        std::memcpy(&upper, from + i, sizeof upper);
        const std::uint32_t bits = std::uint32_t(upper) << 16;
        float widened;
        std::memcpy(&widened, &bits, sizeof widened);
        r.v[i] = widened;
      }
    } else {
      #pragma GCC unroll 16
      for (int i = 0; i < W; ++i) r.v[i] = static_cast<Acc>(from[i]);
    }
    return r;
  }
  /// Elements 0 .. 2W - 1 of a bfloat16 row split by parity: even lane i = element 2i, odd
  /// lane i = element 2i + 1 (the intrinsic vectors' shift and mask; here loaded in order and
  /// deinterleaved).
  static void load_pairs(const Eigen::bfloat16* from, PortableVec& even, PortableVec& odd) {
    deinterleave(load(from), load(from + W), even, odd);
  }
  /// Asks for the cache line holding `address` (a hint; never faults).
  static void prefetch(const void* address) {
#if defined(__GNUC__)
    __builtin_prefetch(address);
#else
    (void)address;
#endif
  }
  void store(Acc* to) const {
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) to[i] = v[i];
  }
  /// The lanes rounded to the nearest integer (ties to even, the default rounding mode, as
  /// cvtps2dq) as int16. Requires |lane| < 32768.
  void store_rounded(std::int16_t* to) const {
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) to[i] = static_cast<std::int16_t>(std::nearbyint(v[i]));
  }
  /// No vector path for the integer scores of a quantized block: the kernel's portable loop
  /// (key_code_dots_portable in quantized_block.inl) computes them.
  template <int Bits, class KeyQuadsT, class Prefetch>
  static bool key_code_dots(const KeyQuadsT&, const std::int16_t*, Index, std::int32_t*,
                            std::int8_t*, const Prefetch&) {
    return false;
  }

  /// Channels c .. c + W - 1 of a row of Bits-bit codes (4 bits: channel 2j in the low nibble
  /// of byte j, 2j + 1 in the high one; c even).
  template <int Bits>
  static PortableVec load_codes(const std::uint8_t* row, Index c) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      const Index channel = c + i;
      r.v[i] = static_cast<Acc>(Bits == 8 ? row[channel]
                                          : (row[channel / 2] >> (4 * (channel % 2))) & 0x0F);
    }
    return r;
  }

  /// The 4-bit codes of channels c .. c + 2W - 1 of a code row (c even), by parity: even lane
  /// i = channel c + 2i (the low nibble of byte c / 2 + i), odd lane i = channel c + 2i + 1
  /// (its high nibble).
  static void load_nibble_pairs(const std::uint8_t* row, Index c, PortableVec& even, PortableVec& odd) {
    PortableVec low = zero(), high = zero();  // every lane is set below
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      const unsigned byte = row[c / 2 + i];
      low.v[i] = static_cast<Acc>(byte & 0x0Fu);
      high.v[i] = static_cast<Acc>(byte >> 4);
    }
    even = low;
    odd = high;
  }
  /// even = lanes 0, 2, .., 2W - 2 of the 2W lanes (a, b), odd = lanes 1, 3, .., 2W - 1.
  static void deinterleave(PortableVec a, PortableVec b, PortableVec& even, PortableVec& odd) {
    PortableVec e = zero(), o = zero();  // every lane is set below
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      e.v[i] = (2 * i < W ? a : b).v[(2 * i) % W];
      o.v[i] = (2 * i + 1 < W ? a : b).v[(2 * i + 1) % W];
    }
    even = e;
    odd = o;
  }
  /// The inverse of deinterleave: (a, b) = even 0, odd 0, even 1, odd 1, ...
  static void interleave(PortableVec even, PortableVec odd, PortableVec& a, PortableVec& b) {
    PortableVec low = zero(), high = zero();  // every lane is set below
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      (2 * i < W ? low : high).v[(2 * i) % W] = even.v[i];
      (2 * i + 1 < W ? low : high).v[(2 * i + 1) % W] = odd.v[i];
    }
    a = low;
    b = high;
  }

  static PortableVec mul_add(PortableVec a, PortableVec b, PortableVec c) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static PortableVec add(PortableVec a, PortableVec b) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static PortableVec mul(PortableVec a, PortableVec b) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  /// Lane-wise min / max; where a lane of either is NaN, b's lane (as vminps / vmaxps).
  static PortableVec min(PortableVec a, PortableVec b) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  static PortableVec max(PortableVec a, PortableVec b) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  /// exp(x - shift) lane by lane, exactly 0 where x is -inf (a masked score).
  static PortableVec exp_shifted(PortableVec x, Acc shift) {
    PortableVec r;
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i)
      r.v[i] = x.v[i] == -std::numeric_limits<Acc>::infinity() ? Acc(0) : std::exp(x.v[i] - shift);
    return r;
  }
  /// Dot products a reduction handles at once (a tile of 4 rows x 1 key, or 1 x 4).
  /// Vectors per accumulator row that accumulate_rows keeps in registers.
  static constexpr int accumulator_strip = 2;
  static constexpr int tile_dots = 4;

  /// out[r * row_stride + k] = acc[r * (4 / Rows) + k].sum() (the interface of the intrinsic
  /// vectors).
  template <int Rows>
  static void reduce(const PortableVec (&acc)[4], Acc* out, Index row_stride) {
    static_assert(Rows == 1 || Rows == 4, "kvcache: a portable tile is 4 x 1 or 1 x 4");
    constexpr int kKeys = 4 / Rows;
    #pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) out[i / kKeys * row_stride + i % kKeys] = acc[i].sum();
  }

  /// The largest (smallest) lane, none of them NaN, by the tree of sum().
  static Acc max_lanes(PortableVec x) { return x.fold([](Acc a, Acc b) { return a > b ? a : b; }); }
  static Acc min_lanes(PortableVec x) { return x.fold([](Acc a, Acc b) { return a < b ? a : b; }); }

  /// The sum of the lanes by a fixed tree: lane l += lane l + w for w = W/2, ..., 1.
  static Acc sum_lanes(PortableVec x) { return x.sum(); }

  /// The lanes added pairwise in a fixed tree: (l0 + l_{W/2}) ... .
  Acc sum() const {
    return fold([](Acc a, Acc b) { return a + b; });
  }
  /// The lanes combined pairwise by `op` in sum()'s fixed tree.
  template <class Op>
  Acc fold(Op op) const {
    Acc lane[count(W)];
    #pragma GCC unroll 16
    for (int i = 0; i < W; ++i) lane[i] = v[i];
    #pragma GCC unroll 16
    for (int half = W / 2; half >= 1; half /= 2)
      #pragma GCC unroll 16
      for (int i = 0; i < half; ++i) lane[i] = op(lane[i], lane[i + half]);
    return lane[0];
  }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KERNEL_VEC_PORTABLE_HPP
