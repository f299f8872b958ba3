// attend() on an Eigen::ThreadPoolDevice gives exactly the serial answer.
#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::StaticKVCache;

TEMPLATE_TEST_CASE("the thread pool gives the serial answer, bit for bit", "[threads]",
                   (Case<float, BHSD>), (Case<float, BSHD>), (Case<Eigen::bfloat16, BHSD>),
                   (Case<double, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const int threads = GENERATE(1, 2, 3);
  const Index batch = GENERATE(1, 3);
  const Index kv_heads = GENERATE(1, 4);
  const Index q_len = GENERATE(1, 100);
  CAPTURE(threads, batch, kv_heads, q_len);
  Eigen::ThreadPool pool(threads);
  Eigen::ThreadPoolDevice device(&pool, threads);

  const Index kv_len = 300, head_dim = 32;
  StaticKVCache<T, L> cache(batch, kv_len, kv_heads, head_dim);
  cache.update(random_tensor<T, L>(batch, kv_heads, kv_len, head_dim, 1),
               random_tensor<T, L>(batch, kv_heads, kv_len, head_dim, 2));
  const Tensor4<T> q = random_tensor<T, L>(batch, 4 * kv_heads, q_len, head_dim, 3);
  Mask mask(batch, kv_len);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = i % 7 != 0;

  AttendOptions serial;
  serial.key_mask = &mask;
  serial.window = 50;
  AttendOptions parallel = serial;
  parallel.device = &device;
  const Tensor4<T> a = kvcache::attend(q, cache, serial);
  const Tensor4<T> b = kvcache::attend(q, cache, parallel);
  REQUIRE(equal(a, b));
  const auto want = reference_attention<L>(q, cache.keys(), cache.values(), iota_positions(kv_len),
                                           kv_len - q_len, rules_from(serial));
  REQUIRE(max_abs_diff(b, want) < tolerance<T>());
}

TEST_CASE("many threads may attend over one cache at once", "[threads]") {
  StaticKVCache<float> cache(1, 500, 2, 16);
  cache.update(random_tensor<float, BHSD>(1, 2, 500, 16, 4),
               random_tensor<float, BHSD>(1, 2, 500, 16, 5));
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 8, 1, 16, 6);
  const Tensor4<float> expected = kvcache::attend(q, cache);
  std::vector<std::thread> readers;
  std::vector<int> ok(4, 0);
  for (std::size_t i = 0; i < ok.size(); ++i)
    readers.emplace_back([&, i] {
      int good = 1;
      for (int round = 0; round < 20; ++round) good &= equal(kvcache::attend(q, cache), expected);
      ok[i] = good;
    });
  for (auto& t : readers) t.join();
  for (int good : ok) REQUIRE(good == 1);
}
