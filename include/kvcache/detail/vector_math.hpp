// kvcache: reductions whose summation order is fixed by the code, not by the data's address.
//
// Eigen's vectorised reductions (dot, sum) peel scalar iterations until the data is aligned,
// so the order of additions - and the last bits of the result - depends on where a buffer
// happens to sit. Attention results must not change between two calls, two caches holding the
// same tokens, or a thread pool and the serial path. These loops keep kLanes independent
// partial sums (the compiler turns each lane group into vector registers: 4 AVX or 8 SSE
// accumulators, enough to hide the add latency) and combine them in one fixed order.
#ifndef KVCACHE_DETAIL_VECTOR_MATH_HPP
#define KVCACHE_DETAIL_VECTOR_MATH_HPP

#include <kvcache/layout.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace kvcache {
namespace detail {

inline constexpr int kLanes = 32;

/// Adds the lanes pairwise: ((l0 + l16) + (l8 + l24)) ... in a fixed tree.
template <class Acc>
Acc combine_lanes(Acc (&lane)[kLanes]) {
  for (int width = kLanes / 2; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
  return lane[0];
}

/// sum_c a[c] over c in [0, n).
template <class Acc>
Acc sum(const Acc* a, Index n) {
  Acc lane[kLanes] = {};
  Index c = 0;
  // Invariant: lane[l] = sum of a[i] over i < c with i % kLanes == l.
  for (; c + kLanes <= n; c += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += a[c + l];
  Acc tail = 0;
  for (; c < n; ++c) tail += a[c];
  return combine_lanes(lane) + tail;
}

/// Eigen's native packet of Acc (8 floats with AVX, 16 with AVX-512, 4 with SSE or NEON).
template <class Acc>
using PacketOf = typename Eigen::internal::packet_traits<Acc>::type;

template <class Acc>
inline constexpr Index kPacketWidth = Eigen::internal::packet_traits<Acc>::size;

/// Loads kPacketWidth<Acc> elements of T from `from` (unaligned) as one packet of Acc. Half and
/// bfloat16 widen in registers when Eigen has a packet of them as wide as the float packet
/// (F16C's vcvtph2ps for half, a 16-bit shift for bfloat16); otherwise element by element.
template <class Acc, class T>
PacketOf<Acc> load_widened(const T* from) {
  if constexpr (std::is_same_v<T, Acc>) {
    return Eigen::internal::ploadu<PacketOf<Acc>>(from);
#if defined(__AVX512F__)
  } else if constexpr (std::is_same_v<Acc, float> && std::is_same_v<T, Eigen::half> &&
                       kPacketWidth<float> == 16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(from)));
#endif
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<Acc, float> && std::is_same_v<T, Eigen::half> &&
                       kPacketWidth<float> == 8) {
    // Eigen 3.4's half2float uses vcvtph2ps only when EIGEN_HAS_FP16_C is set, which its
    // configuration never sets under g++: convert here instead.
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(from)));
#endif
#if defined(__AVX512F__)
  } else if constexpr (std::is_same_v<Acc, float> && std::is_same_v<T, Eigen::bfloat16> &&
                       kPacketWidth<float> == 16) {
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(from));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
#endif
#if defined(__AVX2__)
  } else if constexpr (std::is_same_v<Acc, float> && std::is_same_v<T, Eigen::bfloat16> &&
                       kPacketWidth<float> == 8) {
    // A bfloat16 is the upper half of a float: zero-extend to 32 bits and shift.
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(from));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
#endif
  } else {
    alignas(64) Acc widened[kPacketWidth<Acc>];
    for (Index i = 0; i < kPacketWidth<Acc>; ++i) widened[i] = static_cast<Acc>(from[i]);
    return Eigen::internal::pload<PacketOf<Acc>>(widened);
  }
}

/// Where kernels read K/V elements from: a row pointer and a column give one element or one
/// packet of kPacketWidth<Acc> elements, converted to Acc in registers.
/// Stored: elements of T (float, double, half, bfloat16) at row[c].
template <class T>
struct Stored {
  using Element = T;  ///< what a row pointer points to; row strides count these
  template <class Acc>
  static PacketOf<Acc> packet(const T* row, Index c) {
    return load_widened<Acc>(row + c);
  }
  template <class Acc>
  static Acc scalar(const T* row, Index c) {
    return static_cast<Acc>(row[c]);
  }
};

/// Codes: unsigned integer codes of Bits (8 or 4) bits, element c of a row at byte c * Bits / 8;
/// with 4 bits, an even channel in the low nibble, the next odd one in the high nibble.
template <int Bits>
struct Codes {
  static_assert(Bits == 8 || Bits == 4, "kvcache: codes are 8 or 4 bits");
  using Element = std::uint8_t;  ///< row strides count bytes
  template <class Acc>
  static PacketOf<Acc> packet(const std::uint8_t* row, Index c) {
#if defined(__AVX2__)
    if constexpr (std::is_same_v<Acc, float> && kPacketWidth<float> == 8) {
      const std::uint8_t* at = row + c * Bits / 8;
      if constexpr (Bits == 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(at));
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      } else {
        std::int32_t four;
        std::memcpy(&four, at, sizeof four);
        const __m128i bytes = _mm_cvtsi32_si128(four);
        const __m128i nibble = _mm_set1_epi8(0x0F);
        const __m128i low = _mm_and_si128(bytes, nibble);
        const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(low, high)));
      }
    }
#endif
    alignas(64) Acc widened[kPacketWidth<Acc>];
    for (Index i = 0; i < kPacketWidth<Acc>; ++i) widened[i] = scalar<Acc>(row, c + i);
    return Eigen::internal::pload<PacketOf<Acc>>(widened);
  }
  template <class Acc>
  static Acc scalar(const std::uint8_t* row, Index c) {
    if constexpr (Bits == 8) {
      return static_cast<Acc>(row[c]);
    } else {
      return static_cast<Acc>((row[c / 2] >> (4 * (c % 2))) & 0x0F);
    }
  }
};

/// Dot products of `Rows` query rows with one key row: out[r] = rows[r] . key. Each chunk of
/// the key is loaded (and widened) once for all rows, so a GQA group reads every key once.
/// Each row keeps two packet accumulators (even and odd chunks) to halve the FMA latency
/// chain. A row's score gets the same operations alone or in a group, and nothing depends on
/// addresses: a score does not change with grouping or with where the buffers sit.
template <int Rows, class Acc, class Source>
void dot_rows(const Acc* const* rows, const typename Source::Element* key, Index head_dim,
              Acc* out) {
  using Packet = PacketOf<Acc>;
  constexpr Index kWidth = kPacketWidth<Acc>;
  Packet even[Rows], odd[Rows];
  for (int r = 0; r < Rows; ++r) even[r] = odd[r] = Eigen::internal::pset1<Packet>(Acc(0));
  Index c = 0;
  // Invariant: even[r] + odd[r] hold the partial sums of rows[r][i] * key[i] over i < c, by
  // i % kWidth; even[r] the chunks at even multiples of kWidth, odd[r] the others.
  for (; c + 2 * kWidth <= head_dim; c += 2 * kWidth) {
    const Packet key_even = Source::template packet<Acc>(key, c);
    const Packet key_odd = Source::template packet<Acc>(key, c + kWidth);
    for (int r = 0; r < Rows; ++r) {
      even[r] = Eigen::internal::pmadd(Eigen::internal::ploadu<Packet>(rows[r] + c), key_even,
                                       even[r]);
      odd[r] = Eigen::internal::pmadd(Eigen::internal::ploadu<Packet>(rows[r] + c + kWidth),
                                      key_odd, odd[r]);
    }
  }
  if (c + kWidth <= head_dim) {
    const Packet key_even = Source::template packet<Acc>(key, c);
    for (int r = 0; r < Rows; ++r)
      even[r] = Eigen::internal::pmadd(Eigen::internal::ploadu<Packet>(rows[r] + c), key_even,
                                       even[r]);
    c += kWidth;
  }
  for (int r = 0; r < Rows; ++r) {
    Acc tail = 0;
    for (Index i = c; i < head_dim; ++i) tail += rows[r][i] * Source::template scalar<Acc>(key, i);
    out[r] = Eigen::internal::predux(Eigen::internal::padd(even[r], odd[r])) + tail;
  }
}

/// The softmax weights of a row of scores relative to `max`: s[j] = exp(s[j] - max), and
/// exactly 0 where s[j] is -inf (a masked key; a vectorised exp of -inf need not be 0).
/// Vectorised where Eigen has a packet exp; the lanes past the last whole packet use std::exp,
/// by index, so a weight never depends on the address of the row.
template <class Acc>
void exp_weights(Acc* s, Index n, Acc max) {
  using Packet = PacketOf<Acc>;
  constexpr Index kWidth = kPacketWidth<Acc>;
  const Acc minus_infinity = -std::numeric_limits<Acc>::infinity();
  Index j = 0;
  if constexpr (kWidth > 1 && Eigen::internal::packet_traits<Acc>::HasExp) {
    const Packet masked = Eigen::internal::pset1<Packet>(minus_infinity);
    const Packet zero = Eigen::internal::pset1<Packet>(Acc(0));
    const Packet shift = Eigen::internal::pset1<Packet>(max);
    for (; j + kWidth <= n; j += kWidth) {
      const Packet x = Eigen::internal::ploadu<Packet>(s + j);
      const Packet w = Eigen::internal::pexp(Eigen::internal::psub(x, shift));
      Eigen::internal::pstoreu(
          s + j, Eigen::internal::pselect(Eigen::internal::pcmp_eq(x, masked), zero, w));
    }
  }
  for (; j < n; ++j) s[j] = s[j] == minus_infinity ? Acc(0) : std::exp(s[j] - max);
}

/// acc[r][c] += weight[r] * value[c] for `Rows` accumulator rows and one value row: the value
/// chunk is loaded once for all rows. The building block of the path that skips single keys.
template <int Rows, class Acc, class T>
void axpy_rows(Acc* const* acc, const Acc* weight, const T* value, Index head_dim) {
  using Packet = PacketOf<Acc>;
  constexpr Index kWidth = kPacketWidth<Acc>;
  Packet w[Rows];
  for (int r = 0; r < Rows; ++r) w[r] = Eigen::internal::pset1<Packet>(weight[r]);
  Index c = 0;
  for (; c + kWidth <= head_dim; c += kWidth) {
    const Packet v = load_widened<Acc>(value + c);
    for (int r = 0; r < Rows; ++r)
      Eigen::internal::pstoreu(
          acc[r] + c, Eigen::internal::pmadd(w[r], v, Eigen::internal::ploadu<Packet>(acc[r] + c)));
  }
  for (; c < head_dim; ++c)
    for (int r = 0; r < Rows; ++r) acc[r][c] += weight[r] * static_cast<Acc>(value[c]);
}

/// acc[r][c] += sum_j weight[r][j] * values[j][c] for `Rows` accumulator rows over `n` value
/// rows (weights row r at weights + r * weight_stride): a small matrix product whose
/// accumulators stay in registers for a strip of columns while every value row streams past,
/// so each accumulator is loaded and stored once per block instead of once per key. Element
/// (r, c) receives exactly the operations of n calls of axpy_rows, in the same order.
template <int Rows, class Acc, class Source>
void accumulate_rows(Acc* const* acc, const Acc* weights, Index weight_stride,
                     const typename Source::Element* values, Index value_stride, Index n,
                     Index head_dim) {
  using Packet = PacketOf<Acc>;
  constexpr Index kWidth = kPacketWidth<Acc>;
  constexpr int kStrip = 2;  // packets per row in registers: Rows * kStrip accumulators
  Index c = 0;
  for (; c + kStrip * kWidth <= head_dim; c += kStrip * kWidth) {
    Packet lane[Rows][kStrip];
    for (int r = 0; r < Rows; ++r)
      for (int s = 0; s < kStrip; ++s)
        lane[r][s] = Eigen::internal::ploadu<Packet>(acc[r] + c + s * kWidth);
    // Invariant: lane[r][s] = acc[r][c + s * kWidth ...] plus the terms of value rows < j.
    for (Index j = 0; j < n; ++j) {
      const auto* value = values + j * value_stride;
      Packet v[kStrip];
      for (int s = 0; s < kStrip; ++s) v[s] = Source::template packet<Acc>(value, c + s * kWidth);
      for (int r = 0; r < Rows; ++r) {
        const Packet w = Eigen::internal::pset1<Packet>(weights[r * weight_stride + j]);
        for (int s = 0; s < kStrip; ++s) lane[r][s] = Eigen::internal::pmadd(w, v[s], lane[r][s]);
      }
    }
    for (int r = 0; r < Rows; ++r)
      for (int s = 0; s < kStrip; ++s) Eigen::internal::pstoreu(acc[r] + c + s * kWidth, lane[r][s]);
  }
  for (; c + kWidth <= head_dim; c += kWidth) {
    Packet lane[Rows];
    for (int r = 0; r < Rows; ++r) lane[r] = Eigen::internal::ploadu<Packet>(acc[r] + c);
    for (Index j = 0; j < n; ++j) {
      const Packet v = Source::template packet<Acc>(values + j * value_stride, c);
      for (int r = 0; r < Rows; ++r)
        lane[r] = Eigen::internal::pmadd(
            Eigen::internal::pset1<Packet>(weights[r * weight_stride + j]), v, lane[r]);
    }
    for (int r = 0; r < Rows; ++r) Eigen::internal::pstoreu(acc[r] + c, lane[r]);
  }
  for (Index j = 0; j < n; ++j)
    for (Index cc = c; cc < head_dim; ++cc)
      for (int r = 0; r < Rows; ++r)
        acc[r][cc] += weights[r * weight_stride + j] *
                      Source::template scalar<Acc>(values + j * value_stride, cc);
}

/// Widens n rows of head_dim elements of T (row stride `stride`) into dense rows of Acc.
template <class Acc, class T>
void widen_rows(const T* from, Index stride, Index n, Index head_dim, Acc* to) {
  constexpr Index kWidth = kPacketWidth<Acc>;
  for (Index j = 0; j < n; ++j) {
    const T* src = from + j * stride;
    Acc* dst = to + j * head_dim;
    Index c = 0;
    for (; c + kWidth <= head_dim; c += kWidth)
      Eigen::internal::pstoreu(dst + c, load_widened<Acc>(src + c));
    for (; c < head_dim; ++c) dst[c] = static_cast<Acc>(src[c]);
  }
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_VECTOR_MATH_HPP
