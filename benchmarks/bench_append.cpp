// kvcache append benchmark: N = 65536 tokens appended one at a time (update of
// [1, 8, 1, 128] fp32 keys and values) into a fresh cache of each kind. An append that does
// not stay O(1) per token (a concatenation per step, a shift of a window, re-quantizing old
// blocks) shows as a second half slower than the first.
//
// Kinds: static (max_seq_len N), dynamic (no reserve: growth by doubling is measured),
// window4096 (SlidingWindowKVCache, window 4096), int8 / int4 (QuantizedKVCache<float>,
// default QuantConfig, max_seq_len N), prefix (PrefixKVCache over a frozen 512-token prefix,
// max_new_tokens N). Names: append/<kind>/N65536.
//
// Each iteration builds a new cache (not timed), then times the appends of tokens [0, N/2)
// and [N/2, N) separately. Counters:
//   first_half_ns, second_half_ns  ns per token (mean over iterations)
//   second_half_ratio              second_half_ns / first_half_ns (target <= 1.3)
//   items_per_second               tokens per second over the whole run
#include "bench_common.hpp"

#include <functional>
#include <string>

namespace {

using kvcache::Index;
using namespace kvcache_bench;

constexpr Index kBatch = 1;
constexpr Index kKVHeads = 8;
constexpr Index kHeadDim = 128;
constexpr Index kTokens = 65536;
constexpr Index kWindow = 4096;
constexpr Index kPrefix = 512;
constexpr Index kPool = 256;  // distinct random tokens, cycled

struct TokenPool {
  TokenPool() : keys(static_cast<std::size_t>(kPool * token)), values(keys.size()) {
    fill_random(keys.data(), keys.size(), 1);
    fill_random(values.data(), values.size(), 2);
  }
  static constexpr Index token = kBatch * kKVHeads * kHeadDim;
  std::vector<float> keys, values;
};

template <class Cache>
void append(benchmark::State& state, const std::function<std::unique_ptr<Cache>()>& make) {
  static const TokenPool pool;
  using Map = Eigen::TensorMap<const Tensor4<float>>;
  double first = 0, second = 0;
  for (auto _ : state) {
    state.PauseTiming();
    std::unique_ptr<Cache> cache = make();
    state.ResumeTiming();
    const auto start = std::chrono::steady_clock::now();
    auto middle = start;
    for (Index i = 0; i < kTokens; ++i) {
      if (i == kTokens / 2) middle = std::chrono::steady_clock::now();
      const Index at = (i % kPool) * TokenPool::token;
      cache->update(Map(pool.keys.data() + at, kBatch, kKVHeads, 1, kHeadDim),
                    Map(pool.values.data() + at, kBatch, kKVHeads, 1, kHeadDim));
    }
    const auto end = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(cache->size());
    first += std::chrono::duration<double, std::nano>(middle - start).count();
    second += std::chrono::duration<double, std::nano>(end - middle).count();
    state.PauseTiming();
    cache.reset();  // freeing 0.5 GiB is not an append
    state.ResumeTiming();
  }
  const double tokens_per_half = static_cast<double>(state.iterations()) * (kTokens / 2);
  state.counters["first_half_ns"] = first / tokens_per_half;
  state.counters["second_half_ns"] = second / tokens_per_half;
  state.counters["second_half_ratio"] = first > 0 ? second / first : 0.0;
  state.SetItemsProcessed(state.iterations() * kTokens);
}

template <class Cache>
void register_kind(const std::string& kind, std::function<std::unique_ptr<Cache>()> make) {
  const std::string name = "append/" + kind + "/N" + std::to_string(kTokens);
  benchmark::RegisterBenchmark(name.c_str(), [make](benchmark::State& state) { append<Cache>(state, make); })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
}

std::shared_ptr<const kvcache::FrozenKVCache<float>> frozen_prefix() {
  static const std::shared_ptr<const kvcache::FrozenKVCache<float>> frozen = [] {
    kvcache::StaticKVCache<float> prompt(kBatch, kPrefix, kKVHeads, kHeadDim);
    prompt.update(random_tensor<float>(kBatch, kKVHeads, kPrefix, kHeadDim, 3),
                  random_tensor<float>(kBatch, kKVHeads, kPrefix, kHeadDim, 4));
    return prompt.freeze();
  }();
  return frozen;
}

}  // namespace

int main(int argc, char** argv) {
  kvcache_bench::take_full_flag(&argc, argv);  // accepted for symmetry; one parameter set
  benchmark::Initialize(&argc, argv);
  kvcache_bench::add_common_context();
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  using namespace kvcache;
  register_kind<StaticKVCache<float>>("static", [] {
    return std::make_unique<StaticKVCache<float>>(kBatch, kTokens, kKVHeads, kHeadDim);
  });
  register_kind<DynamicKVCache<float>>("dynamic", [] {
    return std::make_unique<DynamicKVCache<float>>(kBatch, kKVHeads, kHeadDim);
  });
  register_kind<SlidingWindowKVCache<float>>("window4096", [] {
    return std::make_unique<SlidingWindowKVCache<float>>(kBatch, kWindow, kKVHeads, kHeadDim);
  });
  register_kind<Int8KVCache<float>>("int8", [] {
    return std::make_unique<Int8KVCache<float>>(kBatch, kTokens, kKVHeads, kHeadDim);
  });
  register_kind<Int4KVCache<float>>("int4", [] {
    return std::make_unique<Int4KVCache<float>>(kBatch, kTokens, kKVHeads, kHeadDim);
  });
  register_kind<PrefixKVCache<float>>("prefix", [] {
    return std::make_unique<PrefixKVCache<float>>(frozen_prefix(), kTokens);
  });
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
