// Every AttendOptions field alone and combined, against the reference; fully masked rows.
#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::StaticKVCache;

namespace {

struct Setup {
  Index batch = 2, heads = 2, q_heads = 4, head_dim = 24, kv_len = 75, q_len = 9;
};

/// A random key mask of (rows, kv_len) with about a quarter of the keys masked.
Mask random_mask(Index rows, Index kv_len, unsigned seed) {
  Mask mask(rows, kv_len);
  std::mt19937 rng(seed);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = (rng() % 4) != 0;
  return mask;
}

template <class L>
void check(const Setup& s, const AttendOptions& options, unsigned seed, double q_scale = 1.0) {
  const Tensor4<float> k = random_tensor<float, L>(s.batch, s.heads, s.kv_len, s.head_dim, seed);
  const Tensor4<float> v = random_tensor<float, L>(s.batch, s.heads, s.kv_len, s.head_dim, seed + 1);
  const Tensor4<float> q =
      random_tensor<float, L>(s.batch, s.q_heads, s.q_len, s.head_dim, seed + 2, q_scale);
  StaticKVCache<float, L> cache(s.batch, s.kv_len, s.heads, s.head_dim);
  cache.update(slice_seq<L>(k, 0, s.kv_len - s.q_len), slice_seq<L>(v, 0, s.kv_len - s.q_len));
  cache.update(slice_seq<L>(k, s.kv_len - s.q_len, s.q_len),
               slice_seq<L>(v, s.kv_len - s.q_len, s.q_len));
  const auto want = reference_attention<L>(q, k, v, iota_positions(s.kv_len), s.kv_len - s.q_len,
                                           rules_from(options));
  REQUIRE(max_abs_diff(kvcache::attend(q, cache, options), want) < tolerance<float>());
  REQUIRE(max_abs_diff(kvcache::attend<L>(q, k, v, options), want) < tolerance<float>());
}

}  // namespace

TEMPLATE_TEST_CASE("scale", "[options]", BHSD, BSHD) {
  AttendOptions options;
  options.scale = GENERATE(0.0f, 0.05f, 1.0f, -0.3f);
  check<TestType>({}, options, 1);
}

TEMPLATE_TEST_CASE("window", "[options]", BHSD, BSHD) {
  AttendOptions options;
  options.window = GENERATE(1, 2, 9, 10, 64, 65, 74, 75, 1000);
  options.causal = GENERATE(true, false);
  CAPTURE(options.window, options.causal);
  check<TestType>({}, options, 2);
}

TEMPLATE_TEST_CASE("softcap", "[options]", BHSD, BSHD) {
  AttendOptions options;
  options.softcap = GENERATE(0.5f, 5.0f, 50.0f);
  check<TestType>({}, options, 3, /*q_scale=*/20.0);
}

TEMPLATE_TEST_CASE("key mask", "[options]", BHSD, BSHD) {
  const Setup s;
  const Index rows = GENERATE(2, 3);  // at least q's batch; extra rows are ignored
  const Mask mask = random_mask(rows, s.kv_len, 4);
  AttendOptions options;
  options.key_mask = &mask;
  options.causal = GENERATE(true, false);
  check<TestType>(s, options, 5);
}

TEMPLATE_TEST_CASE("every option at once", "[options]", BHSD, BSHD) {
  Setup s;
  s.q_heads = 8;
  const Mask mask = random_mask(s.batch, s.kv_len, 6);
  AttendOptions options;
  options.scale = 0.2f;
  options.window = GENERATE(3, 30);
  options.softcap = 2.0f;
  options.key_mask = &mask;
  options.causal = GENERATE(true, false);
  check<TestType>(s, options, 7, 3.0);
}

TEMPLATE_TEST_CASE("fully masked rows are zeros, the others are not disturbed", "[options]", BHSD,
                   BSHD) {
  using L = TestType;
  const Setup s;
  Mask mask = random_mask(s.batch, s.kv_len, 8);
  for (Index p = 0; p < s.kv_len; ++p) mask(1, p) = false;  // batch row 1: nothing visible
  // batch row 0: only the last key visible, so causal rows before it see nothing.
  for (Index p = 0; p < s.kv_len; ++p) mask(0, p) = p == s.kv_len - 1;
  AttendOptions options;
  options.key_mask = &mask;
  check<L>(s, options, 9);

  const Tensor4<float> k = random_tensor<float, L>(s.batch, s.heads, s.kv_len, s.head_dim, 10);
  const Tensor4<float> q = random_tensor<float, L>(s.batch, s.q_heads, s.q_len, s.head_dim, 11);
  const Tensor4<float> out = kvcache::attend<L>(q, k, k, options);
  for (Index h = 0; h < s.q_heads; ++h)
    for (Index i = 0; i < s.q_len; ++i)
      for (Index c = 0; c < s.head_dim; ++c) {
        REQUIRE(at<L>(out, 1, h, i, c) == 0.0f);
        if (i < s.q_len - 1) REQUIRE(at<L>(out, 0, h, i, c) == 0.0f);
        else REQUIRE(at<L>(out, 0, h, i, c) == at<L>(k, 0, h / 2, s.kv_len - 1, c));
      }
}
