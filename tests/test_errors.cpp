// Every error path of the caches and of attend(): the exception type API.md names, a message
// that names expected and received values, and the cache exactly as it was (strong guarantee).
#include "support/catch.hpp"
#include "support/reference.hpp"
#include "support/snapshot.hpp"

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::DynamicKVCache;
using kvcache::StaticKVCache;

namespace {

template <class Cache, class L>
void check_update_errors(Cache& cache) {
  // cache: batch 2, heads 2, head_dim 4, holding 3 positions.
  const Snapshot<Cache> before(cache);
  auto tensor = [](Index b, Index h, Index s, Index d) {
    return random_tensor<float, L>(b, h, s, d, 1);
  };
  auto expect_invalid = [&](const Tensor4<float>& k, const Tensor4<float>& v,
                            const std::string& received) {
    require_invalid_update(cache, k, v, received);
  };
  const std::string layout = std::string(" (") + L::name + ")";
  expect_invalid(tensor(3, 2, 1, 4), tensor(3, 2, 1, 4),
                 describe(dims<L>(3, 2, 1, 4)) + layout);  // batch too large
  expect_invalid(tensor(1, 3, 1, 4), tensor(1, 3, 1, 4), describe(dims<L>(1, 3, 1, 4)));  // heads
  expect_invalid(tensor(1, 2, 1, 5), tensor(1, 2, 1, 5), describe(dims<L>(1, 2, 1, 5)));  // head_dim
  expect_invalid(tensor(0, 2, 1, 4), tensor(0, 2, 1, 4), describe(dims<L>(0, 2, 1, 4)));  // no rows
  expect_invalid(tensor(1, 2, 2, 4), tensor(1, 2, 1, 4), describe(dims<L>(1, 2, 1, 4)));  // k != v
  // A wrong shape that would also overflow a static cache: the shape error wins.
  expect_invalid(tensor(1, 2, 1000, 5), tensor(1, 2, 1000, 5), describe(dims<L>(1, 2, 1000, 5)));
  // Zero-length wrong shapes are still wrong.
  expect_invalid(tensor(1, 2, 0, 5), tensor(1, 2, 0, 5), describe(dims<L>(1, 2, 0, 5)));

  REQUIRE_THROWS_AS(cache.crop(4), std::invalid_argument);
  REQUIRE_THROWS_AS(cache.crop(-1), std::invalid_argument);
  REQUIRE(contains(message_of([&] { cache.crop(4); }), "got 4"));
  REQUIRE(Snapshot<Cache>(cache) == before);
}

template <class Cache, class L>
void check_attend_errors(const Cache& cache) {
  const Snapshot<Cache> before(cache);
  auto q = [](Index b, Index h, Index s, Index d) { return random_tensor<float, L>(b, h, s, d, 2); };
  auto expect_invalid = [&](const Tensor4<float>& query, const AttendOptions& options,
                            const std::string& part) {
    REQUIRE_THROWS_AS(kvcache::attend(query, cache, options), std::invalid_argument);
    const std::string what = message_of([&] { kvcache::attend(query, cache, options); });
    CAPTURE(what);
    REQUIRE(contains(what, part));
    REQUIRE(Snapshot<Cache>(cache) == before);
  };
  const AttendOptions plain;
  expect_invalid(q(3, 2, 1, 4), plain, describe(dims<L>(3, 2, 1, 4)));  // batch too large
  expect_invalid(q(1, 3, 1, 4), plain, "a multiple of 2");              // 3 q heads over 2
  expect_invalid(q(1, 4, 1, 8), plain, describe(dims<L>(1, 4, 1, 8)));  // head_dim
  expect_invalid(q(1, 2, 4, 4), plain, "q_len 4 exceeds the 3 positions");
  AttendOptions windowed;
  windowed.causal = false;
  windowed.window = 2;
  expect_invalid(q(1, 2, 4, 4), windowed, "q_len 4");
  AttendOptions negative_window;
  negative_window.window = -1;
  expect_invalid(q(1, 2, 1, 4), negative_window, "got -1");
  AttendOptions negative_softcap;
  negative_softcap.softcap = -1;
  expect_invalid(q(1, 2, 1, 4), negative_softcap, "softcap");
  AttendOptions bad_scale;
  bad_scale.scale = std::numeric_limits<float>::quiet_NaN();
  expect_invalid(q(1, 2, 1, 4), bad_scale, "scale");

  Mask short_mask(2, 2), few_rows(1, 3), long_mask(2, 4);
  for (const Mask* m : {&short_mask, &few_rows, &long_mask}) {
    AttendOptions masked;
    masked.key_mask = m;
    expect_invalid(q(2, 2, 1, 4), masked, "key_mask");
  }
}

}  // namespace

TEMPLATE_TEST_CASE("cache errors leave the cache unchanged", "[errors]", BHSD, BSHD) {
  using L = TestType;
  const Tensor4<float> k = random_tensor<float, L>(2, 2, 3, 4, 3);
  SECTION("static") {
    StaticKVCache<float, L> cache(2, 5, 2, 4);
    cache.update(k, k);
    check_update_errors<decltype(cache), L>(cache);
    check_attend_errors<decltype(cache), L>(cache);
    const Snapshot<decltype(cache)> before(cache);
    const Tensor4<float> three = random_tensor<float, L>(1, 2, 3, 4, 4);
    REQUIRE_THROWS_AS(cache.update(three, three), std::length_error);
    const std::string what = message_of([&] { cache.update(three, three); });
    CAPTURE(what);
    REQUIRE(contains(what, "capacity of 5"));
    REQUIRE(Snapshot<decltype(cache)>(cache) == before);
  }
  SECTION("dynamic") {
    DynamicKVCache<float, L> cache(2, 2, 4);
    cache.update(k, k);
    check_update_errors<decltype(cache), L>(cache);
    check_attend_errors<decltype(cache), L>(cache);
  }
}

TEST_CASE("constructor arguments must be positive", "[errors]") {
  REQUIRE_THROWS_AS(StaticKVCache<float>(0, 4, 1, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(StaticKVCache<float>(1, 0, 1, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(StaticKVCache<float>(1, 4, -2, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(StaticKVCache<float>(1, 4, 1, 0), std::invalid_argument);
  REQUIRE_THROWS_AS(DynamicKVCache<float>(0, 1, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(DynamicKVCache<float>(1, 0, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(DynamicKVCache<float>(1, 1, -1), std::invalid_argument);
  REQUIRE_THROWS_AS(DynamicKVCache<float>(1, 1, 1, -1), std::invalid_argument);
  const std::string what = message_of([] { StaticKVCache<float>(1, -3, 1, 1); });
  REQUIRE(contains(what, "max_seq_len"));
  REQUIRE(contains(what, "-3"));
}

TEMPLATE_TEST_CASE("tensor attend errors", "[errors]", BHSD, BSHD) {
  using L = TestType;
  const Tensor4<float> k = random_tensor<float, L>(1, 2, 5, 4, 5);
  const Tensor4<float> v_short = random_tensor<float, L>(1, 2, 4, 4, 6);
  const Tensor4<float> q = random_tensor<float, L>(1, 4, 1, 4, 7);
  REQUIRE_THROWS_AS(kvcache::attend<L>(q, k, v_short), std::invalid_argument);
  REQUIRE(contains(message_of([&] { kvcache::attend<L>(q, k, v_short); }), "same shape"));
  const Tensor4<float> q3 = random_tensor<float, L>(1, 3, 1, 4, 8);
  REQUIRE_THROWS_AS(kvcache::attend<L>(q3, k, k), std::invalid_argument);
  const Tensor4<float> q2 = random_tensor<float, L>(2, 4, 1, 4, 9);
  REQUIRE_THROWS_AS(kvcache::attend<L>(q2, k, k), std::invalid_argument);
}

TEST_CASE("sizes beyond the address space throw std::length_error, nothing wraps", "[errors]") {
  const Index huge = Index(1) << 62;
  REQUIRE_THROWS_AS(StaticKVCache<float>(1, huge, 1, 4), std::length_error);
  REQUIRE_THROWS_AS(StaticKVCache<float>(huge, huge, huge, huge), std::length_error);
  REQUIRE_THROWS_AS((kvcache::SlidingWindowKVCache<float>(1, huge, 1, 4, huge)), std::length_error);
  REQUIRE_THROWS_AS((kvcache::Int8KVCache<float>(4, huge, 8, 64)), std::length_error);
  DynamicKVCache<float> cache(2, 2, 4);
  const Tensor4<float> k = random_tensor<float, BHSD>(2, 2, 3, 4, 6);
  cache.update(k, k);
  const Snapshot<DynamicKVCache<float>> before(cache);
  REQUIRE_THROWS_AS(cache.reserve(huge), std::length_error);
  REQUIRE(Snapshot<DynamicKVCache<float>>(cache) == before);
}
