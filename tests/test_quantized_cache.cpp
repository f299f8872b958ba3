// QuantizedKVCache (Int8KVCache, Int4KVCache): keys()/values() against the quantization
// primitives, attend() over the integer storage against the double reference on the
// dequantized keys()/values() (the fused kernel exactly, every masking rule), accuracy against
// the float cache next to a llama.cpp-style q8_0/q4_0 baseline, the memory targets,
// chunking-independent incremental quantization, crop/reset, every error path with the cache
// unchanged, and thread-count independence.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <random>
#include <vector>

#include "support/catch.hpp"
#include "support/reference.hpp"
#include "support/snapshot.hpp"

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::Int4KVCache;
using kvcache::Int8KVCache;
using kvcache::QuantConfig;
using kvcache::QuantizedKVCache;
using kvcache::StaticKVCache;
namespace kd = kvcache::detail;

namespace {

/// A test's (element type, bits, layout).
template <class T, int B, class L>
struct QCase {
  using element = T;
  using layout = L;
  static constexpr int bits = B;
};

QuantConfig config(Index group_size, Index residual_length) {
  QuantConfig c;
  c.group_size = group_size;
  c.residual_length = residual_length;
  return c;
}

/// Positions [begin, begin + length) of a then b's positions [0, b_len): along the seq axis.
template <class L, class T>
Tensor4<T> concat_seq(const Tensor4<T>& a, Index a_len, const Tensor4<T>& b) {
  const Index batch = batch_of<L>(a), h = heads_of<L>(a), d = head_dim_of<L>(a),
              b_len = seq_of<L>(b);
  Tensor4<T> out(dims<L>(batch, h, a_len + b_len, d));
  for (Index bi = 0; bi < batch; ++bi)
    for (Index hi = 0; hi < h; ++hi)
      for (Index s = 0; s < a_len + b_len; ++s)
        for (Index c = 0; c < d; ++c)
          at<L>(out, bi, hi, s, c) =
              s < a_len ? at<L>(a, bi, hi, s, c) : at<L>(b, bi, hi, s - a_len, c);
  return out;
}

/// What keys() and values() of a QuantizedKVCache fed exactly the first `size` positions of
/// k, v (all batch rows) must be, built from the primitives of quantization.hpp: whole blocks
/// of the quantized part quantized and dequantized, the tail copied.
template <int Bits, class L, class T>
std::pair<Tensor4<T>, Tensor4<T>> expected_contents(const Tensor4<T>& k, const Tensor4<T>& v,
                                                    Index size, const QuantConfig& cfg) {
  const Index batch = batch_of<L>(k), heads = heads_of<L>(k), d = head_dim_of<L>(k);
  const Index g = cfg.group_size;
  const Index quantized = size - kd::unquantized_tail_length(size, cfg);
  REQUIRE(quantized % g == 0);
  const kd::QuantBlockFormat<Bits> format{g, d};
  std::vector<std::uint8_t> block(static_cast<std::size_t>(format.block_bytes()));
  std::vector<T> rows(static_cast<std::size_t>(g * d)), row(static_cast<std::size_t>(d));
  Tensor4<T> keys(dims<L>(batch, heads, size, d)), values(dims<L>(batch, heads, size, d));
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < heads; ++h) {
      for (Index first = 0; first < quantized; first += g) {
        for (Index t = 0; t < g; ++t) {
          for (Index c = 0; c < d; ++c) {
            rows[static_cast<std::size_t>(t * d + c)] = at<L>(k, b, h, first + t, c);
            row[static_cast<std::size_t>(c)] = at<L>(v, b, h, first + t, c);
          }
          kd::quantize_value_row<Bits>(row.data(), t, format, block.data());
        }
        kd::quantize_key_block<Bits>(rows.data(), d, format, block.data());
        for (Index t = 0; t < g; ++t) {
          kd::dequantize_key_row<Bits>(block.data(), t, format, row.data());
          for (Index c = 0; c < d; ++c) at<L>(keys, b, h, first + t, c) = row[std::size_t(c)];
          kd::dequantize_value_row<Bits>(block.data(), t, format, row.data());
          for (Index c = 0; c < d; ++c) at<L>(values, b, h, first + t, c) = row[std::size_t(c)];
        }
      }
      for (Index p = quantized; p < size; ++p)
        for (Index c = 0; c < d; ++c) {
          at<L>(keys, b, h, p, c) = at<L>(k, b, h, p, c);
          at<L>(values, b, h, p, c) = at<L>(v, b, h, p, c);
        }
    }
  return {keys, values};
}

/// The bound on kernel_error: T's tolerance, except for float, whose scores the kernel takes
/// from the folded query rounded to about 15 bits per row and block (docs/kernel.md, "Integer
/// scores"): a score is off by up to half a step per channel times the channel's code, and a
/// row that sees few keys passes that almost whole into its output (the worst measured here:
/// 1.1e-4). The accuracy table below measures what it costs against the float cache: nothing
/// visible (the same errors to three digits).
template <class T>
constexpr double kernel_tolerance() {
  if constexpr (std::is_same_v<T, float>)
    return 3e-4;
  else
    return tolerance<T>();
}

/// Worst difference between attend() over the cache and the double reference over the
/// cache's own (dequantized) keys() and values(): checks the fused kernel, not the scheme.
template <class Cache, class T = typename Cache::element_type>
double kernel_error(const Cache& cache, const Tensor4<T>& q, const AttendOptions& options) {
  using L = typename Cache::layout_type;
  const Tensor4<T> got = kvcache::attend(q, cache, options);
  const Index q_len = seq_of<L>(q);
  const auto want =
      reference_attention<L>(q, cache.keys(), cache.values(), iota_positions(cache.size()),
                             cache.size() - q_len, rules_from(options));
  return max_abs_diff(got, want);
}

/// Relative L2 error ||got - want|| / ||want||.
template <class A, class B>
double relative_l2(const A& got, const B& want) {
  double num = 0, den = 0;
  for (Index i = 0; i < got.size(); ++i) {
    const double w = double(want.data()[i]);
    const double diff = double(got.data()[i]) - w;
    num += diff * diff;
    den += w * w;
  }
  return std::sqrt(num / den);
}

/// Gaussian (b, h, s, d) float tensor; channels c with c % 64 < outliers scaled by 20.
Tensor4<float> gaussian(Index b, Index h, Index s, Index d, unsigned seed, Index outliers = 0) {
  Tensor4<float> x(b, h, s, d);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Index i = 0; i < x.size(); ++i) {
    const Index c = i % d;
    x.data()[i] = normal(rng) * (c % 64 < outliers ? 20.0f : 1.0f);
  }
  return x;
}

/// The llama.cpp-style baseline: symmetric per-token blocks of 32 channels, one scale each
/// (stored as half, as ggml does), no zero point. q8_0: d = absmax / 127, codes round(x / d) in
/// [-127, 127]. q4_0: d = m / -8 where m is the element of largest magnitude (with its sign),
/// codes min(15, int(x / d + 8.5)) in [0, 15], x ~ (code - 8) * d (ggml's quantize_row_q4_0
/// and dequantize_row_q4_0, with the scale rounded to half before coding as here; approximate
/// in that ggml codes against the float scale). Returns the dequantized tensor.
Tensor4<float> llama_cpp_baseline(const Tensor4<float>& x, int bits) {
  Tensor4<float> out(x.dimensions());
  const Index block = 32;
  for (Index first = 0; first < x.size(); first += block) {  // head_dim % 32 == 0
    const float* in = x.data() + first;
    float* res = out.data() + first;
    float absmax = 0, signed_max = 0;
    for (Index i = 0; i < block; ++i)
      if (std::abs(in[i]) > absmax) {
        absmax = std::abs(in[i]);
        signed_max = in[i];
      }
    if (bits == 8) {
      const float d = static_cast<float>(Eigen::half(absmax / 127.0f));
      for (Index i = 0; i < block; ++i) {
        const float code = d > 0 ? std::min(127.0f, std::max(-127.0f, std::round(in[i] / d))) : 0;
        res[i] = code * d;
      }
    } else {
      const float d = static_cast<float>(Eigen::half(signed_max / -8.0f));
      const float id = d != 0 ? 1.0f / d : 0.0f;
      for (Index i = 0; i < block; ++i) {
        const int code = std::max(0, std::min(15, static_cast<int>(in[i] * id + 8.5f)));
        res[i] = static_cast<float>(code - 8) * d;
      }
    }
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// (1) contents
// ------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("keys()/values() are the primitives' dequantization, the tail exact",
                   "[quantized_cache]", (QCase<float, 8, BHSD>), (QCase<float, 4, BSHD>),
                   (QCase<Eigen::bfloat16, 4, BHSD>), (QCase<Eigen::half, 8, BSHD>),
                   (QCase<double, 4, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  constexpr int Bits = TestType::bits;
  // (group, residual): residual < group - 1, > group, 0, and the default.
  const auto [group, residual] = GENERATE(table<Index, Index>({{4, 1}, {4, 9}, {8, 0}, {32, 32}}));
  const Index head_dim = group == 32 ? 64 : 24;
  CAPTURE(group, residual, head_dim);
  const QuantConfig cfg = config(group, residual);
  const Index total = 3 * group + 2 * std::max(residual, group) + 5;
  const Tensor4<T> k = random_tensor<T, L>(2, 3, total, head_dim, 1, 2.0);
  const Tensor4<T> v = random_tensor<T, L>(2, 3, total, head_dim, 2, 0.5);
  QuantizedKVCache<T, Bits, L> cache(2, total, 3, head_dim, cfg);
  REQUIRE(cache.capacity() == total);
  REQUIRE(cache.config().group_size == group);
  Index size = 0;
  // Chunks of 1, 2, 3, ... tokens: every tail length and block boundary passes by.
  for (Index n = 1; size < total; ++n) {
    const Index len = std::min(n, total - size);
    cache.update(slice_seq<L>(k, size, len), slice_seq<L>(v, size, len));
    size += len;
    CAPTURE(size);
    REQUIRE(cache.size() == size);
    REQUIRE(cache.position() == size);
    REQUIRE(cache.quantized_size() == size - kd::unquantized_tail_length(size, cfg));
    const auto want = expected_contents<Bits, L>(k, v, size, cfg);
    REQUIRE(equal(cache.keys(), want.first));
    REQUIRE(equal(cache.values(), want.second));
  }
}

TEST_CASE("rows an update does not cover are zero; TensorMaps are accepted", "[quantized_cache]") {
  const Index d = 16;
  const QuantConfig cfg = config(8, 3);
  Int4KVCache<float> cache(3, 40, 2, d, cfg);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 2, 30, d, 5);
  const Tensor4<float> v = random_tensor<float, BHSD>(1, 2, 30, d, 6);
  Eigen::TensorMap<const Tensor4<float>> k_map(k.data(), 1, 2, 30, d);
  Eigen::TensorMap<const Tensor4<float>> v_map(v.data(), 1, 2, 30, d);
  cache.update(k_map, v_map);
  REQUIRE(cache.quantized_size() > 0);
  const Tensor4<float> keys = cache.keys(), values = cache.values();
  for (Index b = 1; b < 3; ++b)
    for (Index h = 0; h < 2; ++h)
      for (Index p = 0; p < 30; ++p)
        for (Index c = 0; c < d; ++c) {
          REQUIRE(keys(b, h, p, c) == 0.0f);
          REQUIRE(values(b, h, p, c) == 0.0f);
        }
  // Row 0 as if the cache had one row.
  Int4KVCache<float> single(1, 40, 2, d, cfg);
  single.update(k, v);
  REQUIRE(equal(slice_seq<BHSD>(keys, 0, 30, 1), single.keys()));
  REQUIRE(equal(slice_seq<BHSD>(values, 0, 30, 1), single.values()));
}

// ------------------------------------------------------------------------------------------
// (2) the fused kernel against the reference on the dequantized contents
// ------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("attend over the integer storage equals attention over keys()/values()",
                   "[quantized_cache]", (QCase<float, 8, BHSD>), (QCase<float, 4, BSHD>),
                   (QCase<Eigen::bfloat16, 4, BHSD>), (QCase<Eigen::half, 8, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  constexpr int Bits = TestType::bits;
  // head_dim 64 with the default config, 20 = 2 groups of 10 with a residual of 7, and 96 =
  // 3 groups of 32 (int4 loads value codes by parity in pairs of vectors within a group: with
  // 16 lanes a strip of two pairs, then one pair).
  const auto [head_dim, group, residual] =
      GENERATE(table<Index, Index, Index>({{64, 32, 32}, {20, 10, 7}, {96, 32, 0}}));
  const Index rep = GENERATE(1, 4);  // GQA
  CAPTURE(head_dim, group, residual, rep);
  const Index batch = 2, heads = 2, total = 150;
  const Tensor4<T> k = random_tensor<T, L>(batch, heads, total, head_dim, 11);
  const Tensor4<T> v = random_tensor<T, L>(batch, heads, total, head_dim, 12);
  QuantizedKVCache<T, Bits, L> cache(batch, total, heads, head_dim, config(group, residual));

  Mask key_mask(batch, total);
  std::mt19937 rng(13);
  for (Index i = 0; i < key_mask.size(); ++i) key_mask.data()[i] = rng() % 4 != 0;

  unsigned seed = 100;
  Index size = 0;
  // A prefill over several blocks, then decode steps, then a chunk.
  // Decode rows with every batch row and with fewer; prefill rows (the whole chunk) with one.
  for (Index n : {Index(90), Index(1), Index(3), Index(40)}) {
    cache.update(slice_seq<L>(k, size, n), slice_seq<L>(v, size, n));
    size += n;
    REQUIRE(cache.quantized_size() > 0);
    for (Index q_len : {Index(1), n}) {
      for (Index q_batch : {batch, Index(1)}) {
        if (q_len > 1 && q_batch == batch) continue;
        const Tensor4<T> q = random_tensor<T, L>(q_batch, rep * heads, q_len, head_dim, seed++);
        Mask mask(batch, size);
        for (Index b = 0; b < batch; ++b)
          for (Index p = 0; p < size; ++p) mask(b, p) = key_mask(b, p);
        AttendOptions plain, bidirectional, windowed, masked, capped;
        bidirectional.causal = false;
        windowed.window = 37;  // ends inside a quantized block
        masked.key_mask = &mask;
        capped.softcap = 2.0f;
        capped.scale = 2.0f;  // scores past the cap
        for (const AttendOptions* options : {&plain, &bidirectional, &windowed, &masked, &capped}) {
          CAPTURE(size, q_len, q_batch, options->causal, options->window, options->softcap);
          REQUIRE(kernel_error(cache, q, *options) < kernel_tolerance<T>());
        }
      }
    }
  }
}

TEST_CASE("rows with nothing visible in the quantized part are zeros", "[quantized_cache]") {
  const Index d = 16;
  Int8KVCache<float> cache(1, 64, 1, d, config(8, 2));
  cache.update(random_tensor<float, BHSD>(1, 1, 40, d, 1),
               random_tensor<float, BHSD>(1, 1, 40, d, 2));
  Mask none(1, 40);
  none.setConstant(false);
  AttendOptions options;
  options.key_mask = &none;
  const Tensor4<float> out =
      kvcache::attend(random_tensor<float, BHSD>(1, 2, 3, d, 3), cache, options);
  for (Index i = 0; i < out.size(); ++i) REQUIRE(out.data()[i] == 0.0f);
}

// ------------------------------------------------------------------------------------------
// (3) accuracy against the float cache, and the llama.cpp-style baseline
// ------------------------------------------------------------------------------------------

TEST_CASE("accuracy table: int8/int4 against the float cache and a q8_0/q4_0 baseline",
          "[quantized_cache][accuracy]") {
  // 1024 cached tokens, head_dim 128, one KV head, group 32, residual 32. The 64 query rows
  // are one decode step of 64 query heads sharing the KV head (GQA 64): every row sees all
  // 1024 keys, so the quantized blocks (992 of the positions) dominate every output.
  // Gaussian N(0, 1) K, V and q; the outlier case scales 4 of every 64 key channels by 20.
  const Index n = 1024, d = 128, hq = 64;
  const QuantConfig cfg = config(32, 32);
  const Tensor4<float> q = gaussian(1, hq, 1, d, 3);
  struct Row {
    const char* keys;
    Index outliers;
    double int8_bound, int4_bound;
  };
  for (const Row& row : {Row{"gaussian", 0, 0.01, 0.13}, Row{"4/64 channels x20", 4, 0.02, 0.25}}) {
    CAPTURE(row.keys);
    const Tensor4<float> k = gaussian(1, 1, n, d, 1, row.outliers);
    const Tensor4<float> v = gaussian(1, 1, n, d, 2);
    StaticKVCache<float> exact(1, n, 1, d);
    exact.update(k, v);
    const Tensor4<float> want = kvcache::attend(q, exact);
    Int8KVCache<float> c8(1, n, 1, d, cfg);
    Int4KVCache<float> c4(1, n, 1, d, cfg);
    c8.update(k, v);
    c4.update(k, v);
    const double e8 = relative_l2(kvcache::attend(q, c8), want);
    const double e4 = relative_l2(kvcache::attend(q, c4), want);
    // The baseline: K and V quantized per token in symmetric blocks of 32 channels, then the
    // double reference attention over the dequantized tensors.
    const auto base8 =
        reference_attention<BHSD>(q, llama_cpp_baseline(k, 8), llama_cpp_baseline(v, 8),
                                  iota_positions(n), n - 1, ReferenceRules{});
    const auto base4 =
        reference_attention<BHSD>(q, llama_cpp_baseline(k, 4), llama_cpp_baseline(v, 4),
                                  iota_positions(n), n - 1, ReferenceRules{});
    const double b8 = relative_l2(base8, want), b4 = relative_l2(base4, want);
    std::cout << "[quantized_cache accuracy] keys " << row.keys << ": relative L2 error int8 " << e8
              << " (q8_0-style " << b8 << "), int4 " << e4 << " (q4_0-style " << b4 << ")\n";
    WARN("keys " << row.keys << ": int8 " << e8 << " (q8_0-style " << b8 << "), int4 " << e4
                 << " (q4_0-style " << b4 << ")");
    CHECK(e8 <= row.int8_bound);
    CHECK(e4 <= row.int4_bound);
    if (row.outliers > 0) {
      CHECK(e8 < b8);
      CHECK(e4 < b4);
    }
  }
}

// ------------------------------------------------------------------------------------------
// (4) memory
// ------------------------------------------------------------------------------------------

TEST_CASE("memory: int8 <= 0.32x and int4 <= 0.19x of the float static cache at 1024 tokens",
          "[quantized_cache]") {
  const Index n = 1024, d = 128;
  const QuantConfig cfg = config(32, 32);
  StaticKVCache<float> exact(1, n, 1, d);
  Int8KVCache<float> c8(1, n, 1, d, cfg);
  Int4KVCache<float> c4(1, n, 1, d, cfg);
  const Tensor4<float> k = gaussian(1, 1, n, d, 1), v = gaussian(1, 1, n, d, 2);
  const std::size_t before8 = c8.memory_bytes(), before4 = c4.memory_bytes();
  exact.update(k, v);
  c8.update(k, v);
  c4.update(k, v);
  // Preallocated: filling the cache allocates nothing.
  REQUIRE(c8.memory_bytes() == before8);
  REQUIRE(c4.memory_bytes() == before4);
  // 31 blocks of 32 tokens (992 quantized positions) plus a tail ring of 32 float positions.
  REQUIRE(c8.quantized_size() == 992);
  REQUIRE(c8.memory_bytes() == 31 * 72 * 128 + 2 * 32 * 128 * 4);
  REQUIRE(c4.memory_bytes() == 31 * 40 * 128 + 2 * 32 * 128 * 4);
  const double r8 = double(c8.memory_bytes()) / double(exact.memory_bytes());
  const double r4 = double(c4.memory_bytes()) / double(exact.memory_bytes());
  std::cout << "[quantized_cache memory] int8 " << r8 << "x, int4 " << r4
            << "x of StaticKVCache<float>\n";
  REQUIRE(r8 <= 0.32);
  REQUIRE(r4 <= 0.19);
  // Scales with batch and heads.
  Int4KVCache<float> wide(2, n, 3, d, cfg);
  REQUIRE(wide.memory_bytes() == 6 * c4.memory_bytes());
}

// ------------------------------------------------------------------------------------------
// (5) incremental quantization does not depend on the chunking
// ------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("one token at a time, random chunks and one update give the same bytes",
                   "[quantized_cache]", (QCase<float, 8, BHSD>), (QCase<float, 4, BSHD>),
                   (QCase<Eigen::bfloat16, 8, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  constexpr int Bits = TestType::bits;
  const auto [group, residual] = GENERATE(table<Index, Index>({{8, 5}, {32, 32}, {4, 0}}));
  CAPTURE(group, residual);
  const Index d = 32, total = 150;
  const QuantConfig cfg = config(group, residual);
  using Cache = QuantizedKVCache<T, Bits, L>;
  const Tensor4<T> k = random_tensor<T, L>(2, 2, total, d, 21, 3.0);
  const Tensor4<T> v = random_tensor<T, L>(2, 2, total, d, 22);
  Cache whole(2, total, 2, d, cfg), single(2, total, 2, d, cfg), chunked(2, total, 2, d, cfg);
  whole.update(k, v);
  for (Index p = 0; p < total; ++p) single.update(slice_seq<L>(k, p, 1), slice_seq<L>(v, p, 1));
  std::mt19937 rng(23);
  for (Index p = 0; p < total;) {
    const Index n = std::min<Index>(total - p, Index(rng() % 40));  // 0 included: a no-op
    chunked.update(slice_seq<L>(k, p, n), slice_seq<L>(v, p, n));
    p += n;
  }
  const Snapshot<Cache> want(whole);
  REQUIRE(Snapshot<Cache>(single) == want);
  REQUIRE(Snapshot<Cache>(chunked) == want);
  const Tensor4<T> q = random_tensor<T, L>(2, 4, 7, d, 24);
  const Tensor4<T> out = kvcache::attend(q, whole);
  REQUIRE(equal(kvcache::attend(q, single), out));
  REQUIRE(equal(kvcache::attend(q, chunked), out));
}

// ------------------------------------------------------------------------------------------
// (6) crop and reset
// ------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("crop and reset, then continue", "[quantized_cache]", (QCase<float, 8, BHSD>),
                   (QCase<float, 4, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  constexpr int Bits = TestType::bits;
  using Cache = QuantizedKVCache<T, Bits, L>;
  const Index d = 16, total = 120, batch = 2, heads = 2;
  const QuantConfig cfg = config(8, 5);  // tail capacity 7; size 60 holds 56 quantized
  const Tensor4<T> k = random_tensor<T, L>(batch, heads, total, d, 31);
  const Tensor4<T> v = random_tensor<T, L>(batch, heads, total, d, 32);
  const Tensor4<T> k2 = random_tensor<T, L>(batch, heads, total, d, 33);
  const Tensor4<T> v2 = random_tensor<T, L>(batch, heads, total, d, 34);

  SECTION("a crop that keeps every quantized block whole is lossless") {
    for (Index n : {Index(60), Index(58), Index(57), Index(56)}) {
      CAPTURE(n);
      Cache cache(batch, total, heads, d, cfg);
      cache.update(slice_seq<L>(k, 0, 60), slice_seq<L>(v, 0, 60));
      REQUIRE(cache.quantized_size() == 56);
      cache.crop(n);
      REQUIRE(cache.size() == n);
      REQUIRE(cache.quantized_size() == 56);
      cache.update(slice_seq<L>(k2, 0, 30), slice_seq<L>(v2, 0, 30));
      // Identical to a cache fed the first n tokens, then the continuation.
      Cache fresh(batch, total, heads, d, cfg);
      fresh.update(slice_seq<L>(k, 0, n), slice_seq<L>(v, 0, n));
      fresh.update(slice_seq<L>(k2, 0, 30), slice_seq<L>(v2, 0, 30));
      REQUIRE(Snapshot<Cache>(cache) == Snapshot<Cache>(fresh));
      const Tensor4<T> q = random_tensor<T, L>(batch, 2 * heads, 5, d, 35);
      REQUIRE(equal(kvcache::attend(q, cache), kvcache::attend(q, fresh)));
    }
  }

  SECTION("a crop into the quantized blocks dequantizes the survivors into the tail") {
    // 56 -> 48 whole blocks; 50, 20, 3: cut blocks; 0: nothing left.
    for (Index n : {Index(50), Index(48), Index(20), Index(3), Index(0)}) {
      CAPTURE(n);
      Cache cache(batch, total, heads, d, cfg);
      cache.update(slice_seq<L>(k, 0, 60), slice_seq<L>(v, 0, 60));
      const Tensor4<T> keys_before = cache.keys(), values_before = cache.values();
      cache.crop(n);
      REQUIRE(cache.size() == n);
      REQUIRE(cache.position() == n);
      REQUIRE(cache.quantized_size() == n - kd::unquantized_tail_length(n, cfg));
      // The same numbers as before for the kept positions.
      REQUIRE(equal(cache.keys(), slice_seq<L>(keys_before, 0, n)));
      REQUIRE(equal(cache.values(), slice_seq<L>(values_before, 0, n)));
      if (n > 0) {
        const Tensor4<T> q = random_tensor<T, L>(batch, 2 * heads, 1, d, 36);
        REQUIRE(kernel_error(cache, q, {}) < kernel_tolerance<T>());
      }
      // Continue: the kept blocks stay, the rest is quantized from what the tail held (the
      // dequantized survivors, then the new tokens).
      const Index kept_blocks = cache.quantized_size();
      cache.update(slice_seq<L>(k2, 0, 30), slice_seq<L>(v2, 0, 30));
      REQUIRE(cache.size() == n + 30);
      const Tensor4<T> k_seq = concat_seq<L>(keys_before, n, slice_seq<L>(k2, 0, 30));
      const Tensor4<T> v_seq = concat_seq<L>(values_before, n, slice_seq<L>(v2, 0, 30));
      const auto want = expected_contents<Bits, L>(k_seq, v_seq, n + 30, cfg);
      const Tensor4<T> keys = cache.keys(), values = cache.values();
      REQUIRE(equal(slice_seq<L>(keys, 0, kept_blocks), slice_seq<L>(keys_before, 0, kept_blocks)));
      REQUIRE(equal(slice_seq<L>(keys, kept_blocks, n + 30 - kept_blocks),
                    slice_seq<L>(want.first, kept_blocks, n + 30 - kept_blocks)));
      REQUIRE(equal(slice_seq<L>(values, kept_blocks, n + 30 - kept_blocks),
                    slice_seq<L>(want.second, kept_blocks, n + 30 - kept_blocks)));
      const Tensor4<T> q = random_tensor<T, L>(batch, 2 * heads, 4, d, 37);
      REQUIRE(kernel_error(cache, q, {}) < kernel_tolerance<T>());
    }
  }

  SECTION("reset and crop(0) return to an empty cache that behaves like a new one") {
    Cache cache(batch, total, heads, d, cfg), fresh(batch, total, heads, d, cfg);
    const std::size_t bytes = cache.memory_bytes();
    cache.update(slice_seq<L>(k, 0, 100), slice_seq<L>(v, 0, 100));
    cache.reset();
    REQUIRE(cache.size() == 0);
    REQUIRE(cache.position() == 0);
    REQUIRE(cache.memory_bytes() == bytes);
    cache.update(slice_seq<L>(k2, 0, 45), slice_seq<L>(v2, 0, 45));
    fresh.update(slice_seq<L>(k2, 0, 45), slice_seq<L>(v2, 0, 45));
    REQUIRE(Snapshot<Cache>(cache) == Snapshot<Cache>(fresh));
    cache.crop(0);
    REQUIRE(cache.size() == 0);
    cache.update(slice_seq<L>(k, 0, total), slice_seq<L>(v, 0, total));  // up to capacity
    Cache full(batch, total, heads, d, cfg);
    full.update(k, v);
    REQUIRE(Snapshot<Cache>(cache) == Snapshot<Cache>(full));
  }
}

// ------------------------------------------------------------------------------------------
// (7) errors, with the cache unchanged
// ------------------------------------------------------------------------------------------

TEST_CASE("constructor and config errors", "[quantized_cache]") {
  using C8 = Int8KVCache<float>;
  using C4 = Int4KVCache<float, BSHD>;
  REQUIRE_THROWS_AS(C8(0, 10, 1, 8), std::invalid_argument);
  REQUIRE_THROWS_AS(C8(1, 0, 1, 8), std::invalid_argument);
  REQUIRE_THROWS_AS(C8(1, 10, 0, 8), std::invalid_argument);
  REQUIRE_THROWS_AS(C8(1, 10, 1, 0), std::invalid_argument);
  REQUIRE_THROWS_AS(C8(1, -3, 1, 8), std::invalid_argument);
  REQUIRE(contains(message_of([] { C8(1, 10, 1, 12, config(5, 2)); }), "divisor of 12, got 5"));
  REQUIRE_THROWS_AS(C8(1, 10, 1, 12, config(0, 2)), std::invalid_argument);
  REQUIRE_THROWS_AS(C4(1, 10, 1, 12, config(3, 2)), std::invalid_argument);  // odd for int4
  REQUIRE_THROWS_AS(C8(1, 10, 1, 12, config(4, 65)), std::invalid_argument);
  REQUIRE_THROWS_AS(C8(1, 10, 1, 12, config(4, -1)), std::invalid_argument);
  REQUIRE_NOTHROW(C8(1, 10, 1, 12, config(3, 0)));   // odd is fine for int8
  REQUIRE_NOTHROW(C4(1, 1, 1, 12, config(12, 64)));  // max_seq_len below the tail capacity
  REQUIRE_NOTHROW(C8(1, 10, 1, 12, config(1, 0)));   // everything quantized at once
}

TEMPLATE_TEST_CASE("every failing call leaves the cache unchanged", "[quantized_cache]", BHSD,
                   BSHD) {
  using L = TestType;
  using Cache = Int4KVCache<float, L>;
  const Index d = 8;
  Cache cache(2, 20, 2, d, config(4, 2));
  cache.update(random_tensor<float, L>(2, 2, 13, d, 1), random_tensor<float, L>(2, 2, 13, d, 2));
  REQUIRE(cache.quantized_size() > 0);
  const Snapshot<Cache> before(cache);
  auto update = [&](Index b, Index h, Index s, Index dd) {
    return message_of([&] {
      cache.update(random_tensor<float, L>(b, h, s, dd, 3),
                   random_tensor<float, L>(b, h, s, dd, 4));
    });
  };
  // Shapes: batch too large, wrong heads, wrong head_dim; the message names both shapes.
  const std::string batch_msg = update(3, 2, 1, d);
  REQUIRE(contains(batch_msg, "expected k and v of shape"));
  REQUIRE(contains(batch_msg, describe(dims<L>(3, 2, 1, d))));
  REQUIRE(contains(update(1, 3, 1, d), describe(dims<L>(1, 3, 1, d))));
  REQUIRE(contains(update(1, 2, 1, d + 2), describe(dims<L>(1, 2, 1, d + 2))));
  REQUIRE(Snapshot<Cache>(cache) == before);
  // k and v of different shapes.
  REQUIRE_THROWS_AS(
      cache.update(random_tensor<float, L>(1, 2, 2, d, 5), random_tensor<float, L>(1, 2, 3, d, 6)),
      std::invalid_argument);
  // Past capacity: length_error; with a wrong shape too, the shape error wins.
  REQUIRE_THROWS_AS(
      cache.update(random_tensor<float, L>(2, 2, 8, d, 7), random_tensor<float, L>(2, 2, 8, d, 8)),
      std::length_error);
  REQUIRE(contains(update(2, 2, 8, d), "capacity of 20"));
  REQUIRE_THROWS_AS(
      cache.update(random_tensor<float, L>(2, 3, 8, d, 7), random_tensor<float, L>(2, 3, 8, d, 8)),
      std::invalid_argument);
  REQUIRE(Snapshot<Cache>(cache) == before);
  // crop beyond size() or negative.
  REQUIRE_THROWS_AS(cache.crop(14), std::invalid_argument);
  REQUIRE_THROWS_AS(cache.crop(-1), std::invalid_argument);
  REQUIRE(contains(message_of([&] { cache.crop(14); }), "[0, 13], got 14"));
  // attend: q of the wrong head_dim, a head count that is not a multiple, too many rows.
  REQUIRE_THROWS_AS(kvcache::attend(random_tensor<float, L>(1, 2, 1, d + 1, 9), cache),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(kvcache::attend(random_tensor<float, L>(1, 3, 1, d, 9), cache),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(kvcache::attend(random_tensor<float, L>(3, 2, 1, d, 9), cache),
                    std::invalid_argument);
  REQUIRE(Snapshot<Cache>(cache) == before);
  // A zero-length update is a no-op; exactly filling the capacity works.
  cache.update(random_tensor<float, L>(2, 2, 0, d, 10), random_tensor<float, L>(2, 2, 0, d, 10));
  REQUIRE(Snapshot<Cache>(cache) == before);
  cache.update(random_tensor<float, L>(1, 2, 7, d, 11), random_tensor<float, L>(1, 2, 7, d, 12));
  REQUIRE(cache.size() == 20);
}

// Values near the largest float (see the same test in tests/test_dtypes.cpp): without the
// kernel's second, scaled pass the code part (sum_j w_j vscale_j code_j) and the zero-point
// part (sum_j w_j vzero_j) of the value sums overflow with opposite signs, giving NaN.
TEMPLATE_TEST_CASE("values near the largest float give finite, exact outputs",
                   "[quantized_cache][large_values]", (QCase<float, 8, BHSD>),
                   (QCase<float, 4, BSHD>)) {
  using L = typename TestType::layout;
  using Cache = QuantizedKVCache<float, TestType::bits, L>;
  const double magnitude = GENERATE(1e38, 3e38);
  const Index q_len = GENERATE(1, 20);
  CAPTURE(magnitude, q_len);
  const Index heads = 2, head_dim = 32, kv_len = 200;
  Cache cache(1, kv_len, heads, head_dim, config(32, 8));
  cache.update(random_tensor<float, L>(1, heads, kv_len, head_dim, 4),
               scaled_random_tensor<float, L>(1, heads, kv_len, head_dim, 5, magnitude));
  REQUIRE(cache.quantized_size() > 0);
  // Against the reference over the cache's own dequantized keys and values (finite: the
  // quantizer never overflows): this checks the kernel, not the quantization error.
  const Tensor4<float> q = random_tensor<float, L>(1, 2 * heads, q_len, head_dim, 6);
  CHECK(kernel_error(cache, q, {}) / magnitude < kernel_tolerance<float>());
}

// ------------------------------------------------------------------------------------------
// (8) threads
// ------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("a thread pool gives the serial result bit for bit", "[quantized_cache]",
                   (QCase<float, 8, BHSD>), (QCase<Eigen::bfloat16, 4, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  constexpr int Bits = TestType::bits;
  const Index d = 32;
  QuantizedKVCache<T, Bits, L> cache(2, 300, 2, d, config(16, 8));
  cache.update(random_tensor<T, L>(2, 2, 270, d, 41), random_tensor<T, L>(2, 2, 270, d, 42));
  Eigen::ThreadPool pool(3);
  Eigen::ThreadPoolDevice device(&pool, 3);
  for (Index q_len : {Index(1), Index(70)}) {
    const Tensor4<T> q = random_tensor<T, L>(2, 8, q_len, d, 43);
    AttendOptions serial, threaded;
    threaded.device = &device;
    REQUIRE(equal(kvcache::attend(q, cache, threaded), kvcache::attend(q, cache, serial)));
  }
}

// ------------------------------------------------------------------------------------------
// (9) double inputs beyond the bfloat16 range of zero points and scales
// ------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("QuantizedKVCache<double> refuses finite inputs beyond 3.3895e38, unchanged",
                   "[quantized_cache][double]", (QCase<double, 8, BHSD>), (QCase<double, 4, BSHD>)) {
  using L = typename TestType::layout;
  using Cache = QuantizedKVCache<double, TestType::bits, L>;
  const Index d = 8;
  Cache cache(2, 40, 2, d, config(4, 2));
  cache.update(random_tensor<double, L>(2, 2, 9, d, 1), random_tensor<double, L>(2, 2, 9, d, 2));
  const Snapshot<Cache> before(cache);
  for (const bool in_keys : {true, false})
    for (const double bad : {1e300, -3.4e38, 1.7976931348623157e308}) {
      CAPTURE(in_keys, bad);
      Tensor4<double> k = random_tensor<double, L>(2, 2, 5, d, 3);
      Tensor4<double> v = random_tensor<double, L>(2, 2, 5, d, 4);
      (in_keys ? k : v).data()[37] = bad;
      const std::string message = message_of([&] { cache.update(k, v); });
      REQUIRE(contains(message, "exceeds the magnitude its bfloat16 zero point and scale"));
      REQUIRE(contains(message, in_keys ? ": k at (batch" : ": v at (batch"));
      REQUIRE_THROWS_AS(cache.update(k, v), std::invalid_argument);
      REQUIRE(Snapshot<Cache>(cache) == before);
    }
  // Up to the bound every magnitude is stored, within the group's error bound.
  Tensor4<double> k = random_tensor<double, L>(2, 2, 5, d, 3);
  for (Index i = 0; i < k.size(); ++i) k.data()[i] *= 3.0e38;
  cache.update(k, random_tensor<double, L>(2, 2, 5, d, 4));
  REQUIRE(cache.size() == 14);
  const Tensor4<double> keys = cache.keys();
  for (Index i = 0; i < keys.size(); ++i) REQUIRE(std::isfinite(keys.data()[i]));
}

TEMPLATE_TEST_CASE("NaN and infinities are refused, naming the element, the cache unchanged",
                   "[quantized_cache]", (QCase<float, 8, BHSD>), (QCase<float, 4, BSHD>),
                   (QCase<Eigen::half, 8, BSHD>), (QCase<Eigen::bfloat16, 4, BHSD>),
                   (QCase<double, 8, BSHD>)) {
  // A group shares one zero point and one scale: a non-finite element would corrupt them (a
  // NaN key once gave NaN outputs while in the float tail and finite ones once quantized).
  // update() refuses it instead, whether the position would land in the tail (a short
  // update) or straight in quantized blocks (a chunk longer than group + residual).
  using T = typename TestType::element;
  using L = typename TestType::layout;
  using Cache = QuantizedKVCache<T, TestType::bits, L>;
  const Index d = 8;
  Cache cache(2, 64, 2, d, config(4, 2));
  cache.update(random_tensor<T, L>(2, 2, 9, d, 1), random_tensor<T, L>(2, 2, 9, d, 2));
  const Snapshot<Cache> before(cache);
  const double infinity = std::numeric_limits<double>::infinity();
  for (const Index new_len : {Index(1), Index(20)})
    for (const bool in_keys : {true, false})
      for (const double bad : {std::numeric_limits<double>::quiet_NaN(), infinity, -infinity}) {
        CAPTURE(new_len, in_keys, bad);
        Tensor4<T> k = random_tensor<T, L>(2, 2, new_len, d, 3);
        Tensor4<T> v = random_tensor<T, L>(2, 2, new_len, d, 4);
        (in_keys ? k : v).data()[k.size() - 3] = static_cast<T>(bad);
        const std::string message = message_of([&] { cache.update(k, v); });
        REQUIRE(contains(message, in_keys ? ": k at (batch 1" : ": v at (batch 1"));
        REQUIRE(contains(message, "expected a finite value"));
        REQUIRE_THROWS_AS(cache.update(k, v), std::invalid_argument);
        REQUIRE(Snapshot<Cache>(cache) == before);
      }
  // The cache keeps working.
  cache.update(random_tensor<T, L>(2, 2, 20, d, 5), random_tensor<T, L>(2, 2, 20, d, 6));
  REQUIRE(cache.size() == 29);
}
