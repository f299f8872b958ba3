// The fast kernel (vectorised blocks, matrix products for many rows) against its scalar
// reference twin, over every path the fast one takes: few rows and many (dot products vs
// matrix products), masks as ranges and key by key, sinks, softcap, every cache kind's
// segments, widened half/bfloat16 blocks.
#include "support/catch.hpp"
#include "support/reference.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <utility>
#include <vector>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::detail::attend_with_reference_kernel;

namespace {

template <class T, class Cache>
void compare(const Cache& cache, const Tensor4<T>& q, const AttendOptions& options) {
  const Tensor4<T> fast = kvcache::attend(q, cache, options);
  const Tensor4<T> reference = attend_with_reference_kernel(q, cache, options);
  Eigen::Tensor<double, 4, Eigen::RowMajor, Index> want(reference.dimensions());
  for (Index i = 0; i < want.size(); ++i) want.data()[i] = double(reference.data()[i]);
  REQUIRE(max_abs_diff(fast, want) < tolerance<T>());
}

}  // namespace

TEMPLATE_TEST_CASE("fast kernel == scalar twin on contiguous caches", "[kernel]",
                   (Case<float, BHSD>), (Case<float, BSHD>), (Case<double, BHSD>),
                   (Case<Eigen::half, BSHD>), (Case<Eigen::bfloat16, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index rep = GENERATE(1, 4, 8);
  const Index q_len = GENERATE(1, 3, 40);  // 1-32 rows: dot products; 40+ rows: products
  const Index kv_len = 150, head_dim = 24;
  const bool causal = GENERATE(true, false);
  const Index window = GENERATE(0, 17);
  const float softcap = GENERATE(0.0f, 3.0f);
  CAPTURE(rep, q_len, causal, window, softcap);
  kvcache::StaticKVCache<T, L> cache(2, kv_len, 2, head_dim);
  cache.update(random_tensor<T, L>(2, 2, kv_len, head_dim, 1),
               random_tensor<T, L>(2, 2, kv_len, head_dim, 2));
  const Tensor4<T> q = random_tensor<T, L>(2, 2 * rep, q_len, head_dim, 3, 3.0);
  AttendOptions options;
  options.causal = causal;
  options.window = window;
  options.softcap = softcap;
  compare(cache, q, options);
  Mask mask(2, kv_len);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = (i * 7) % 5 != 0;
  options.key_mask = &mask;
  compare(cache, q, options);
}

TEMPLATE_TEST_CASE("fast kernel == scalar twin on segmented caches", "[kernel]", BHSD, BSHD) {
  using L = TestType;
  const Index q_len = GENERATE(1, 5, 70);
  CAPTURE(q_len);
  const Index head_dim = 16;
  kvcache::SlidingWindowKVCache<float, L> window(1, 50, 2, head_dim, 4);
  kvcache::StaticKVCache<float, L> prompt(1, 100, 2, head_dim);
  prompt.update(random_tensor<float, L>(1, 2, 100, head_dim, 4),
                random_tensor<float, L>(1, 2, 100, head_dim, 5));
  kvcache::PrefixKVCache<float, L> prefix(prompt.freeze(), 200);
  kvcache::Int8KVCache<float, L> int8(1, 400, 2, head_dim, {8, 8});
  for (Index step = 0; step < 3; ++step) {
    const Tensor4<float> k = random_tensor<float, L>(1, 2, 70, head_dim, unsigned(10 + step));
    const Tensor4<float> v = random_tensor<float, L>(1, 2, 70, head_dim, unsigned(20 + step));
    window.update(k, v);
    prefix.update(slice_seq<L>(k, 0, 60), slice_seq<L>(v, 0, 60));
    int8.update(k, v);
  }
  const Tensor4<float> q = random_tensor<float, L>(1, 8, q_len, head_dim, 30, 2.0);
  compare(window, q, {});
  compare(prefix, q, {});
  compare(int8, q, {});
  AttendOptions windowed;
  windowed.window = 33;
  compare(prefix, q, windowed);
  compare(int8, q, windowed);
}

TEMPLATE_TEST_CASE("results do not depend on where the data sits", "[kernel]", BHSD, BSHD) {
  // A static and a dynamic cache of different capacities hold the same tokens at differently
  // aligned addresses (head_dim 12: rows are 48 bytes apart); repeated calls allocate their
  // scratch anew. All answers must be bit-identical, also in builds with AVX.
  using L = TestType;
  const Index head_dim = 12, kv_len = 131;
  const Tensor4<float> k = random_tensor<float, L>(1, 2, kv_len, head_dim, 40);
  const Tensor4<float> v = random_tensor<float, L>(1, 2, kv_len, head_dim, 41);
  kvcache::StaticKVCache<float, L> fixed(1, 257, 2, head_dim);
  kvcache::DynamicKVCache<float, L> grown(1, 2, head_dim, /*initial_capacity=*/3);
  fixed.update(k, v);
  for (Index at = 0; at < kv_len; at += 10) {
    const Index n = std::min<Index>(10, kv_len - at);
    grown.update(slice_seq<L>(k, at, n), slice_seq<L>(v, at, n));
  }
  const Index q_len = GENERATE(1, 50);
  AttendOptions options;
  options.softcap = GENERATE(0.0f, 5.0f);
  const Tensor4<float> q = random_tensor<float, L>(1, 8, q_len, head_dim, 42);
  const Tensor4<float> first = kvcache::attend(q, fixed, options);
  std::vector<std::vector<char>> heap_noise;
  for (int round = 0; round < 8; ++round) {
    heap_noise.emplace_back(std::size_t(8 * round + 8));  // shifts later allocations
    REQUIRE(equal(kvcache::attend(q, fixed, options), first));
    REQUIRE(equal(kvcache::attend(q, grown, options), first));
    REQUIRE(equal(kvcache::attend<L>(q, k, v, options), first));
  }
}

TEST_CASE("a masked non-finite value does not leak into any row", "[kernel]") {
  // 16+ rows take the matrix-product path, which would compute 0 * inf for a masked key.
  const Index rows = GENERATE(1, 15, 16, 64);
  CAPTURE(rows);
  const Index kv_len = 16, head_dim = 4;
  kvcache::StaticKVCache<float> cache(1, kv_len, 1, head_dim);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 1, kv_len, head_dim, 50);
  Tensor4<float> v = random_tensor<float, BHSD>(1, 1, kv_len, head_dim, 51);
  v(0, 0, kv_len - 1, 0) = std::numeric_limits<float>::infinity();  // seen by the last row only
  cache.update(k, v);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, rows, 1, head_dim, 52);
  Mask mask(1, kv_len);
  mask.setConstant(true);
  mask(0, kv_len - 1) = false;  // the inf value is masked for every row
  AttendOptions options;
  options.key_mask = &mask;
  const Tensor4<float> out = kvcache::attend(q, cache, options);
  for (Index i = 0; i < out.size(); ++i) REQUIRE(std::isfinite(out.data()[i]));
  mask.setConstant(false);  // nothing visible: zeros (rule 4), not NaN
  const Tensor4<float> none = kvcache::attend(q, cache, options);
  for (Index i = 0; i < none.size(); ++i) REQUIRE(none.data()[i] == 0.0f);
}

// ctest runs the kernel tests once per KVCACHE_ISA cap (tests/CMakeLists.txt): the variant that
// runs is the cap, or the best the CPU has when that is lower, never more.
TEST_CASE("kernel_isa() names the variant the KVCACHE_ISA cap selects", "[kernel][isa]") {
  using kvcache::detail::Isa;
  const Isa best = std::min(kvcache::detail::detect_isa(), kvcache::detail::best_compiled_isa());
  const char* cap_text = std::getenv("KVCACHE_ISA");
  const Isa cap = kvcache::detail::isa_cap(cap_text);
  const Isa want = std::min(best, cap);
  CAPTURE(cap_text == nullptr ? "(unset)" : cap_text, kvcache::kernel_isa());
  REQUIRE(kvcache::detail::selected_isa() == want);
  REQUIRE(kvcache::kernel_isa() == kvcache::detail::isa_name(want));
  // Unknown words and "best" cap nothing.
  REQUIRE(kvcache::detail::isa_cap("best") == Isa::kAvx512Vnni);
  REQUIRE(kvcache::detail::isa_cap("sse9") == Isa::kAvx512Vnni);
  REQUIRE(kvcache::detail::isa_cap(nullptr) == Isa::kAvx512Vnni);
  REQUIRE(kvcache::detail::isa_cap("avx512") == Isa::kAvx512Vnni);
  REQUIRE(kvcache::detail::isa_cap("avx512-novnni") == Isa::kAvx512);
  REQUIRE(kvcache::detail::isa_cap("scalar") == Isa::kScalar);
  REQUIRE(kvcache::detail::isa_cap("avx2") == Isa::kAvx2);
}

namespace {

/// Query heads kv * rep + r of q for every KV head kv: one head per KV head (rep 1).
template <class T, class L>
Tensor4<T> heads_of(const Tensor4<T>& q, Index rep, Index r) {
  const kvcache::Shape s = L::shape({q.dimension(0), q.dimension(1), q.dimension(2), q.dimension(3)});
  const Index kv_heads = s.heads / rep;
  Tensor4<T> out(L::dims({s.batch, kv_heads, s.seq, s.head_dim}));
  for (Index b = 0; b < s.batch; ++b)
    for (Index kv = 0; kv < kv_heads; ++kv)
      for (Index i = 0; i < s.seq; ++i)
        for (Index c = 0; c < s.head_dim; ++c)
          at<L>(out, b, kv, i, c) = at<L>(q, b, kv * rep + r, i, c);
  return out;
}

template <class T, class L, class Cache>
void require_group_independent(const Cache& cache, Index rep, Index q_len, unsigned seed) {
  const Tensor4<T> q = random_tensor<T, L>(1, cache.num_heads() * rep, q_len, cache.head_dim(), seed);
  const Tensor4<T> grouped = kvcache::attend(q, cache);
  for (Index r = 0; r < rep; ++r) {
    CAPTURE(r);
    const Tensor4<T> alone = kvcache::attend(heads_of<T, L>(q, rep, r), cache);
    REQUIRE(equal(heads_of<T, L>(grouped, rep, r), alone));
  }
}

}  // namespace

// Scores come from tiles of 4 rows x 4 keys (AVX-512), 4 x 2 (AVX2) or 1 x 16 / 1 x 8 for a
// lone row, partial tiles padded with copies, and one reduction tree per dot product: a query
// head's output must be the same bits alone (one head per KV head) as inside its GQA group,
// whatever the variant. (Decode-sized rows: 16 rows or more take the prefill tile instead.)
TEMPLATE_TEST_CASE("a query head's output does not depend on its GQA group", "[kernel]", BHSD, BSHD) {
  using L = TestType;
  const Index rep = GENERATE(2, 3, 4);
  const Index q_len = GENERATE(1, 3);
  CAPTURE(rep, q_len);
  const Index kv_len = 133, head_dim = 24;  // a block tail, and channels past whole vectors
  kvcache::StaticKVCache<float, L> fp32(1, kv_len, 2, head_dim);
  fp32.update(random_tensor<float, L>(1, 2, kv_len, head_dim, 60),
              random_tensor<float, L>(1, 2, kv_len, head_dim, 61));
  require_group_independent<float, L>(fp32, rep, q_len, 62);
  kvcache::StaticKVCache<Eigen::bfloat16, L> bf16(1, kv_len, 2, head_dim);
  bf16.update(random_tensor<Eigen::bfloat16, L>(1, 2, kv_len, head_dim, 63),
              random_tensor<Eigen::bfloat16, L>(1, 2, kv_len, head_dim, 64));
  require_group_independent<Eigen::bfloat16, L>(bf16, rep, q_len, 65);
  kvcache::Int8KVCache<float, L> int8(1, kv_len, 2, head_dim, {8, 4});
  int8.update(random_tensor<float, L>(1, 2, kv_len, head_dim, 66),
              random_tensor<float, L>(1, 2, kv_len, head_dim, 67));
  require_group_independent<float, L>(int8, rep, q_len, 68);
}

// bfloat16 keys and values are read two vectors at a time, split by parity (kLoadsByParity in
// detail/kernel/block_math.inl): chunks of 8, 16 or 32 channels on the portable, AVX2 and
// AVX-512 variants, the scores against query rows put in the same order, the value sums through
// strips of one or two pairs, then single vectors, then a channel tail. Head dims on both sides
// of every variant's edges; decode tiles of one row (GQA 1) and of four (GQA 4), against the
// double reference. A channel or query element out of place moves the output by more than the
// tolerance (checked by breaking the order on purpose).
TEMPLATE_TEST_CASE("bfloat16 rows read by parity, at every head_dim edge", "[kernel]", BHSD, BSHD) {
  using L = TestType;
  using T = Eigen::bfloat16;
  const Index head_dim = GENERATE(1, 7, 8, 9, 16, 17, 24, 31, 32, 33, 48, 64, 65, 96, 128, 136, 200);
  const Index rep = GENERATE(1, 4);
  const Index q_len = GENERATE(1, 2);
  CAPTURE(head_dim, rep, q_len);
  const Index kv_len = 70;  // a block of 64 keys, then a short one
  const Tensor4<T> k = random_tensor<T, L>(1, 2, kv_len, head_dim, 70);
  const Tensor4<T> v = random_tensor<T, L>(1, 2, kv_len, head_dim, 71);
  kvcache::StaticKVCache<T, L> cache(1, kv_len, 2, head_dim);
  cache.update(k, v);
  const Tensor4<T> q = random_tensor<T, L>(1, 2 * rep, q_len, head_dim, 72, 4.0);
  const auto want = reference_attention<L>(q, k, v, iota_positions(kv_len), kv_len - q_len, {});
  REQUIRE(max_abs_diff(kvcache::attend(q, cache), want) < tolerance<T>());
}

namespace {

// A view of the same held positions as `contiguous`, its K/V copied into a pool of blocks of
// block_size rows (pool blocks in reverse order, an unused block between any two).
template <class T>
struct PooledCopy {
  std::vector<T> keys, values;
  std::vector<std::int32_t> ids;
  kvcache::detail::KVView<T> view;

  PooledCopy(const kvcache::detail::KVView<T>& contiguous, Index block_size) {
    const kvcache::detail::KVSegment<T>& seg = contiguous.segments[0];
    const Index heads = contiguous.num_heads, head_dim = contiguous.head_dim;
    const Index used = (seg.length + block_size - 1) / block_size, pool_blocks = 2 * used + 1;
    for (Index b = 0; b < used; ++b) ids.push_back(std::int32_t(pool_blocks - 1 - 2 * b));
    const Index block_stride = heads * block_size * head_dim;
    keys.assign(std::size_t(pool_blocks * block_stride), T(0));
    values = keys;
    for (Index h = 0; h < heads; ++h)
      for (Index i = 0; i < seg.length; ++i)
        for (Index c = 0; c < head_dim; ++c) {
          const Index from = h * seg.strides.head + i * seg.strides.seq + c;
          const Index to = ids[std::size_t(i / block_size)] * block_stride +
                           h * block_size * head_dim + i % block_size * head_dim + c;
          keys[std::size_t(to)] = seg.keys[from];
          values[std::size_t(to)] = seg.values[from];
        }
    view = contiguous;
    view.num_segments = 0;
    kvcache::detail::BlockTable<T> table;
    table.keys = keys.data();
    table.values = values.data();
    table.ids = ids.data();
    table.block_size = block_size;
    table.block_stride = block_stride;
    table.strides = {0, block_size * head_dim, head_dim};
    table.first_position = seg.first_position;
    table.length = seg.length;
    view.add_block_table(table);
  }
};

template <class T>
Tensor4<T> attend_on_view(const Tensor4<T>& q, const kvcache::detail::KVView<T>& view,
                          const AttendOptions& options) {
  Tensor4<T> out(q.dimensions());
  kvcache::AttendWorkspace workspace;
  kvcache::detail::attend_view<kvcache::BHSD>("test", kvcache::detail::view_of(q), view, options,
                                              out.data(), workspace);
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("a block table gives the bits of the same positions stored contiguously",
                   "[kernel]", float, double, Eigen::bfloat16) {
  // The paged cache's view: positions in fixed-size pool blocks anywhere in the pool. The
  // kernel cuts them into the same 64-position blocks as a contiguous run, so every answer is
  // bit-identical, including split-K parts that start inside a pool block.
  using T = TestType;
  const Index kv_len = 150, head_dim = 24;
  const Index block_size = GENERATE(16, 5, 64, 200);
  const Index q_len = GENERATE(1, 3, 40);
  const bool causal = GENERATE(true, false);
  CAPTURE(block_size, q_len, causal);
  kvcache::StaticKVCache<T> cache(1, kv_len, 2, head_dim);
  cache.update(random_tensor<T, BHSD>(1, 2, kv_len, head_dim, 61),
               random_tensor<T, BHSD>(1, 2, kv_len, head_dim, 62));
  const PooledCopy<T> pooled(cache.attention_view(), block_size);
  const Tensor4<T> q = random_tensor<T, BHSD>(1, 8, q_len, head_dim, 63, 3.0);
  AttendOptions options;
  options.causal = causal;
  options.window = GENERATE(0, 37);
  REQUIRE(equal(attend_on_view(q, pooled.view, options), kvcache::attend(q, cache, options)));

  // Split-K parts: a run cut at held indices that fall inside pool blocks.
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  options.device = &device;
  REQUIRE(equal(attend_on_view(q, pooled.view, options), kvcache::attend(q, cache, options)));
  options.device = nullptr;
  for (const auto& cut : {std::pair<Index, Index>{37, 120}, {64, 150}, {0, 5}}) {
    CAPTURE(cut.first, cut.second);
    options.causal = false;
    options.window = 0;
    REQUIRE(equal(attend_on_view(q, pooled.view.clipped(cut.first, cut.second), options),
                  attend_on_view(q, cache.attention_view().clipped(cut.first, cut.second),
                                 options)));
  }
}

// The integer scores of quantized blocks (detail/kernel/quantized_block.inl): every vector path
// against the portable loop. They are exact int32 sums, so they must agree to the bit, at the
// largest words integer_query allows (|word| <= 32512, a row's sum of |word| within
// integer_sum_limit: no overflow) and at every shape the paths split differently: quad rows a
// multiple of 8, 16 or 32 or not, 1 to 9 rows (4 at a time, then 1), rows of up to 4096 channels.
TEMPLATE_TEST_CASE("integer key scores: every vector path == the portable loop", "[kernel][quantized]",
                   (std::integral_constant<int, 8>), (std::integral_constant<int, 4>)) {
  namespace kd = kvcache::detail;
  constexpr int Bits = TestType::value;
  const Index quad_rows = GENERATE(1, 8, 16, 24, 32, 48, 64);
  const Index quads = GENERATE(1, 3, 32, 128, 1024);
  const Index num_rows = GENERATE(1, 4, 9);
  CAPTURE(quad_rows, quads, num_rows);
  const Index tokens = quad_rows * 8 / Bits, padded = 4 * quads;
  REQUIRE(kd::isa_scalar::integer_scores_fit<Bits>(padded));
  const auto limit = static_cast<std::int32_t>(kd::isa_scalar::kLargestQueryWord);
  const auto sum_limit = static_cast<std::int64_t>(kd::isa_scalar::integer_sum_limit<Bits>());
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(quads * quad_rows * 4));
  std::vector<std::int16_t> query(static_cast<std::size_t>(num_rows * padded));
  unsigned state = 12345;
  auto next = [&state] { return state = state * 1103515245u + 12345u, state >> 8; };
  for (std::size_t i = 0; i < codes.size(); ++i)  // the largest code in every tenth place
    codes[i] = static_cast<std::uint8_t>(i % 10 == 0 ? 255u : next() % 256);
  for (std::size_t i = 0; i < query.size(); ++i)  // +-limit in every seventh place
    query[i] = static_cast<std::int16_t>(i % 7 == 0 ? (i % 2 == 0 ? limit : -limit)
                                                    : std::int32_t(next() % (2u * limit + 1)) - limit);
  // A row whose sum of |word| passes the limit is scaled down to it, as integer_query's step
  // would (up to the rounding's half a word per channel).
  for (Index row = 0; row < num_rows; ++row) {
    std::int16_t* w = query.data() + row * padded;
    std::int64_t total = 0;
    for (Index c = 0; c < padded; ++c) total += std::abs(w[c]);
    if (total > sum_limit)
      for (Index c = 0; c < padded; ++c) {
        const std::int64_t scaled = std::int64_t(w[c]) * sum_limit / total;
        // Plus the rounding's excess, up to half a word a channel: one on every other one.
        const std::int64_t excess = c % 2 == 1 && scaled != 0 ? (scaled > 0 ? 1 : -1) : 0;
        w[c] = static_cast<std::int16_t>(scaled + excess);
      }
  }
  // Row 0 with every word at the largest the limits allow, and every code of quad row 0 (key 0;
  // int4: keys 0 and quad_rows) at the top: the largest sum there can be.
  const auto largest = static_cast<std::int16_t>(std::min<std::int64_t>(limit, sum_limit / padded));
  std::fill(query.begin(), query.begin() + padded, largest);
  for (Index k = 0; k < quads; ++k) std::fill_n(codes.begin() + k * quad_rows * 4, 4, std::uint8_t{255});
  const kd::KeyQuads keys{codes.data(), quads, quad_rows};
  std::vector<std::int32_t> want(static_cast<std::size_t>(num_rows * tokens));
  kd::isa_scalar::key_code_dots_portable<Bits>(keys, query.data(), num_rows, want.data());
  // Spot-check the loop itself against the layout's definition.
  const kd::QuantBlockFormat<Bits> format{tokens, padded};
  for (Index t = 0; t < tokens; t += std::max<Index>(1, tokens / 5)) {
    std::int64_t sum = 0;
    for (Index c = 0; c < padded; ++c)
      sum += std::int64_t(query[static_cast<std::size_t>(c)]) * format.key_code(codes.data(), t, c);
    REQUIRE(sum == want[static_cast<std::size_t>(t)]);
  }
#if defined(KVCACHE_HAS_X86_VARIANTS)
  std::vector<std::int8_t> split(static_cast<std::size_t>(2 * num_rows * padded));
  Index prefetched = 0;
  auto count_prefetch = [&prefetched](Index) { ++prefetched; };
  auto check = [&](const char* path, auto&& dots) {
    std::vector<std::int32_t> got(want.size(), -1);
    prefetched = 0;
    const bool ran = dots(got.data());
    CAPTURE(path);
    if (!ran) {  // the shape has no vector path there: nothing written
      REQUIRE(std::all_of(got.begin(), got.end(), [](std::int32_t x) { return x == -1; }));
      return;
    }
    REQUIRE(got == want);
    REQUIRE(prefetched == quads);  // each quad's share of the next stream once
  };
  const kd::Isa cpu = kd::detect_isa();
  if (cpu >= kd::Isa::kAvx2)
    check("avx2 vpmaddwd", [&](std::int32_t* out) {
      return kd::isa_avx2::FloatVec::key_code_dots<Bits>(keys, query.data(), num_rows, out,
                                                         split.data(), count_prefetch);
    });
  // The AVX-512 variant's own: vpmaddwd on 512 bits under KVCACHE_ISA=avx512-novnni (ctest
  // runs this file so), vpdpbusd where the cap allows VNNI.
  if (cpu >= kd::Isa::kAvx512)
    check("avx512 variant", [&](std::int32_t* out) {
      return kd::isa_avx512::FloatVec::key_code_dots<Bits>(keys, query.data(), num_rows, out,
                                                           split.data(), count_prefetch);
    });
  if (cpu >= kd::Isa::kAvx512Vnni)
    check("avx512 vpdpbusd", [&](std::int32_t* out) {
      return kd::isa_avx512_vnni::key_code_dots<Bits>(keys, query.data(), num_rows, out,
                                                      split.data(), count_prefetch);
    });
#endif
}
