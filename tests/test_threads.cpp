// attend() on an Eigen::ThreadPoolDevice gives exactly the serial answer; many threads may
// attend over one cache at once; the layers of a ModelKVCache may each be driven by a thread.
// (These run under ThreadSanitizer in CI: the tsan preset.)
#include "support/catch.hpp"
#include "support/reference.hpp"

#include <thread>
#include <variant>
#include <vector>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::ModelKVCache;
using kvcache::SlidingWindowKVCache;
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

TEST_CASE("each layer of a ModelKVCache may be updated and attended from its own thread",
          "[threads]") {
  using Layer = std::variant<StaticKVCache<float>, SlidingWindowKVCache<float>>;
  const Index num_layers = 4, heads = 2, head_dim = 16, steps = 40;
  auto make = [&](Index layer) -> Layer {
    if (layer % 2 == 1) return SlidingWindowKVCache<float>(1, 8, heads, head_dim, 2);
    return StaticKVCache<float>(1, steps, heads, head_dim);
  };
  std::vector<Tensor4<float>> ks, vs, qs;
  for (Index l = 0; l < num_layers; ++l) {
    ks.push_back(random_tensor<float, BHSD>(1, heads, steps, head_dim, unsigned(10 + 2 * l)));
    vs.push_back(random_tensor<float, BHSD>(1, heads, steps, head_dim, unsigned(11 + 2 * l)));
  }
  for (Index step = 0; step < steps; ++step)
    qs.push_back(random_tensor<float, BHSD>(1, 4 * heads, 1, head_dim, unsigned(100 + step)));
  // Layer l's decode loop: append one token, attend, keep the output.
  auto run_layer = [&](ModelKVCache<Layer>& model, Index l, std::vector<Tensor4<float>>& out) {
    const auto li = static_cast<std::size_t>(l);
    for (Index step = 0; step < steps; ++step) {
      model.update(l, slice_seq<BHSD>(ks[li], step, 1), slice_seq<BHSD>(vs[li], step, 1));
      out.push_back(kvcache::attend(qs[static_cast<std::size_t>(step)], model[l]));
    }
  };
  ModelKVCache<Layer> serial(num_layers, make), threaded(num_layers, make);
  std::vector<std::vector<Tensor4<float>>> want(static_cast<std::size_t>(num_layers)),
      got(static_cast<std::size_t>(num_layers));
  for (Index l = 0; l < num_layers; ++l) run_layer(serial, l, want[static_cast<std::size_t>(l)]);
  // The serial answer is right: layer 0 (a static one) at the last step, against the reference.
  REQUIRE(max_abs_diff(want[0].back(), reference_attention<BHSD>(qs.back(), ks[0], vs[0],
                                                                 iota_positions(steps), steps - 1,
                                                                 {})) < tolerance<float>());
  std::vector<std::thread> threads;
  for (Index l = 0; l < num_layers; ++l)
    threads.emplace_back([&, l] { run_layer(threaded, l, got[static_cast<std::size_t>(l)]); });
  for (auto& t : threads) t.join();
  for (std::size_t l = 0; l < want.size(); ++l)
    for (std::size_t step = 0; step < want[l].size(); ++step) {
      CAPTURE(l, step);
      REQUIRE(equal(got[l][step], want[l][step]));
    }
}
