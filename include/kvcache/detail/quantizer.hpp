// kvcache: the scalar quantize/dequantize routines that define QuantizedKVCache's numbers (the
// scheme and the byte format: quantization.hpp): one group's zero point, scale and codes, a
// block's keys (per channel over group_size tokens), one token's values (per group of channels).
#ifndef KVCACHE_DETAIL_QUANTIZER_HPP
#define KVCACHE_DETAIL_QUANTIZER_HPP

#include <kvcache/quantization.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace kvcache {
namespace detail {

// ---------------------------------------------------------------------------------------------
// One group: zero, scale, codes
// ---------------------------------------------------------------------------------------------

/// An input element in the quantizer's domain: accumulator_t<T>, clamped to the finite
/// bfloat16 range (the documented saturation; +-inf saturates too).
template <class T>
accumulator_t<T> to_quantizer_domain(T x) {
  using A = accumulator_t<T>;
  const A value = static_cast<A>(x);
  return std::min(std::max(value, -A(kBfloat16Max)), A(kBfloat16Max));
}

/// A group's stored zero point and scale, and the same numbers in the quantizer's type.
template <class A>
struct GroupQuantization {
  Eigen::bfloat16 stored_zero;
  Eigen::bfloat16 stored_scale;
  A zero;
  A scale;
};

/// Zero point and scale of a group whose (clamped) elements span [min, max].
template <int Bits, class A>
GroupQuantization<A> quantize_group_range(A min, A max) {
  const A levels = A(QuantBlockFormat<Bits>::levels);
  const Eigen::bfloat16 stored_zero = bfloat16_at_or_below(min);
  const A zero = A(static_cast<float>(stored_zero));
  // max - zero >= 0 overflows float only when both lie near the opposite ends of the clamped
  // range; then the two quotients are far apart and subtracting them loses nothing. Elsewhere
  // the difference comes first, so a narrow range around a large value keeps its precision.
  const A width = max - zero;
  const A needed = std::isfinite(width) ? width / levels : max / levels - zero / levels;
  // needed <= 2 * kBfloat16Max / 15 < kBfloat16Max, so rounding it up stays finite.
  const Eigen::bfloat16 stored_scale = bfloat16_at_or_above(needed);
  return {stored_zero, stored_scale, zero, A(static_cast<float>(stored_scale))};
}

/// The code of x in a group with the stored zero and scale: the nearest integer to
/// (x - zero) / scale, clamped to [0, levels]. Invariant: zero <= x (zero was rounded down from
/// the group's minimum), so the quotient is >= 0 up to rounding; scale 0 means x == zero.
template <int Bits, class A>
unsigned code_of(A x, A zero, A scale) {
  constexpr unsigned levels = QuantBlockFormat<Bits>::levels;
  if (!(scale > 0)) return 0;
  const A shifted = x - zero;  // overflows float only as in quantize_group_range
  const A units = std::isfinite(shifted) ? shifted / scale : x / scale - zero / scale;
  if (!(units > A(0))) return 0;  // also NaN
  if (!(units < A(levels))) return levels;
  return static_cast<unsigned>(units + A(0.5));  // round half up; units + 0.5 <= levels + 0.5
}

/// zero + scale * code in double, clamped to the clamped domain and to T's finite
/// range, rounded once to T.
template <class T>
T dequantized(float zero, float scale, unsigned code) {
  double limit = static_cast<double>(kBfloat16Max);
  if constexpr (std::is_same_v<T, Eigen::half>)
    limit = static_cast<double>(static_cast<float>(Eigen::NumTraits<Eigen::half>::highest()));
  const double value = static_cast<double>(zero) + static_cast<double>(scale) * code;
  const double clamped = std::min(std::max(value, -limit), limit);
  if constexpr (std::is_same_v<T, double>)
    return clamped;
  else
    return static_cast<T>(static_cast<float>(clamped));
}

template <class T>
constexpr void check_quantizer_element() {
  static_assert(is_kv_element_v<T>,
                "kvcache: the element type must be float, double, Eigen::half or Eigen::bfloat16");
}

// ---------------------------------------------------------------------------------------------
// Keys: a block of group_size tokens, per channel
// ---------------------------------------------------------------------------------------------

/// \brief Quantizes the keys of one block: group_size token rows of head_dim elements,
/// row t at rows + t * row_stride (elements), into the block's key codes, zeros and scales.
/// The value parts of the block are left untouched.
///
/// \param rows       (group_size, head_dim) with row stride row_stride, finite elements
/// \param row_stride elements between consecutive tokens (head_dim for BHSD storage,
///                   num_heads * head_dim for BSHD)
/// \param block      format.block_bytes() bytes
template <int Bits, class T>
void quantize_key_block(const T* rows, Index row_stride, const QuantBlockFormat<Bits>& format,
                        std::uint8_t* block) {
  check_quantizer_element<T>();
  using A = accumulator_t<T>;
  const Index tokens = format.group_size, channels = format.head_dim;

  // Pass 1, channel-major: each channel's range over the block's tokens gives its zero and
  // scale. (A block is small, G * D elements; the strided reads stay in L1.)
  for (Index c = 0; c < channels; ++c) {
    A min = to_quantizer_domain(rows[c]);
    A max = min;
    for (Index t = 1; t < tokens; ++t) {  // invariant: [min, max] spans tokens [0, t) of c
      const A x = to_quantizer_domain(rows[t * row_stride + c]);
      min = std::min(min, x);
      max = std::max(max, x);
    }
    const GroupQuantization<A> group = quantize_group_range<Bits>(min, max);
    store_bfloat16(block + format.key_zeros_offset() + 2 * c, group.stored_zero);
    store_bfloat16(block + format.key_scales_offset() + 2 * c, group.stored_scale);
  }

  // Pass 2: each code against the stored (rounded) zero and scale of its channel, into its
  // place in the channel quads (padding channels past head_dim stay 0).
  std::fill_n(block + format.key_codes_offset(), format.key_code_bytes(), std::uint8_t{0});
  for (Index t = 0; t < tokens; ++t) {
    const T* x = rows + t * row_stride;
    for (Index c = 0; c < channels; ++c) {
      const A zero = A(format.key_zero(block, c));
      const A scale = A(format.key_scale(block, c));
      format.put_key_code(block, t, c, code_of<Bits>(to_quantizer_domain(x[c]), zero, scale));
    }
  }
}

/// \brief Dequantizes the key of token `token` (in [0, group_size)) of a block into row
/// (head_dim elements).
template <int Bits, class T>
void dequantize_key_row(const std::uint8_t* block, Index token,
                        const QuantBlockFormat<Bits>& format, T* row) {
  check_quantizer_element<T>();
  for (Index c = 0; c < format.head_dim; ++c)
    row[c] = dequantized<T>(format.key_zero(block, c), format.key_scale(block, c),
                            format.key_code(block, token, c));
}

/// \brief Dequantizes all group_size keys of a block into rows (group_size, head_dim) with row
/// stride row_stride (elements): the twin of quantize_key_block.
template <int Bits, class T>
void dequantize_key_block(const std::uint8_t* block, const QuantBlockFormat<Bits>& format, T* rows,
                          Index row_stride) {
  for (Index t = 0; t < format.group_size; ++t)
    dequantize_key_row(block, t, format, rows + t * row_stride);
}

// ---------------------------------------------------------------------------------------------
// Values: one token, per group of group_size channels
// ---------------------------------------------------------------------------------------------

/// \brief Quantizes the value of token `token` (in [0, group_size)) of a block: row holds
/// head_dim finite elements; writes that token's value codes, zeros and scales only.
template <int Bits, class T>
void quantize_value_row(const T* row, Index token, const QuantBlockFormat<Bits>& format,
                        std::uint8_t* block) {
  check_quantizer_element<T>();
  using A = accumulator_t<T>;
  constexpr Index per_byte = QuantBlockFormat<Bits>::codes_per_byte;
  const Index size = format.group_size;
  std::uint8_t* code_row = block + format.value_code_row_offset(token);
  for (Index g = 0; g < format.groups_per_token(); ++g) {
    const T* x = row + g * size;
    A min = to_quantizer_domain(x[0]);
    A max = min;
    for (Index c = 1; c < size; ++c) {  // invariant: [min, max] spans channels [0, c) of group
      const A value = to_quantizer_domain(x[c]);
      min = std::min(min, value);
      max = std::max(max, value);
    }
    const GroupQuantization<A> group = quantize_group_range<Bits>(min, max);
    const Index at = 2 * format.value_group_index(token, g);
    store_bfloat16(block + format.value_zeros_offset() + at, group.stored_zero);
    store_bfloat16(block + format.value_scales_offset() + at, group.stored_scale);
    // The group's codes: whole bytes, as the group size is a multiple of codes_per_byte.
    for (Index c = 0; c < size; c += per_byte) {
      unsigned byte = 0;
      for (Index k = 0; k < per_byte; ++k)  // int4: even channel low nibble, odd high
        byte |= code_of<Bits>(to_quantizer_domain(x[c + k]), group.zero, group.scale) << (Bits * k);
      code_row[(g * size + c) / per_byte] = static_cast<std::uint8_t>(byte);
    }
  }
}

/// \brief Dequantizes the value of token `token` of a block into row (head_dim elements): the
/// twin of quantize_value_row.
template <int Bits, class T>
void dequantize_value_row(const std::uint8_t* block, Index token,
                          const QuantBlockFormat<Bits>& format, T* row) {
  check_quantizer_element<T>();
  for (Index c = 0; c < format.head_dim; ++c) {
    const Index g = c / format.group_size;
    row[c] = dequantized<T>(format.value_zero(block, token, g), format.value_scale(block, token, g),
                            format.value_code(block, token, c));
  }
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_QUANTIZER_HPP
