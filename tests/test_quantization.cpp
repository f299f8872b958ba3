// The int8/int4 quantization scheme of QuantizedKVCache on its own: error bounds against the
// stored scales, outlier-robust keys, exact constant groups, no overflow at any finite
// magnitude, the exact bit layout of a block, the configuration checks and the memory it costs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <kvcache/detail/quantizer.hpp>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "support/catch.hpp"
#include "support/reference.hpp"

namespace {

using kvcache::Index;
using kvcache::QuantConfig;
using kvcache::detail::kBfloat16Max;
using kvcache::detail::QuantBlockFormat;

/// A test's (element type, bits) pair.
template <class T, int B>
struct Quant {
  using element = T;
  static constexpr int bits = B;
};

#define KVTEST_ALL_QUANT_CASES                                                       \
  (Quant<float, 8>), (Quant<float, 4>), (Quant<double, 8>), (Quant<double, 4>),      \
      (Quant<Eigen::half, 8>), (Quant<Eigen::half, 4>), (Quant<Eigen::bfloat16, 8>), \
      (Quant<Eigen::bfloat16, 4>)

using Bytes = std::vector<std::uint8_t>;

template <class T>
double as_double(T x) {
  if constexpr (std::is_same_v<T, double>)
    return x;
  else
    return static_cast<double>(static_cast<float>(x));
}

template <class T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, double>)
    return x;
  else
    return static_cast<T>(static_cast<float>(x));
}

/// The input as the scheme sees it: clamped to the finite bfloat16 range (the documented
/// saturation).
double clamped(double x) {
  const double limit = kBfloat16Max;
  return std::min(std::max(x, -limit), limit);
}

/// What |dequantized - input| may be: half the stored scale, a little float slack from the
/// quantizer's own rounding, and the final rounding of the result to T.
/// Machine epsilon of T. (Eigen 3.4's std::numeric_limits<Eigen::half>::epsilon() is 2^-13,
/// not half's 2^-10, so it is written out.)
template <class T>
constexpr double epsilon_of() {
  if constexpr (std::is_same_v<T, Eigen::half>)
    return 0x1p-10;
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    return 0x1p-7;
  else
    return std::numeric_limits<T>::epsilon();
}

template <class T>
double tolerance(double x, double scale) {
  const double epsilon = epsilon_of<T>();
  const double denorm = as_double(std::numeric_limits<T>::denorm_min());
  return 0.5 * scale * (1 + 1e-3) + epsilon * (std::abs(x) + scale) + denorm;
}

/// Gaussian (mean, sigma) numbers rounded to T, from a fixed seed.
template <class T>
std::vector<T> gaussian(std::size_t n, unsigned seed, double mean = 0, double sigma = 1) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(mean, sigma);
  std::vector<T> x(n);
  for (auto& e : x) e = from_double<T>(normal(rng));
  return x;
}

/// Largest error in units of the stored scale, over the elements checked so far.
struct ErrorStats {
  double worst_in_scales = 0;
  double worst_absolute = 0;
  void add(double error, double scale) {
    worst_absolute = std::max(worst_absolute, error);
    if (scale > 0) worst_in_scales = std::max(worst_in_scales, error / scale);
  }
};

/// Quantizes a key block from rows (G rows, stride), dequantizes it, and checks every element:
/// zero <= input, zero + levels * scale covers the channel's maximum, error within tolerance.
template <int Bits, class T>
ErrorStats check_key_round_trip(const std::vector<T>& rows, Index row_stride,
                                const QuantBlockFormat<Bits>& format) {
  const Index G = format.group_size, D = format.head_dim;
  Bytes block(static_cast<std::size_t>(format.block_bytes()), 0xCD);
  kvcache::detail::quantize_key_block<Bits>(rows.data(), row_stride, format, block.data());
  // The value half of the block is untouched.
  for (Index i = format.value_codes_offset(); i < format.block_bytes(); ++i)
    REQUIRE(block[static_cast<std::size_t>(i)] == 0xCD);

  std::vector<T> out(rows.size(), from_double<T>(-7.0));
  kvcache::detail::dequantize_key_block<Bits>(block.data(), format, out.data(), row_stride);
  ErrorStats stats;
  for (Index c = 0; c < D; ++c) {
    const double zero = format.key_zero(block.data(), c);
    const double scale = format.key_scale(block.data(), c);
    double max = -std::numeric_limits<double>::infinity();
    for (Index t = 0; t < G; ++t) {
      const std::size_t i = static_cast<std::size_t>(t * row_stride + c);
      const double x = clamped(as_double(rows[i]));
      const double y = as_double(out[i]);
      CAPTURE(t, c, x, y, zero, scale);
      REQUIRE(std::isfinite(y));
      REQUIRE(zero <= x);
      REQUIRE(format.key_code(block.data(), t, c) <= QuantBlockFormat<Bits>::levels);
      REQUIRE(std::abs(y - x) <= tolerance<T>(x, scale));
      stats.add(std::abs(y - x), scale);
      max = std::max(max, x);
    }
    CAPTURE(c, zero, scale, max);
    REQUIRE(std::isfinite(scale));
    REQUIRE(zero + QuantBlockFormat<Bits>::levels * scale >=
            max - 1e-6 * (std::abs(max) + std::abs(zero)) - 1e-30);
  }
  // Elements between the rows (the stride's padding) are untouched.
  for (Index t = 0; t < G; ++t)
    for (Index c = D; c < row_stride; ++c)
      REQUIRE(as_double(out[static_cast<std::size_t>(t * row_stride + c)]) == -7.0);
  return stats;
}

/// Quantizes row as value token `token` of a block, dequantizes it and checks every element
/// as above, per group of channels.
template <int Bits, class T>
ErrorStats check_value_round_trip(const std::vector<T>& row, Index token,
                                  const QuantBlockFormat<Bits>& format, Bytes& block) {
  kvcache::detail::quantize_value_row<Bits>(row.data(), token, format, block.data());
  std::vector<T> out(row.size());
  kvcache::detail::dequantize_value_row<Bits>(block.data(), token, format, out.data());
  ErrorStats stats;
  for (Index g = 0; g < format.groups_per_token(); ++g) {
    const double zero = format.value_zero(block.data(), token, g);
    const double scale = format.value_scale(block.data(), token, g);
    double max = -std::numeric_limits<double>::infinity();
    for (Index c = g * format.group_size; c < (g + 1) * format.group_size; ++c) {
      const double x = clamped(as_double(row[static_cast<std::size_t>(c)]));
      const double y = as_double(out[static_cast<std::size_t>(c)]);
      CAPTURE(token, g, c, x, y, zero, scale);
      REQUIRE(std::isfinite(y));
      REQUIRE(zero <= x);
      REQUIRE(std::abs(y - x) <= tolerance<T>(x, scale));
      stats.add(std::abs(y - x), scale);
      max = std::max(max, x);
    }
    REQUIRE(std::isfinite(scale));
    REQUIRE(zero + QuantBlockFormat<Bits>::levels * scale >=
            max - 1e-6 * (std::abs(max) + std::abs(zero)) - 1e-30);
  }
  return stats;
}

using kvtest::contains;
using kvtest::message_of;

}  // namespace

TEMPLATE_TEST_CASE("key blocks round-trip within half a stored scale", "[quantization]",
                   KVTEST_ALL_QUANT_CASES) {
  using T = typename TestType::element;
  constexpr int Bits = TestType::bits;
  const Index group = GENERATE(32, 16, 2);
  const Index head_dim = GENERATE(64, 128, 48);
  if (head_dim % group != 0) return;
  const QuantBlockFormat<Bits> format{group, head_dim};
  const Index stride = head_dim + 3;  // a strided view, like one head of a BSHD tensor
  for (unsigned seed = 1; seed <= 4; ++seed) {
    const double mean = seed % 2 ? 0.0 : 2.5;  // ranges off centre too
    const double sigma = seed <= 2 ? 1.0 : 0.01;
    CAPTURE(group, head_dim, seed);
    const auto rows = gaussian<T>(static_cast<std::size_t>(group * stride), seed, mean, sigma);
    check_key_round_trip<Bits>(rows, stride, format);
  }
}

TEMPLATE_TEST_CASE("value rows round-trip within half a stored scale", "[quantization]",
                   KVTEST_ALL_QUANT_CASES) {
  using T = typename TestType::element;
  constexpr int Bits = TestType::bits;
  const Index group = GENERATE(32, 16, 2);
  const Index head_dim = GENERATE(64, 128, 48);
  if (head_dim % group != 0) return;
  const QuantBlockFormat<Bits> format{group, head_dim};
  Bytes block(static_cast<std::size_t>(format.block_bytes()), 0xCD);
  for (Index token = 0; token < group; ++token) {
    CAPTURE(group, head_dim, token);
    const auto row = gaussian<T>(static_cast<std::size_t>(head_dim), 100 + unsigned(token),
                                 token % 3 == 0 ? -1.5 : 0.0, token % 2 ? 3.0 : 0.5);
    check_value_round_trip<Bits>(row, token, format, block);
  }
  // Value rows touched only the value half of the block.
  for (Index i = 0; i < format.value_codes_offset(); ++i)
    REQUIRE(block[static_cast<std::size_t>(i)] == 0xCD);
}

TEMPLATE_TEST_CASE("per-channel keys keep outlier channels from spoiling the others",
                   "[quantization]", (Quant<float, 8>), (Quant<float, 4>),
                   (Quant<Eigen::bfloat16, 4>)) {
  using T = typename TestType::element;
  constexpr int Bits = TestType::bits;
  const Index group = 32, head_dim = 64;
  const std::vector<Index> outliers = {3, 17, 40, 61};  // 4 of 64 channels, 20x larger
  auto is_outlier = [&](Index c) {
    return std::find(outliers.begin(), outliers.end(), c) != outliers.end();
  };
  auto rows = gaussian<T>(static_cast<std::size_t>(group * head_dim), 7);
  for (Index t = 0; t < group; ++t)
    for (Index c : outliers) {
      auto& x = rows[static_cast<std::size_t>(t * head_dim + c)];
      x = from_double<T>(20 * as_double(x));
    }
  const QuantBlockFormat<Bits> format{group, head_dim};

  // KIVI keys: per channel over the block's tokens.
  Bytes block(static_cast<std::size_t>(format.block_bytes()));
  kvcache::detail::quantize_key_block<Bits>(rows.data(), head_dim, format, block.data());
  std::vector<T> keys(rows.size());
  kvcache::detail::dequantize_key_block<Bits>(block.data(), format, keys.data(), head_dim);

  // The same data quantized per token (as values are), for contrast.
  Bytes per_token(static_cast<std::size_t>(format.block_bytes()));
  std::vector<T> tokens(rows.size());
  for (Index t = 0; t < group; ++t) {
    kvcache::detail::quantize_value_row<Bits>(rows.data() + t * head_dim, t, format,
                                              per_token.data());
    kvcache::detail::dequantize_value_row<Bits>(per_token.data(), t, format,
                                                tokens.data() + t * head_dim);
  }

  double key_error = 0, token_error = 0;
  for (Index t = 0; t < group; ++t)
    for (Index c = 0; c < head_dim; ++c) {
      if (is_outlier(c)) continue;
      const std::size_t i = static_cast<std::size_t>(t * head_dim + c);
      key_error = std::max(key_error, std::abs(as_double(keys[i]) - as_double(rows[i])));
      token_error = std::max(token_error, std::abs(as_double(tokens[i]) - as_double(rows[i])));
    }
  CAPTURE(key_error, token_error);
  // sigma 1: a channel spans < 6 sigma over 32 tokens, so its half scale is < 3 / levels;
  // bfloat16's own rounding (2^-8 relative at |x| < 4) comes on top.
  const double half_scale_bound = 3.0 / QuantBlockFormat<Bits>::levels * 1.01;
  const double own_rounding = std::is_same_v<T, Eigen::bfloat16> ? 4 * 0x1p-8 : 0.0;
  REQUIRE(key_error <= half_scale_bound + own_rounding);
  REQUIRE(key_error * 5 < token_error);
}

TEMPLATE_TEST_CASE("constant groups of a bfloat16 number are exact, with scale 0", "[quantization]",
                   KVTEST_ALL_QUANT_CASES) {
  using T = typename TestType::element;
  constexpr int Bits = TestType::bits;
  const Index group = 16, head_dim = 32;
  const QuantBlockFormat<Bits> format{group, head_dim};
  const double constant = GENERATE(0.0, 1.5, -3.25, 1024.0, -0.0078125);
  CAPTURE(constant);

  // Keys: even channels constant, odd channels random.
  auto rows = gaussian<T>(static_cast<std::size_t>(group * head_dim), 11);
  for (Index t = 0; t < group; ++t)
    for (Index c = 0; c < head_dim; c += 2)
      rows[static_cast<std::size_t>(t * head_dim + c)] = from_double<T>(constant);
  Bytes block(static_cast<std::size_t>(format.block_bytes()));
  kvcache::detail::quantize_key_block<Bits>(rows.data(), head_dim, format, block.data());
  std::vector<T> keys(rows.size());
  kvcache::detail::dequantize_key_block<Bits>(block.data(), format, keys.data(), head_dim);
  for (Index c = 0; c < head_dim; c += 2) {
    REQUIRE(format.key_scale(block.data(), c) == 0.0f);
    for (Index t = 0; t < group; ++t) {
      REQUIRE(format.key_code(block.data(), t, c) == 0);
      REQUIRE(as_double(keys[static_cast<std::size_t>(t * head_dim + c)]) == constant);
    }
  }

  // Values: the first group of the row constant, the second random.
  auto row = gaussian<T>(static_cast<std::size_t>(head_dim), 12);
  for (Index c = 0; c < group; ++c) row[static_cast<std::size_t>(c)] = from_double<T>(constant);
  kvcache::detail::quantize_value_row<Bits>(row.data(), 5, format, block.data());
  std::vector<T> values(row.size());
  kvcache::detail::dequantize_value_row<Bits>(block.data(), 5, format, values.data());
  REQUIRE(format.value_scale(block.data(), 5, 0) == 0.0f);
  REQUIRE(format.value_scale(block.data(), 5, 1) > 0.0f);
  for (Index c = 0; c < group; ++c)
    REQUIRE(as_double(values[static_cast<std::size_t>(c)]) == constant);
}

TEMPLATE_TEST_CASE("a constant group of a number bfloat16 cannot hold gets a tiny scale",
                   "[quantization]", (Quant<float, 8>), (Quant<float, 4>), (Quant<double, 8>),
                   (Quant<double, 4>)) {
  using T = typename TestType::element;
  constexpr int Bits = TestType::bits;
  const QuantBlockFormat<Bits> format{32, 64};
  const double constant = GENERATE(0.1, -123.456, 3e-30);
  std::vector<T> row(64, from_double<T>(constant));
  Bytes block(static_cast<std::size_t>(format.block_bytes()));
  const ErrorStats s = check_value_round_trip<Bits>(row, 0, format, block);
  const double scale = format.value_scale(block.data(), 0, 0);
  CAPTURE(constant, scale, s.worst_absolute);
  REQUIRE(scale <= std::abs(constant) * 0x1p-6 / QuantBlockFormat<Bits>::levels);
}

TEMPLATE_TEST_CASE("huge magnitudes never give infinity or NaN", "[quantization]",
                   KVTEST_ALL_QUANT_CASES) {
  using T = typename TestType::element;
  constexpr int Bits = TestType::bits;
  const Index group = 8, head_dim = 16;
  const QuantBlockFormat<Bits> format{group, head_dim};
  const double top = static_cast<double>(std::numeric_limits<T>::max());
  // Magnitudes T holds: its largest finite number, and for float and double values beyond the
  // bfloat16 range too (which saturate to +-kBfloat16Max: see quantization.hpp).
  std::vector<double> extremes = {top, -top, top / 3, -top / 7};
  if constexpr (std::is_same_v<T, float>) extremes.insert(extremes.end(), {3e38, -3e38});
  if constexpr (std::is_same_v<T, double>)
    extremes.insert(extremes.end(), {1e300, -1e300, 1e39, -3.4e38});

  for (double extreme : extremes) {
    CAPTURE(extreme);
    // Keys: each channel over the block's tokens mixes the extreme with ordinary numbers, one
    // channel is constant at the extreme, one has both signs of it.
    auto rows = gaussian<T>(static_cast<std::size_t>(group * head_dim), 21);
    for (Index c = 0; c < head_dim; ++c)
      rows[static_cast<std::size_t>(c)] = from_double<T>(extreme);
    for (Index t = 0; t < group; ++t) {
      rows[static_cast<std::size_t>(t * head_dim + 1)] = from_double<T>(extreme);
      rows[static_cast<std::size_t>(t * head_dim + 2)] = from_double<T>(t % 2 ? extreme : -extreme);
    }
    check_key_round_trip<Bits>(rows, head_dim, format);

    // Values: the same mixes along a token's channels.
    Bytes block(static_cast<std::size_t>(format.block_bytes()));
    auto row = gaussian<T>(static_cast<std::size_t>(head_dim), 22);
    row[0] = from_double<T>(extreme);
    for (Index c = group; c < head_dim; ++c)
      row[static_cast<std::size_t>(c)] = from_double<T>(c % 2 ? extreme : -extreme);
    check_value_round_trip<Bits>(row, 3, format, block);

    // A saturated extreme comes back as the bfloat16 limit itself.
    if (std::abs(extreme) > kBfloat16Max) {
      std::vector<T> constant(static_cast<std::size_t>(head_dim), from_double<T>(extreme));
      std::vector<T> out(constant.size());
      kvcache::detail::quantize_value_row<Bits>(constant.data(), 0, format, block.data());
      kvcache::detail::dequantize_value_row<Bits>(block.data(), 0, format, out.data());
      for (const T& y : out) REQUIRE(as_double(y) == std::copysign(double(kBfloat16Max), extreme));
    }
  }
}

TEMPLATE_TEST_CASE("codes sit in the documented bytes: values by token row, keys in channel quads",
                   "[quantization]", KVTEST_ALL_QUANT_CASES) {
  using T = typename TestType::element;
  constexpr int Bits = TestType::bits;
  constexpr unsigned levels = QuantBlockFormat<Bits>::levels;
  const Index group = 32, head_dim = 64;
  const QuantBlockFormat<Bits> format{group, head_dim};
  // Integers in [0, levels] with 0 and levels in every group: zero 0, scale exactly 1, so each
  // code is its integer and every number is exact in T.
  auto code = [](Index t, Index c, Index first) -> unsigned {
    if (first == 0) return 0;
    if (first == 1) return levels;
    return static_cast<unsigned>((t * 37 + c * 11) % (levels + 1));
  };
  std::vector<T> keys(static_cast<std::size_t>(group * head_dim));
  std::vector<T> values(keys.size());
  for (Index t = 0; t < group; ++t)
    for (Index c = 0; c < head_dim; ++c) {
      keys[static_cast<std::size_t>(t * head_dim + c)] = from_double<T>(code(t, c, t));
      values[static_cast<std::size_t>(t * head_dim + c)] = from_double<T>(code(t, c, c % group));
    }
  Bytes block(static_cast<std::size_t>(format.block_bytes()));
  kvcache::detail::quantize_key_block<Bits>(keys.data(), head_dim, format, block.data());
  for (Index t = 0; t < group; ++t)
    kvcache::detail::quantize_value_row<Bits>(values.data() + t * head_dim, t, format,
                                              block.data());

  auto byte_at = [&](Index offset) { return unsigned(block[static_cast<std::size_t>(offset)]); };
  auto expected_byte = [&](Index t, Index j, bool key) {
    auto at = [&](Index c) { return key ? code(t, c, t) : code(t, c, c % group); };
    return Bits == 8 ? at(j) : (at(2 * j) | (at(2 * j + 1) << 4));
  };
  const Index row_bytes = head_dim * Bits / 8;
  REQUIRE(format.code_row_bytes() == row_bytes);
  for (Index t = 0; t < group; ++t)
    for (Index j = 0; j < row_bytes; ++j) {
      CAPTURE(t, j);
      REQUIRE(byte_at(format.value_codes_offset() + t * row_bytes + j) ==
              expected_byte(t, j, false));
    }
  // Key codes in channel quads: channel 4k + j of token t at byte (k * R + t % R) * 4 + j,
  // R = G (int8) or G / 2 (int4: tokens t >= R in the high nibbles); padding channels 0.
  const Index quad_rows = Bits == 8 ? group : group / 2;
  REQUIRE(format.key_code_bytes() == (head_dim + 3) / 4 * quad_rows * 4);
  for (Index k = 0; k < (head_dim + 3) / 4; ++k)
    for (Index r = 0; r < quad_rows; ++r)
      for (Index j = 0; j < 4; ++j) {
        const Index c = 4 * k + j;
        auto key = [&](Index t) { return c < head_dim ? code(t, c, t) : 0u; };
        const unsigned want = Bits == 8 ? key(r) : key(r) | (key(r + quad_rows) << 4);
        CAPTURE(k, r, j);
        REQUIRE(byte_at((k * quad_rows + r) * 4 + j) == want);
      }
  for (Index c = 0; c < head_dim; ++c) {
    REQUIRE(format.key_zero(block.data(), c) == 0.0f);
    REQUIRE(format.key_scale(block.data(), c) == 1.0f);
  }
  for (Index t = 0; t < group; ++t)
    for (Index g = 0; g < format.groups_per_token(); ++g) {
      REQUIRE(format.value_zero(block.data(), t, g) == 0.0f);
      REQUIRE(format.value_scale(block.data(), t, g) == 1.0f);
    }
  // bfloat16 1.0 is 0x3F80, stored in native (little-endian) order.
  REQUIRE(byte_at(format.key_scales_offset()) == 0x80);
  REQUIRE(byte_at(format.key_scales_offset() + 1) == 0x3F);

  // Integers come back exactly.
  std::vector<T> out(keys.size());
  kvcache::detail::dequantize_key_block<Bits>(block.data(), format, out.data(), head_dim);
  for (std::size_t i = 0; i < keys.size(); ++i) REQUIRE(as_double(out[i]) == as_double(keys[i]));
  for (Index t = 0; t < group; ++t)
    kvcache::detail::dequantize_value_row<Bits>(block.data(), t, format, out.data() + t * head_dim);
  for (std::size_t i = 0; i < values.size(); ++i)
    REQUIRE(as_double(out[i]) == as_double(values[i]));
}

TEST_CASE("block format: offsets, sizes and padding", "[quantization]") {
  using kvcache::detail::quantized_block_bytes;
  // G = 32: 72 D bytes (int8), 40 D bytes (int4).
  for (Index d : {32, 64, 128, 256}) {
    REQUIRE(quantized_block_bytes<8>(32, d) == std::size_t(72 * d));
    REQUIRE(quantized_block_bytes<4>(32, d) == std::size_t(40 * d));
  }
  const QuantBlockFormat<4> f{32, 128};
  REQUIRE(f.key_codes_offset() == 0);
  REQUIRE(f.key_zeros_offset() == 2048);
  REQUIRE(f.key_scales_offset() == 2048 + 256);
  REQUIRE(f.value_codes_offset() == 2048 + 512);
  REQUIRE(f.value_zeros_offset() == 2 * 2048 + 512);
  REQUIRE(f.value_scales_offset() == 2 * 2048 + 512 + 256);
  REQUIRE(f.block_bytes() == 2 * 2048 + 1024);
  for (Index offset : {f.key_zeros_offset(), f.key_scales_offset(), f.value_codes_offset(),
                       f.value_zeros_offset(), f.value_scales_offset(), f.block_bytes()})
    REQUIRE(offset % 64 == 0);
  // int8 with an odd group and head_dim: the code parts are padded to keep bfloat16 aligned.
  // Keys come in channel quads: 3 quads (12 channels, 3 of them padding) x 3 tokens x 4 bytes.
  const QuantBlockFormat<8> odd{3, 9};
  REQUIRE(odd.code_bytes() == 28);
  REQUIRE(odd.key_code_bytes() == 36);
  REQUIRE(odd.key_zeros_offset() % 2 == 0);
  REQUIRE(odd.value_zeros_offset() % 2 == 0);
  REQUIRE(odd.block_bytes() == 36 + 28 + 8 * 9);
  // ... and still round-trips.
  const auto rows = gaussian<float>(27, 31);
  check_key_round_trip<8>(rows, 9, odd);
  Bytes block(static_cast<std::size_t>(odd.block_bytes()));
  check_value_round_trip<8>(std::vector<float>(rows.begin(), rows.begin() + 9), 2, odd, block);
}

TEST_CASE("memory: int8 <= 0.32x and int4 <= 0.19x of a float cache at 1024 tokens",
          "[quantization]") {
  using kvcache::detail::quantized_block_bytes;
  const QuantConfig config;  // group 32, residual 32
  REQUIRE(config.group_size == 32);
  REQUIRE(config.residual_length == 32);
  const Index tokens = 1024;
  const Index head_dim = GENERATE(64, 128);
  // Per (batch row, KV head): every position's block (an upper bound: with the residual, at
  // most 1024 - 1 of them are ever quantized), plus a float K and V residual buffer.
  const Index blocks = (tokens + config.group_size - 1) / config.group_size;
  const double residual = 2.0 * double(kvcache::detail::unquantized_tail_capacity(config)) *
                          double(head_dim) * sizeof(float);
  const double float_cache = 2.0 * double(tokens) * double(head_dim) * sizeof(float);
  const double int8 =
      (double(blocks) * double(quantized_block_bytes<8>(config.group_size, head_dim)) + residual) /
      float_cache;
  const double int4 =
      (double(blocks) * double(quantized_block_bytes<4>(config.group_size, head_dim)) + residual) /
      float_cache;
  CAPTURE(head_dim, int8, int4);
  REQUIRE(kvcache::detail::unquantized_tail_capacity(config) == config.residual_length);
  CHECK(int8 <= 0.32);  // 0.3125: (72 D * 32 + 256 D) / 8192 D
  CHECK(int4 <= 0.19);  // 0.1875: (40 D * 32 + 256 D) / 8192 D
}

TEST_CASE("the unquantized tail: capacity, and whole blocks before it", "[quantization]") {
  using kvcache::detail::unquantized_tail_capacity;
  using kvcache::detail::unquantized_tail_length;
  const std::vector<QuantConfig> configs = {{32, 32}, {32, 0}, {16, 40}, {64, 32}, {1, 0}, {2, 64}};
  for (const QuantConfig& config : configs) {
    const Index capacity = unquantized_tail_capacity(config);
    CAPTURE(config.group_size, config.residual_length, capacity);
    REQUIRE(capacity == std::max(config.residual_length, config.group_size - 1));
    Index quantized_before = 0;
    for (Index size = 0; size <= 300; ++size) {
      const Index tail = unquantized_tail_length(size, config);
      CAPTURE(size, tail);
      REQUIRE(tail >= 0);
      REQUIRE(tail <= capacity);
      REQUIRE((size - tail) % config.group_size == 0);
      if (size <= capacity)
        REQUIRE(tail == size);
      else
        REQUIRE(tail > capacity - config.group_size);
      REQUIRE(size - tail >= quantized_before);  // blocks are only ever added
      quantized_before = size - tail;
    }
  }
  REQUIRE(unquantized_tail_length(1024, QuantConfig{}) == 32);
  REQUIRE(unquantized_tail_length(1025, QuantConfig{}) == 1);
}

TEST_CASE("QuantConfig validation names expected and received values", "[quantization]") {
  using kvcache::validate_quant_config;
  REQUIRE_NOTHROW(validate_quant_config<8>(QuantConfig{}, 128));
  REQUIRE_NOTHROW(validate_quant_config<4>(QuantConfig{}, 64));
  REQUIRE_NOTHROW(validate_quant_config<8>(QuantConfig{3, 0}, 9));      // int8: odd is fine
  REQUIRE_NOTHROW(validate_quant_config<4>(QuantConfig{64, 32}, 128));  // residual < group
  REQUIRE_NOTHROW(validate_quant_config<4>(QuantConfig{32, 64}, 128));
  REQUIRE_NOTHROW(validate_quant_config<8>(QuantConfig{32, 40}, 64));  // not a multiple

  std::string m = message_of<std::invalid_argument>(
      [] { validate_quant_config<8>(QuantConfig{48, 32}, 128); });
  CAPTURE(m);
  REQUIRE(contains(m, "group_size"));
  REQUIRE(contains(m, "128"));
  REQUIRE(contains(m, "got 48"));

  m = message_of<std::invalid_argument>([] { validate_quant_config<8>(QuantConfig{0, 32}, 128); });
  REQUIRE(contains(m, "group_size"));
  REQUIRE(contains(m, "got 0"));
  m = message_of<std::invalid_argument>([] { validate_quant_config<4>(QuantConfig{-4, 32}, 128); });
  REQUIRE(contains(m, "got -4"));

  m = message_of<std::invalid_argument>([] { validate_quant_config<4>(QuantConfig{3, 32}, 9); });
  CAPTURE(m);
  REQUIRE(contains(m, "int4"));
  REQUIRE(contains(m, "even"));
  REQUIRE(contains(m, "got 3"));

  m = message_of<std::invalid_argument>([] { validate_quant_config<8>(QuantConfig{32, 65}, 128); });
  CAPTURE(m);
  REQUIRE(contains(m, "residual_length"));
  REQUIRE(contains(m, "[0, 64]"));
  REQUIRE(contains(m, "got 65"));
  m = message_of<std::invalid_argument>([] { validate_quant_config<8>(QuantConfig{32, -1}, 128); });
  REQUIRE(contains(m, "got -1"));

  m = message_of<std::invalid_argument>([] { validate_quant_config<8>(QuantConfig{}, 0); });
  REQUIRE(contains(m, "head_dim"));
  REQUIRE(contains(m, "got 0"));
}

TEST_CASE("bfloat16 directed rounding gives the neighbours of x", "[quantization]") {
  using kvcache::detail::bfloat16_at_or_above;
  using kvcache::detail::bfloat16_at_or_below;
  auto magnitude_bits = [](Eigen::bfloat16 b) {
    return Eigen::numext::bit_cast<std::uint16_t>(b) & 0x7FFFu;
  };
  auto sign = [](Eigen::bfloat16 b) { return Eigen::numext::bit_cast<std::uint16_t>(b) >> 15; };
  // below <= x <= above, equal iff x is a bfloat16 number, else one ulp apart.
  auto check = [&](auto x) {
    const Eigen::bfloat16 below = bfloat16_at_or_below(x), above = bfloat16_at_or_above(x);
    const double lo = static_cast<float>(below), hi = static_cast<float>(above);
    const double value = static_cast<double>(x);
    CAPTURE(value, lo, hi);
    REQUIRE(std::isfinite(lo));
    REQUIRE(std::isfinite(hi));
    REQUIRE(lo <= value);
    REQUIRE(value <= hi);
    const bool exact =
        static_cast<double>(static_cast<float>(Eigen::bfloat16(float(value)))) == value;
    if (exact) {
      REQUIRE(lo == value);
      REQUIRE(hi == value);
    } else {
      const int mb = int(magnitude_bits(below)), ma = int(magnitude_bits(above));
      REQUIRE(std::abs(mb - ma) == 1);
      if (mb != 0 && ma != 0) REQUIRE(sign(below) == sign(above));
    }
  };
  std::mt19937 rng(41);
  std::uniform_real_distribution<double> unit(1.0, 2.0);
  std::uniform_int_distribution<int> exponent(-140, 127);
  for (int i = 0; i < 20000; ++i) {
    const double x = std::ldexp(unit(rng), exponent(rng)) * (i % 2 ? 1 : -1);
    if (std::abs(x) > kBfloat16Max) continue;
    check(static_cast<float>(x));
    check(x);
  }
  for (double x : {0.0, -0.0, 1.0, -1.0, 0.1, -0.1, double(kBfloat16Max), -double(kBfloat16Max),
                   1e-45, -1e-45, 1e-300, -1e-300, 3e38, -3e38}) {
    check(x);
    if (std::abs(x) >= 1e-45) check(static_cast<float>(x));
  }
}

TEST_CASE("quantization bits other than 8 and 4 do not compile", "[quantization]") {
  // QuantBlockFormat<3> and validate_quant_config<2> stop at a static_assert naming 8 and 4;
  // a compile-failure test cannot live in this executable, so this only records the intent.
  STATIC_REQUIRE(QuantBlockFormat<8>::levels == 255);
  STATIC_REQUIRE(QuantBlockFormat<4>::levels == 15);
  STATIC_REQUIRE(QuantBlockFormat<4>::codes_per_byte == 2);
}
