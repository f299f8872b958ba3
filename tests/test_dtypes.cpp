// Every element type: storage is exact, attention is within the type's tolerance of the
// double reference computed on the same (rounded) inputs, in both layouts, with GQA and masks;
// and values near the type's largest finite number.
#include "support/catch.hpp"
#include "support/reference.hpp"

#include <limits>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::DynamicKVCache;
using kvcache::StaticKVCache;

TEMPLATE_TEST_CASE("attention in every element type", "[dtypes]", (Case<float, BHSD>),
                   (Case<float, BSHD>), (Case<double, BHSD>), (Case<double, BSHD>),
                   (Case<Eigen::half, BHSD>), (Case<Eigen::half, BSHD>),
                   (Case<Eigen::bfloat16, BHSD>), (Case<Eigen::bfloat16, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index head_dim = GENERATE(7, 64);
  const Index kv_len = GENERATE(1, 65, 150);
  const Index q_len = std::min<Index>(kv_len, GENERATE(1, 4));
  const bool causal = GENERATE(true, false);
  CAPTURE(head_dim, kv_len, q_len, causal);
  const Tensor4<T> k = random_tensor<T, L>(2, 2, kv_len, head_dim, 1);
  const Tensor4<T> v = random_tensor<T, L>(2, 2, kv_len, head_dim, 2);
  const Tensor4<T> q = random_tensor<T, L>(2, 8, q_len, head_dim, 3, 2.0);
  Mask mask(2, kv_len);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = i % 5 != 3;
  AttendOptions options;
  options.causal = causal;
  options.key_mask = &mask;

  StaticKVCache<T, L> fixed(2, kv_len, 2, head_dim);
  DynamicKVCache<T, L> dynamic(2, 2, head_dim);
  fixed.update(k, v);
  dynamic.update(slice_seq<L>(k, 0, kv_len / 2), slice_seq<L>(v, 0, kv_len / 2));
  dynamic.update(slice_seq<L>(k, kv_len / 2, kv_len - kv_len / 2),
                 slice_seq<L>(v, kv_len / 2, kv_len - kv_len / 2));
  REQUIRE(equal(fixed.keys(), k));
  REQUIRE(equal(dynamic.values(), v));

  const auto want =
      reference_attention<L>(q, k, v, iota_positions(kv_len), kv_len - q_len, rules_from(options));
  const Tensor4<T> got = kvcache::attend(q, fixed, options);
  REQUIRE(max_abs_diff(got, want) < tolerance<T>());
  REQUIRE(equal(kvcache::attend(q, dynamic, options), got));
}

// The kernel accumulates sum_j p_j v_j with weights p_j = exp(s_j - max) <= 1 and divides by
// sum_j p_j at the end, so the accumulator reaches (visible keys) x max|v|: beyond the
// accumulator's range when |v| is near its largest number (float for float and bfloat16,
// double for double), although the output - a convex combination of the values - is not.
// Such a unit runs again with the value sums scaled by a power of two (overflow_value_scale).
// (The quantized caches: tests/test_quantized_cache.cpp; split-K: tests/test_workspace.cpp.)
TEMPLATE_TEST_CASE("values near the largest finite number give finite, exact outputs",
                   "[dtypes][large_values]", (Case<float, BHSD>),
                   (Case<Eigen::bfloat16, BSHD>), (Case<double, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const double top = static_cast<double>(std::numeric_limits<T>::max());
  const double magnitude = top * GENERATE(0.3, 0.9);  // 1e38 and 3e38 for float
  const Index kv_len = GENERATE(4, 200);
  const Index q_len = GENERATE(1, 20);  // decode, and the matrix-product path
  CAPTURE(magnitude, kv_len, q_len);
  const Index heads = 2, head_dim = 32, total = kv_len + q_len;
  const Tensor4<T> k = random_tensor<T, L>(1, heads, total, head_dim, 1);
  const Tensor4<T> q = random_tensor<T, L>(1, 2 * heads, q_len, head_dim, 3);
  Tensor4<T> same(dims<L>(1, heads, total, head_dim));
  same.setConstant(static_cast<T>(magnitude));
  // Random values, and every value the same (the output is then that value, whatever the
  // weights). Errors in units of the magnitude, against the type's usual tolerance.
  for (const Tensor4<T>& v : {scaled_random_tensor<T, L>(1, heads, total, head_dim, 2, magnitude),
                              same}) {
    StaticKVCache<T, L> cache(1, total, heads, head_dim);
    cache.update(k, v);
    const auto want = reference_attention<L>(q, k, v, iota_positions(total), kv_len, {});
    CHECK(max_abs_diff(kvcache::attend(q, cache), want) / magnitude < tolerance<T>());
  }
}
