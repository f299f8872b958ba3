// attend() over a cache and over tensors against the naive double reference: both layouts,
// GQA ratios 1-8, head_dim 1-128, lengths around the kernel's block sizes, decode, prefill,
// partial chunks, non-causal and cross-attention shapes.
#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::DynamicKVCache;
using kvcache::StaticKVCache;

namespace {

/// Appends kv_len random tokens to a fresh cache (in chunks of `chunk`), attends with the last
/// q_len rows of a random q and returns the worst difference from the reference.
template <class Cache, class L>
double cache_error(Cache& cache, Index batch, Index q_heads, Index kv_len, Index q_len,
                   Index chunk, const AttendOptions& options, unsigned seed, double q_scale = 1.0) {
  using T = typename Cache::element_type;
  const Index heads = cache.num_heads(), head_dim = cache.head_dim();
  const Tensor4<T> k = random_tensor<T, L>(cache.batch_size(), heads, kv_len, head_dim, seed);
  const Tensor4<T> v = random_tensor<T, L>(cache.batch_size(), heads, kv_len, head_dim, seed + 1);
  for (Index at = 0; at < kv_len; at += chunk) {
    const Index n = std::min(chunk, kv_len - at);
    cache.update(slice_seq<L>(k, at, n), slice_seq<L>(v, at, n));
  }
  const Tensor4<T> q = random_tensor<T, L>(batch, q_heads, q_len, head_dim, seed + 2, q_scale);
  const Tensor4<T> got = kvcache::attend(q, cache, options);
  const auto want = reference_attention<L>(q, k, v, iota_positions(kv_len), kv_len - q_len,
                                           rules_from(options));
  return max_abs_diff(got, want);
}

}  // namespace

TEMPLATE_TEST_CASE("decode attention matches the reference", "[attend]", BHSD, BSHD) {
  using L = TestType;
  const Index rep = GENERATE(1, 2, 4, 8);
  const Index head_dim = GENERATE(1, 7, 64, 128);
  const Index kv_len = GENERATE(1, 2, 63, 64, 65, 129, 300);
  CAPTURE(rep, head_dim, kv_len);
  StaticKVCache<float, L> cache(1, 300, 2, head_dim);
  REQUIRE(cache_error<decltype(cache), L>(cache, 1, 2 * rep, kv_len, 1, 7, {}, 20) <
          tolerance<float>());
}

TEMPLATE_TEST_CASE("causal prefill and partial chunks match the reference", "[attend]", BHSD,
                   BSHD) {
  using L = TestType;
  const Index rep = GENERATE(1, 4);
  const Index head_dim = GENERATE(7, 64);
  const Index kv_len = GENERATE(1, 2, 65, 129);
  const Index q_len = std::min(kv_len, GENERATE(Index(1), Index(5), Index(1000)));
  CAPTURE(rep, head_dim, kv_len, q_len);
  DynamicKVCache<float, L> cache(2, 2, head_dim);
  REQUIRE(cache_error<decltype(cache), L>(cache, 2, 2 * rep, kv_len, q_len, kv_len, {}, 30) <
          tolerance<float>());
}

TEMPLATE_TEST_CASE("query chunks across the kernel's row blocks", "[attend]", BHSD, BSHD) {
  using L = TestType;
  const Index rep = GENERATE(1, 3, 8);  // 64 / rep query positions per work item
  const Index q_len = GENERATE(63, 64, 65, 70, 130);
  CAPTURE(rep, q_len);
  StaticKVCache<float, L> cache(1, 140, 1, 16);
  REQUIRE(cache_error<decltype(cache), L>(cache, 1, rep, 140, q_len, 140, {}, 40) <
          tolerance<float>());
}

TEMPLATE_TEST_CASE("non-causal attention, also with more queries than keys", "[attend]", BHSD,
                   BSHD) {
  using L = TestType;
  const Index rep = GENERATE(2, 8);
  const Index head_dim = GENERATE(1, 128);
  const Index kv_len = GENERATE(1, 64, 65);
  const Index q_len = GENERATE(1, 3, 80);
  CAPTURE(rep, head_dim, kv_len, q_len);
  AttendOptions options;
  options.causal = false;
  StaticKVCache<float, L> cache(1, 65, 1, head_dim);
  REQUIRE(cache_error<decltype(cache), L>(cache, 1, rep, kv_len, q_len, 16, options, 50) <
          tolerance<float>());
}

TEMPLATE_TEST_CASE("q with fewer batch rows than the cache reads rows [0, b)", "[attend]", BHSD,
                   BSHD) {
  using L = TestType;
  StaticKVCache<float, L> cache(3, 40, 2, 8);
  REQUIRE(cache_error<decltype(cache), L>(cache, 2, 4, 40, 6, 9, {}, 60) < tolerance<float>());
}

TEMPLATE_TEST_CASE("large logits stay finite and exact", "[attend]", BHSD, BSHD) {
  using L = TestType;
  StaticKVCache<float, L> cache(1, 200, 2, 64);
  // |q . k| * scale up to ~ 64 * 30 / 8: a plain exp would overflow float.
  REQUIRE(cache_error<decltype(cache), L>(cache, 1, 8, 200, 3, 200, {}, 70, 30.0) <
          tolerance<float>());
}

TEMPLATE_TEST_CASE("decode steps interleaved with appends", "[attend]", BHSD, BSHD) {
  using L = TestType;
  const Index heads = 2, q_heads = 8, head_dim = 16, total = 90;
  const Tensor4<float> k = random_tensor<float, L>(1, heads, total, head_dim, 80);
  const Tensor4<float> v = random_tensor<float, L>(1, heads, total, head_dim, 81);
  DynamicKVCache<float, L> cache(1, heads, head_dim);
  cache.update(slice_seq<L>(k, 0, 20), slice_seq<L>(v, 0, 20));
  for (Index step = 20; step < total; ++step) {
    cache.update(slice_seq<L>(k, step, 1), slice_seq<L>(v, step, 1));
    const Tensor4<float> q = random_tensor<float, L>(1, q_heads, 1, head_dim, unsigned(100 + step));
    const auto want = reference_attention<L>(q, slice_seq<L>(k, 0, step + 1),
                                             slice_seq<L>(v, 0, step + 1),
                                             iota_positions(step + 1), step, {});
    REQUIRE(max_abs_diff(kvcache::attend(q, cache), want) < tolerance<float>());
  }
}

TEMPLATE_TEST_CASE("the tensor overload equals the cache overload", "[attend]", BHSD, BSHD) {
  using L = TestType;
  const Index kv_len = GENERATE(1, 33, 100);
  const Index q_len = std::min<Index>(kv_len, 7);
  const Tensor4<float> k = random_tensor<float, L>(2, 2, kv_len, 32, 90);
  const Tensor4<float> v = random_tensor<float, L>(2, 2, kv_len, 32, 91);
  const Tensor4<float> q = random_tensor<float, L>(2, 6, q_len, 32, 92);
  StaticKVCache<float, L> cache(2, kv_len, 2, 32);
  cache.update(k, v);
  const Tensor4<float> from_tensors = kvcache::attend<L>(q, k, v);
  REQUIRE(equal(from_tensors, kvcache::attend(q, cache)));
  const auto want = reference_attention<L>(q, k, v, iota_positions(kv_len), kv_len - q_len, {});
  REQUIRE(max_abs_diff(from_tensors, want) < tolerance<float>());

  // TensorMaps work for every argument, const or not.
  Eigen::TensorMap<const Tensor4<float>> q_map(q.data(), q.dimensions());
  Tensor4<float> k_copy = k;
  Eigen::TensorMap<Tensor4<float>> k_map(k_copy.data(), k.dimensions());
  REQUIRE(equal(kvcache::attend<L>(q_map, k_map, v), from_tensors));
  REQUIRE(equal(kvcache::attend(q_map, cache), from_tensors));
}

TEST_CASE("zero query rows give an empty output", "[attend]") {
  StaticKVCache<float> cache(1, 4, 1, 8);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 1, 2, 8, 95);
  cache.update(k, k);
  const Tensor4<float> q(1, 2, 0, 8);
  const Tensor4<float> out = kvcache::attend(q, cache);
  REQUIRE(out.dimension(2) == 0);
}

TEST_CASE("an empty cache answers non-causal queries with zeros", "[attend]") {
  StaticKVCache<float> cache(1, 4, 1, 8);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 2, 3, 8, 96);
  AttendOptions options;
  options.causal = false;
  const Tensor4<float> out = kvcache::attend(q, cache, options);
  for (Index i = 0; i < out.size(); ++i) REQUIRE(out.data()[i] == 0.0f);
}
