// kvcache: the int8/int4 quantization scheme of QuantizedKVCache (KIVI): its configuration and
// the byte format of one quantized block. The scalar quantize/dequantize routines that define
// the numbers are detail/quantizer.hpp. The cache class and the attention kernel build on
// these; they hold no state of their own.
#ifndef KVCACHE_QUANTIZATION_HPP
#define KVCACHE_QUANTIZATION_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <kvcache/errors.hpp>
#include <kvcache/layout.hpp>
#include <limits>
#include <type_traits>

namespace kvcache {

/// \brief How QuantizedKVCache groups its elements.
///
/// * group_size: elements that share one zero point and one scale. Keys are quantized per
///   channel over a block of group_size consecutive tokens (KIVI: robust to the few outlier
///   channels real keys have); values per token over group_size consecutive channels. Must
///   divide head_dim; for int4 it must be even.
/// * residual_length: how many of the most recent positions stay unquantized (KIVI, Hugging
///   Face QuantizedCache), in [0, max_residual_length]. It need not be a multiple of
///   group_size. Keys are quantized one whole block of group_size tokens at a time, oldest
///   first, so the unquantized tail is never shorter than the incomplete last block: it holds
///   up to max(residual_length, group_size - 1) positions (see
///   detail::unquantized_tail_length).
struct QuantConfig {
  static constexpr Index max_residual_length = 64;

  Index group_size = 32;
  Index residual_length = 32;
};

/// \brief Checks a QuantConfig for a cache of the given head_dim and Bits (8 or 4).
///
/// Throws std::invalid_argument, naming the expected and the received value, when head_dim or
/// group_size is not positive, group_size does not divide head_dim, group_size is odd for int4
/// (two 4-bit codes share a byte and a byte must not straddle two value groups; an even divisor
/// also makes head_dim even), or residual_length is outside [0, 64].
template <int Bits>
void validate_quant_config(const QuantConfig& config, Index head_dim) {
  static_assert(Bits == 8 || Bits == 4, "kvcache: quantization Bits must be 8 (int8) or 4 (int4)");
  detail::require_positive("QuantConfig", "head_dim", head_dim);
  detail::require_positive("QuantConfig", "group_size", config.group_size);
  if (Bits == 4 && config.group_size % 2 != 0)
    detail::throw_invalid_argument(
        "QuantConfig: int4 needs an even group_size (two codes per byte): expected an even "
        "divisor of head_dim ",
        head_dim, ", got ", config.group_size);
  if (head_dim % config.group_size != 0)
    detail::throw_invalid_argument(
        "QuantConfig: group_size must divide head_dim: expected a "
        "divisor of ",
        head_dim, ", got ", config.group_size);
  if (config.residual_length < 0 || config.residual_length > QuantConfig::max_residual_length)
    detail::throw_invalid_argument("QuantConfig: residual_length must be in [0, ",
                                   QuantConfig::max_residual_length, "], got ",
                                   config.residual_length);
}

namespace detail {

// ---------------------------------------------------------------------------------------------
// The scheme
//
// One group of elements x (a key channel over group_size tokens, or group_size channels of one
// value token) is stored as codes q in [0, 2^Bits - 1] plus a zero point and a scale, both
// bfloat16:
//
//     x ~= zero + scale * q
//
//   zero  = min(x) rounded DOWN to bfloat16, so zero <= every x of the group;
//   scale = (max(x) - zero) / (2^Bits - 1) rounded UP to bfloat16, so zero + scale * top >= max;
//   q     = nearest integer to (x - zero) / scale, computed against the STORED zero and scale.
//
// Hence |x - (zero + scale * q)| <= scale / 2 for every element (plus float rounding in the
// quantizer, a few ulps of scale). A group whose elements all equal its stored zero gets
// scale 0 and codes 0 and is exact: every constant group of a bfloat16-representable value
// (0 included, every constant bfloat16 input included). A constant group of another value
// (0.1f, say) gets a tiny non-zero scale, about |x| * 2^-7 / (2^Bits - 1) at most (x minus x
// rounded down to bfloat16, over the levels), and the same scale / 2 bound.
//
// Saturation. Inputs are first clamped to the finite bfloat16 range
// [-kBfloat16Max, kBfloat16Max], kBfloat16Max = 0x1.FEp127 ~= 3.3895e38, because zero and scale
// must be finite bfloat16 numbers. Only float inputs of magnitude above 3.3895e38 (the top 0.4%
// of float's range) are affected: they dequantize to +-3.3895e38 (up to their group's scale /
// 2), and the rest of their group's elements keep the scale / 2 bound against that wider range.
// QuantizedKVCache<double>::update refuses finite inputs beyond it (std::invalid_argument), as
// they would lose most of their magnitude; these routines, given one, clamp it the same way.
// +-infinity saturates the same way. Half and bfloat16 inputs never saturate. A NaN input gives
// unspecified (possibly NaN) values for its group, never undefined behaviour. (QuantizedKVCache
// refuses NaN and infinite inputs before quantizing; these routines stay total.)
//
// Every finite input therefore quantizes without overflow: within the clamped range
// max - zero <= 2 * kBfloat16Max may exceed float's range, so the quantizer falls back to
// max / levels - zero / levels there; scale <= 2 * kBfloat16Max / 15 is always a finite
// bfloat16; dequantization computes in double and clamps to [-kBfloat16Max, kBfloat16Max] and
// to T's finite range (it can round half a scale past the clamped input otherwise), so it never
// returns infinity or NaN either.
//
// Arithmetic: the quantizer works in accumulator_t<T> (float, double for double); the reference
// dequantizer computes zero + scale * q in double (the product is exact: bfloat16 x 8-bit code
// fits in 16 bits; the sum rounds at most once) and rounds once to T. A float kernel folding the
// scales into the query differs from it only by float rounding.
// ---------------------------------------------------------------------------------------------

/// The largest finite bfloat16, 0x7F7F: 0x1.FEp127 ~= 3.3895e38.
inline constexpr float kBfloat16Max = 0x1.FEp127f;

/// Whether QuantizedKVCache<T> stores x (update() accepts it, load() accepts it in a tail):
/// finite, and for double of magnitude <= kBfloat16Max (a float beyond it saturates within its
/// group's bound; a double would lose most of its magnitude). T converts to double exactly.
template <class T>
bool quantizable_value(T x) {
  const auto wide = static_cast<double>(x);
  if (!std::isfinite(wide)) return false;
  return !std::is_same_v<T, double> || std::abs(wide) <= static_cast<double>(kBfloat16Max);
}

/// Byte format of one quantized block: the keys and values of group_size consecutive tokens of
/// one (batch row, KV head), D = head_dim, G = group_size, in this order, each part starting
/// right after the previous one:
///
/// | part         | shape                  | type                                | bytes          |
/// |--------------|------------------------|-------------------------------------|----------------|
/// | key codes    | [D/4 quads][G tokens][4]  | uint8 (int8), or 2 per byte (int4)  | 4*ceil(D/4)*G*Bits/8 |
/// | key zeros    | [D channels]              | bfloat16                            | 2*D            |
/// | key scales   | [D channels]              | bfloat16                            | 2*D            |
/// | value codes  | [G tokens][D channels]    | as key codes                        | G*D*Bits/8 (*) |
/// | value zeros  | [G tokens][D/G groups]    | bfloat16                            | 2*D            |
/// | value scales | [G tokens][D/G groups]    | bfloat16                            | 2*D            |
///
/// (*) rounded up to an even byte count so the bfloat16 arrays are 2-byte aligned (only int8
/// with G and D both odd needs it). Block bytes = key code bytes + value code bytes + 8 * D:
/// 72 * D for int8 and 40 * D for int4 at G = 32 and D a multiple of 4. When D is a multiple of
/// 32 and G = 32 every part is a multiple of 64 bytes, so in a 64-byte aligned array of blocks
/// every part starts on a cache line.
///
/// Key codes come in channel quads (format version 2): quad k holds channels 4k .. 4k + 3 (past
/// D: code 0) of the block's G tokens, token by token, the 4 codes of a token side by side. So
/// one vector of bytes holds 4 channels of 16 (or 8) consecutive tokens: an integer dot-product
/// instruction (vpdpbusd, vpmaddwd) multiplies it by 4 query channels broadcast and sums each
/// token's 4 products in its own lane, with no reduction across lanes. int8: byte
/// (k * G + t) * 4 + j is channel 4k + j of token t. int4, H = G / 2: byte (k * H + t % H) * 4
/// + j holds channel 4k + j of token t in its low nibble for t < H, in its high nibble for
/// t >= H (one load gives two vectors of tokens: the low nibbles and the high ones).
/// Codes of a value token are one row of D channels (the value sums read a token's row).
/// int4: channel 2j sits in the low nibble of byte j of the row, channel 2j + 1 in the high
/// nibble. Key group c is channel c over the block's G tokens; value group g of token t is
/// channels [g*G, (g+1)*G) of t. bfloat16 numbers are in native byte order (little-endian on
/// x86). Scales live beside the codes so one block is one contiguous read (DESIGN.md 3); a
/// kernel can fold key scales into the query once per block and key zeros into one constant.
/// (Format version 1 stored key codes like value codes, a row of D channels per token;
/// load() converts such records: detail::key_codes_from_version_1.)
///
/// Requires: G > 0 divides D; for int4 G is even. validate_quant_config checks this.
template <int Bits>
struct QuantBlockFormat {
  static_assert(Bits == 8 || Bits == 4, "kvcache: quantization Bits must be 8 (int8) or 4 (int4)");

  /// The top code, 2^Bits - 1 (255 or 15); codes are [0, levels].
  static constexpr unsigned levels = (1u << Bits) - 1u;
  /// Codes in one byte: 1 for int8, 2 for int4.
  static constexpr Index codes_per_byte = 8 / Bits;

  Index group_size;
  Index head_dim;

  /// Value groups per token: head_dim / group_size.
  constexpr Index groups_per_token() const { return head_dim / group_size; }
  /// Bytes of one value token's codes: head_dim * Bits / 8.
  constexpr Index code_row_bytes() const { return head_dim / codes_per_byte; }
  /// Bytes of a block's value codes, padded to even.
  constexpr Index code_bytes() const {
    const Index raw = group_size * code_row_bytes();
    return raw + raw % 2;
  }
  /// Key channel quads: ceil(head_dim / 4).
  constexpr Index key_quads() const { return (head_dim + 3) / 4; }
  /// Token rows of one key quad: group_size (int8), group_size / 2 (int4: two tokens a byte).
  constexpr Index key_quad_rows() const { return group_size / codes_per_byte; }
  /// Bytes of a block's key codes: 4 bytes per quad and row (always even).
  constexpr Index key_code_bytes() const { return key_quads() * key_quad_rows() * 4; }

  constexpr Index key_codes_offset() const { return 0; }
  constexpr Index key_zeros_offset() const { return key_code_bytes(); }
  constexpr Index key_scales_offset() const { return key_zeros_offset() + 2 * head_dim; }
  constexpr Index value_codes_offset() const { return key_scales_offset() + 2 * head_dim; }
  constexpr Index value_zeros_offset() const { return value_codes_offset() + code_bytes(); }
  constexpr Index value_scales_offset() const { return value_zeros_offset() + 2 * head_dim; }
  /// Bytes of one block: key_code_bytes() + code_bytes() + 8 * head_dim.
  constexpr Index block_bytes() const { return value_scales_offset() + 2 * head_dim; }

  /// The byte holding key code (token, channel), from the block start, and the shift of the
  /// code within it (int4: 4 for the second half of the tokens).
  constexpr Index key_code_byte(Index token, Index channel) const {
    return key_codes_offset() + ((channel / 4) * key_quad_rows() + token % key_quad_rows()) * 4 +
           channel % 4;
  }
  constexpr int key_code_shift(Index token) const {
    return static_cast<int>(Bits * (token / key_quad_rows()));
  }
  /// Offsets of one value token's code row and of one value group's zero/scale.
  constexpr Index value_code_row_offset(Index token) const {
    return value_codes_offset() + token * code_row_bytes();
  }
  constexpr Index value_group_index(Index token, Index group) const {
    return token * groups_per_token() + group;
  }

  // Scalar reads of a stored block (reference twins and tests; a kernel reads the parts with
  // vector loads at the offsets above).
  float key_zero(const std::uint8_t* block, Index channel) const;
  float key_scale(const std::uint8_t* block, Index channel) const;
  unsigned key_code(const std::uint8_t* block, Index token, Index channel) const;
  /// Writes key code (token, channel) into its place, whose bits must be 0 (the quantizer and
  /// the version 1 conversion zero the key codes first: padding channels stay 0).
  void put_key_code(std::uint8_t* block, Index token, Index channel, unsigned code) const;
  float value_zero(const std::uint8_t* block, Index token, Index group) const;
  float value_scale(const std::uint8_t* block, Index token, Index group) const;
  unsigned value_code(const std::uint8_t* block, Index token, Index channel) const;
};

/// \brief Bytes of one quantized block of group_size tokens x head_dim (keys and values).
template <int Bits>
constexpr std::size_t quantized_block_bytes(Index group_size, Index head_dim) {
  return static_cast<std::size_t>(QuantBlockFormat<Bits>{group_size, head_dim}.block_bytes());
}

/// \brief At most this many most recent positions are unquantized: the residual, or the
/// incomplete last key block when residual_length < group_size - 1. Size a cache's
/// full-precision K/V tail buffers with it.
inline Index unquantized_tail_capacity(const QuantConfig& config) {
  return std::max(config.residual_length, config.group_size - 1);
}

/// \brief The unquantized positions of a cache holding `size` positions, under the policy
/// "after each update, quantize the oldest whole blocks while the tail exceeds its capacity C":
/// size itself while size <= C, else the one length in (C - group_size, C] congruent to size
/// modulo group_size. size minus it is a multiple of group_size (whole blocks), and it depends
/// on size alone, so a cache's state does not depend on how its tokens were chunked.
inline Index unquantized_tail_length(Index size, const QuantConfig& config) {
  const Index capacity = unquantized_tail_capacity(config);
  if (size <= capacity) return size;
  const Index excess = (size - capacity) % config.group_size;  // in [0, group_size)
  return capacity - (config.group_size - excess) % config.group_size;
}

// ---------------------------------------------------------------------------------------------
// bfloat16 with directed rounding and bytes
// ---------------------------------------------------------------------------------------------

/// The bfloat16 whose bits are the top 16 bits of `bits`, moved one step away from zero when
/// `away_from_zero` and the dropped bits are not all zero.
inline Eigen::bfloat16 bfloat16_from_float_bits(std::uint32_t bits, bool away_from_zero) {
  std::uint32_t top = bits >> 16;
  if (away_from_zero && (bits & 0xFFFFu) != 0) ++top;  // magnitude + 1 ulp; same sign
  return Eigen::numext::bit_cast<Eigen::bfloat16>(static_cast<std::uint16_t>(top));
}

/// The largest bfloat16 <= x. Requires: -kBfloat16Max <= x <= kBfloat16Max.
inline Eigen::bfloat16 bfloat16_at_or_below(float x) {
  const auto bits = Eigen::numext::bit_cast<std::uint32_t>(x);
  // Truncation rounds toward zero: down for positives, up for negatives.
  return bfloat16_from_float_bits(bits, /*away_from_zero=*/(bits >> 31) != 0);
}

/// The smallest bfloat16 >= x. Requires: -kBfloat16Max <= x <= kBfloat16Max.
inline Eigen::bfloat16 bfloat16_at_or_above(float x) {
  const auto bits = Eigen::numext::bit_cast<std::uint32_t>(x);
  return bfloat16_from_float_bits(bits, /*away_from_zero=*/(bits >> 31) == 0);
}

/// Double versions: first the float on the right side of x (float's range holds the clamped
/// domain), then the bfloat16 on the right side of that float.
inline Eigen::bfloat16 bfloat16_at_or_below(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) > x) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return bfloat16_at_or_below(f);
}
inline Eigen::bfloat16 bfloat16_at_or_above(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return bfloat16_at_or_above(f);
}

/// bfloat16 stores and loads through memcpy: a block is a byte buffer with no bfloat16
/// objects in it, and its arrays need not be aligned.
inline void store_bfloat16(std::uint8_t* at, Eigen::bfloat16 value) {
  std::memcpy(at, &value, sizeof value);
}
inline float load_bfloat16(const std::uint8_t* at) {
  Eigen::bfloat16 value;
  std::memcpy(&value, at, sizeof value);
  return static_cast<float>(value);
}

/// Code `element` of a row of packed codes (int4: even elements in the low nibble).
template <int Bits>
unsigned unpack_code(const std::uint8_t* code_row, Index element) {
  constexpr Index per_byte = QuantBlockFormat<Bits>::codes_per_byte;
  const unsigned byte = code_row[element / per_byte];
  return (byte >> (Bits * (element % per_byte))) & QuantBlockFormat<Bits>::levels;
}

template <int Bits>
float QuantBlockFormat<Bits>::key_zero(const std::uint8_t* block, Index channel) const {
  return load_bfloat16(block + key_zeros_offset() + 2 * channel);
}
template <int Bits>
float QuantBlockFormat<Bits>::key_scale(const std::uint8_t* block, Index channel) const {
  return load_bfloat16(block + key_scales_offset() + 2 * channel);
}
template <int Bits>
unsigned QuantBlockFormat<Bits>::key_code(const std::uint8_t* block, Index token,
                                          Index channel) const {
  return (unsigned(block[key_code_byte(token, channel)]) >> key_code_shift(token)) & levels;
}
template <int Bits>
void QuantBlockFormat<Bits>::put_key_code(std::uint8_t* block, Index token, Index channel,
                                          unsigned code) const {
  std::uint8_t& byte = block[key_code_byte(token, channel)];
  byte = static_cast<std::uint8_t>(byte | (code << key_code_shift(token)));
}
template <int Bits>
float QuantBlockFormat<Bits>::value_zero(const std::uint8_t* block, Index token,
                                         Index group) const {
  return load_bfloat16(block + value_zeros_offset() + 2 * value_group_index(token, group));
}
template <int Bits>
float QuantBlockFormat<Bits>::value_scale(const std::uint8_t* block, Index token,
                                          Index group) const {
  return load_bfloat16(block + value_scales_offset() + 2 * value_group_index(token, group));
}
template <int Bits>
unsigned QuantBlockFormat<Bits>::value_code(const std::uint8_t* block, Index token,
                                            Index channel) const {
  return unpack_code<Bits>(block + value_code_row_offset(token), channel);
}

/// Bytes of a block in persistence format version 1, whose key codes were rows like the value
/// codes: 2 * code_bytes() + 8 * head_dim.
template <int Bits>
constexpr Index version_1_block_bytes(const QuantBlockFormat<Bits>& format) {
  return 2 * format.code_bytes() + 8 * format.head_dim;
}

/// `block` (block_bytes()) = the version 1 block `old` (version_1_block_bytes()) in today's
/// format: its key codes moved from token rows into channel quads; the parts after them (key
/// zeros and scales, value codes, zeros and scales, in the same order) copied as they are.
template <int Bits>
void block_from_version_1(const std::uint8_t* old, const QuantBlockFormat<Bits>& format,
                          std::uint8_t* block) {
  std::fill_n(block + format.key_codes_offset(), format.key_code_bytes(), std::uint8_t{0});
  for (Index t = 0; t < format.group_size; ++t)
    for (Index c = 0; c < format.head_dim; ++c)
      format.put_key_code(block, t, c, unpack_code<Bits>(old + t * format.code_row_bytes(), c));
  std::copy_n(old + format.code_bytes(), format.code_bytes() + 8 * format.head_dim,
              block + format.key_zeros_offset());
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_QUANTIZATION_HPP
