// attend(q, cache, out, workspace, options): the allocation-free overload, and split-K (a long
// cache with few work items is cut into splits of its positions whose softmax states merge).
#include "support/catch.hpp"
#include "support/reference.hpp"

#include "support/counting_allocator.hpp"

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::AttendWorkspace;

namespace {

/// Heap allocations made by f().
template <class F>
long allocations_during(F&& f) {
  const long before = allocation_count.load();
  f();
  return allocation_count.load() - before;
}

/// Decode steps over `cache` with one workspace and one output: after the first, none may
/// allocate; every result equals attend(q, cache) bit for bit.
template <class Cache, class T, class Layout>
void check_decode_steps_allocate_nothing(const Cache& cache, const Tensor4<T>& q) {
  AttendWorkspace workspace;
  Tensor4<T> out(q.dimensions());
  kvcache::attend(q, cache, out, workspace);  // the first step sizes the workspace
  long during = 0;
  for (int step = 0; step < 5; ++step)
    during += allocations_during([&] { kvcache::attend(q, cache, out, workspace); });
  REQUIRE(during == 0);
  REQUIRE(equal(out, kvcache::attend(q, cache)));
  (void)sizeof(Layout);
}

}  // namespace

TEMPLATE_TEST_CASE("attend into out with a reused workspace allocates nothing", "[workspace]",
                   (Case<float, BHSD>), (Case<float, BSHD>), (Case<Eigen::bfloat16, BHSD>),
                   (Case<double, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index kv_heads = 2, head_dim = 40, length = 300;
  const Tensor4<T> k = random_tensor<T, L>(1, kv_heads, length, head_dim, 1);
  const Tensor4<T> v = random_tensor<T, L>(1, kv_heads, length, head_dim, 2);
  const Tensor4<T> q = random_tensor<T, L>(1, 4 * kv_heads, 1, head_dim, 3);

  SECTION("static") {
    kvcache::StaticKVCache<T, L> cache(1, length, kv_heads, head_dim);
    cache.update(k, v);
    check_decode_steps_allocate_nothing<decltype(cache), T, L>(cache, q);
  }
  SECTION("dynamic") {
    kvcache::DynamicKVCache<T, L> cache(1, kv_heads, head_dim);
    cache.update(k, v);
    check_decode_steps_allocate_nothing<decltype(cache), T, L>(cache, q);
  }
  SECTION("sliding window with sinks") {
    kvcache::SlidingWindowKVCache<T, L> cache(1, 64, kv_heads, head_dim, 4);
    cache.update(k, v);
    check_decode_steps_allocate_nothing<decltype(cache), T, L>(cache, q);
  }
  SECTION("int8 and int4") {
    kvcache::QuantConfig config;
    config.group_size = 20;  // divides head_dim 40
    kvcache::Int8KVCache<T, L> int8(1, length, kv_heads, head_dim, config);
    int8.update(k, v);
    check_decode_steps_allocate_nothing<decltype(int8), T, L>(int8, q);
    kvcache::Int4KVCache<T, L> int4(1, length, kv_heads, head_dim, config);
    int4.update(k, v);
    check_decode_steps_allocate_nothing<decltype(int4), T, L>(int4, q);
  }
}

TEST_CASE("a static cache's update and attend into out allocate nothing in a decode loop",
          "[workspace]") {
  const Index kv_heads = 2, head_dim = 64, steps = 40;
  kvcache::StaticKVCache<float> cache(1, steps, kv_heads, head_dim);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, kv_heads, 1, head_dim, 4);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 4 * kv_heads, 1, head_dim, 5);
  Tensor4<float> out(1, 4 * kv_heads, 1, head_dim);
  AttendWorkspace workspace;
  workspace.reserve(1 << 20);
  const long during = allocations_during([&] {
    for (Index step = 0; step < steps; ++step) {
      cache.update(k, k);
      kvcache::attend(q, cache, out, workspace);
    }
  });
  REQUIRE(during == 0);
  REQUIRE(equal(out, kvcache::attend(q, cache)));
}

TEST_CASE("attend writes into a TensorMap of the caller's memory", "[workspace]") {
  const Index head_dim = 24;
  kvcache::StaticKVCache<float, BSHD> cache(2, 50, 3, head_dim);
  cache.update(random_tensor<float, BSHD>(2, 3, 50, head_dim, 6),
               random_tensor<float, BSHD>(2, 3, 50, head_dim, 7));
  const Tensor4<float> q = random_tensor<float, BSHD>(2, 6, 5, head_dim, 8);
  std::vector<float> memory(static_cast<std::size_t>(q.size()), -1.0f);
  Eigen::TensorMap<Tensor4<float>> out(memory.data(), q.dimensions());
  AttendWorkspace workspace;
  kvcache::attend(q, cache, out, workspace);
  const Tensor4<float> want = kvcache::attend(q, cache);
  REQUIRE(std::equal(memory.begin(), memory.end(), want.data()));
  REQUIRE(workspace.capacity_bytes() > 0);
}

TEST_CASE("attend into an out of the wrong shape throws and writes nothing", "[workspace]") {
  kvcache::StaticKVCache<float> cache(1, 10, 2, 8);
  cache.update(random_tensor<float, BHSD>(1, 2, 10, 8, 9), random_tensor<float, BHSD>(1, 2, 10, 8, 10));
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 4, 1, 8, 11);
  Tensor4<float> out(1, 4, 2, 8);
  out.setConstant(7.0f);
  AttendWorkspace workspace;
  const std::string message = message_of([&] { kvcache::attend(q, cache, out, workspace); });
  REQUIRE(contains(message, "expected out of q's shape [1, 4, 1, 8]"));
  REQUIRE(contains(message, "got [1, 4, 2, 8]"));
  REQUIRE_THROWS_AS(kvcache::attend(q, cache, out, workspace), std::invalid_argument);
  for (Index i = 0; i < out.size(); ++i) REQUIRE(out.data()[i] == 7.0f);
}

// --- split-K ----------------------------------------------------------------------------------
// One KV head, one query token and thousands of positions: a few work items, so the kernel cuts
// the positions into splits. Checked against the naive reference, and thread pools against the
// serial path bit for bit (the splits depend on shapes only).

TEMPLATE_TEST_CASE("split-K over a long cache matches the reference and every device",
                   "[workspace][split]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::half, BHSD>), (Case<double, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index head_dim = GENERATE(Index(16), Index(37));
  const Index length = GENERATE(Index(4096), Index(6001));
  const Index q_len = GENERATE(Index(1), Index(3));
  CAPTURE(head_dim, length, q_len);
  const Tensor4<T> k = random_tensor<T, L>(1, 1, length, head_dim, 12);
  const Tensor4<T> v = random_tensor<T, L>(1, 1, length, head_dim, 13);
  const Tensor4<T> q = random_tensor<T, L>(1, 2, q_len, head_dim, 14, 3.0);
  kvcache::StaticKVCache<T, L> cache(1, length, 1, head_dim);
  cache.update(k, v);
  Mask mask(1, length);
  for (Index i = 0; i < length; ++i) mask(0, i) = i % 5 != 2;

  AttendOptions options;
  options.window = GENERATE(Index(0), Index(5000));
  const bool masked = GENERATE(false, true);
  if (masked) options.key_mask = &mask;
  CAPTURE(options.window, masked);
  const Tensor4<T> serial = kvcache::attend(q, cache, options);
  const auto want = reference_attention<L>(q, k, v, iota_positions(length), length - q_len,
                                           rules_from(options));
  REQUIRE(max_abs_diff(serial, want) < tolerance<T>());

  for (int threads : {2, 3}) {
    Eigen::ThreadPool pool(threads);
    Eigen::ThreadPoolDevice device(&pool, threads);
    AttendOptions parallel = options;
    parallel.device = &device;
    REQUIRE(equal(kvcache::attend(q, cache, parallel), serial));
    AttendWorkspace workspace;
    Tensor4<T> out(q.dimensions());
    kvcache::attend(q, cache, out, workspace, parallel);
    REQUIRE(equal(out, serial));
  }
}

TEST_CASE("split-K cuts quantized caches on block boundaries", "[workspace][split]") {
  // group 48 with head_dim 96: splits must fall on multiples of lcm(64, 48) = 192.
  const Index head_dim = 96, length = 5000;
  kvcache::QuantConfig config;
  config.group_size = GENERATE(Index(32), Index(48));
  config.residual_length = 40;
  CAPTURE(config.group_size);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 1, length, head_dim, 15);
  const Tensor4<float> v = random_tensor<float, BHSD>(1, 1, length, head_dim, 16);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 4, 1, head_dim, 17, 2.0);
  kvcache::Int8KVCache<float> int8(1, length, 1, head_dim, config);
  kvcache::Int4KVCache<float> int4(1, length, 1, head_dim, config);
  int8.update(k, v);
  int4.update(k, v);
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  AttendOptions parallel;
  parallel.device = &device;
  // The reference reads what the cache holds (dequantized): only the kernel's rounding differs.
  const auto want8 = reference_attention<BHSD>(q, int8.keys(), int8.values(),
                                               iota_positions(length), length - 1, {});
  const auto want4 = reference_attention<BHSD>(q, int4.keys(), int4.values(),
                                               iota_positions(length), length - 1, {});
  const Tensor4<float> got8 = kvcache::attend(q, int8), got4 = kvcache::attend(q, int4);
  REQUIRE(max_abs_diff(got8, want8) < 1e-4);
  REQUIRE(max_abs_diff(got4, want4) < 1e-4);
  REQUIRE(equal(kvcache::attend(q, int8, parallel), got8));
  REQUIRE(equal(kvcache::attend(q, int4, parallel), got4));
}

TEST_CASE("split-K over a sliding window with sinks", "[workspace][split]") {
  // Ring of 4500 + 8 sinks after 9000 tokens: the held positions are the sinks, then two runs
  // of the ring; splits cut across them.
  const Index head_dim = 20, window = 4500, sinks = 8, length = 9000;
  const Tensor4<float> k = random_tensor<float, BSHD>(1, 1, length, head_dim, 18);
  const Tensor4<float> v = random_tensor<float, BSHD>(1, 1, length, head_dim, 19);
  const Tensor4<float> q = random_tensor<float, BSHD>(1, 3, 1, head_dim, 20, 3.0);
  kvcache::SlidingWindowKVCache<float, BSHD> cache(1, window, 1, head_dim, sinks);
  for (Index begin = 0; begin < length; begin += 1000)
    cache.update(slice_seq<BSHD>(k, begin, 1000), slice_seq<BSHD>(v, begin, 1000));
  ReferenceRules rules;
  rules.cache_window = window;
  rules.num_sink_tokens = sinks;
  const auto want = reference_attention<BSHD>(q, k, v, iota_positions(length), length - 1, rules);
  const Tensor4<float> serial = kvcache::attend(q, cache);
  REQUIRE(max_abs_diff(serial, want) < tolerance<float>());
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  AttendOptions parallel;
  parallel.device = &device;
  REQUIRE(equal(kvcache::attend(q, cache, parallel), serial));
}

TEST_CASE("split-K with values near the largest float stays finite and exact",
          "[workspace][split][large_values]") {
  // Each split's value sums fit, their merge overflows (or a split's own sums do): the merge
  // runs again at a scaled value sum, and the result is the weighted mean of the values.
  const Index head_dim = 16, length = 6000;
  const double magnitude = GENERATE(1e37, 3e38);
  CAPTURE(magnitude);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 1, length, head_dim, 21);
  const Tensor4<float> v = random_tensor<float, BHSD>(1, 1, length, head_dim, 22, magnitude);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 2, 1, head_dim, 23);
  kvcache::StaticKVCache<float> cache(1, length, 1, head_dim);
  cache.update(k, v);
  const auto want = reference_attention<BHSD>(q, k, v, iota_positions(length), length - 1, {});
  const Tensor4<float> got = kvcache::attend(q, cache);
  REQUIRE(max_abs_diff(got, want) / magnitude < tolerance<float>());
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  AttendOptions parallel;
  parallel.device = &device;
  REQUIRE(equal(kvcache::attend(q, cache, parallel), got));
}
