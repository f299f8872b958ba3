// Every element type: storage is exact, attention is within the type's tolerance of the
// double reference computed on the same (rounded) inputs, in both layouts, with GQA and masks.
#include "support/catch.hpp"
#include "support/reference.hpp"

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
