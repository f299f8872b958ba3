// kvcache decode benchmark: one attend() of a single query token (q_len 1, causal) over a
// filled cache, for every cache kind and element type, 1 and 2 threads.
//
// Shape: batch 1, Hq 32 query heads, Hkv 8 KV heads (GQA 4:1, Llama-3-8B), head_dim 128 or 64
// (static_fp32_1kv: Hq 4, Hkv 1).
// Kinds (the second part of every name):
//   static_fp32, static_bf16, static_fp16  StaticKVCache<float | Eigen::bfloat16 | Eigen::half>
//   int8, int4                             Int8KVCache<float>, Int4KVCache<float> (default
//                                          QuantConfig: group 32, residual 32)
//   window4096_fp32                        SlidingWindowKVCache<float>, window 4096, filled one
//                                          token at a time (n_kv > 4096 shows the bounded cost)
//   prefix_fp32                            PrefixKVCache<float>: n_kv/2 tokens in a frozen
//                                          prefix, n_kv/2 of its own
//   static_fp32_1kv                        StaticKVCache<float> with ONE KV head (4 query
//                                          heads): one work item, so threads need split-K
//
// Each step is attend(q, cache, out, workspace, options): the output and the workspace are
// reused, as in an engine's decode loop, so no step allocates.
//
// Names: decode/<kind>/D<head_dim>/nkv<n_kv>/thr<threads>, e.g.
//   --benchmark_filter='decode/(static_fp32|int8)/D128/nkv16384/'
//
// Parameter sets:
//   default (reduced): D128 x n_kv {1024, 4096, 16384} and D64 x n_kv 16384; threads {1, 2}
//   --full (or KVCACHE_BENCH_FULL=1): D {64, 128} x n_kv {512, 1024, ..., 65536} (powers of 2);
//                     threads {1, 2}. Slow with the scalar kernel (a 65536-token fp32 step reads
//                     512 MiB); narrow it with --benchmark_filter.
//
// Counters of every benchmark (see bench_common.hpp):
//   bytes_per_second  K/V bytes a step reads (attention_view: T segments, quantized codes +
//                     scales + zeros + unquantized tail, the shared prefix) / real time
//   GBps              the same in 1e9 bytes/s, measured with the loop's wall clock
//   roofline          GBps / read bandwidth of a plain vectorised sum over as many
//                     bytes with as many threads, measured in this process (read_GBps):
//                     the hot ratio when the cache fits in L2/L3
//   roofline_dram     GBps / read bandwidth of a buffer four times the last-level cache and
//                     at least 256 MiB (dram_GBps; the header's kvcache_dram_probe_MiB) with
//                     as many threads: the ratio to the memory bus. A cache larger than the
//                     LLC streams from DRAM, and then both ratios agree; a smaller one (int4 at
//                     16384: 20 MiB) is read hot.
//   fastest_ms        the fastest step of the timing loop
//   roofline_dram_fastest  (K/V bytes / fastest step) / the fastest of 16 DRAM probe passes
//                     read right after the loop: the bus ratio from each side's least
//                     disturbed run, steadier on a noisy machine
// The header names the kernel variant (kvcache_kernel_isa; KVCACHE_ISA=scalar|avx2|avx512).
//   kv_MiB, n_kv, threads
//
// decode_layers/<kind>/D128/nkv16384/thr<threads> (kinds static_fp32, static_bf16, static_fp16,
// int8, int4; --full adds nkv65536): one decode step of a model, L layers of that kind and shape
// (each its own cache, a copy of one filled layer) attended in turn with one workspace, as an
// engine's step goes. L is the fewest layers whose K/V bytes reach the DRAM probe's size (four
// times the last-level cache, at least 256 MiB), so every layer streams from DRAM however much
// of one layer the LLC would keep between steps: on a CPU with a large L3 (300 MiB on one Xeon
// here) a single 16K-token layer of 20-128 MiB is read partly from it, and its ratios mix the
// two. Its counters are the ones above for the whole step (kv_MiB all layers; roofline is
// roofline_dram), plus
//   layers             L
//   layer_ms           the mean time of one layer's attend (step time / L)
//   fastest_layer_ms   the fastest step / L
// Each runs for at least 3 s (a step reads 1-2 GiB), so the fastest is of several steps.
#include "bench_common.hpp"

#include <functional>
#include <string>
#include <vector>

namespace {

using kvcache::Index;
using namespace kvcache_bench;

constexpr Index kBatch = 1;
constexpr Index kQueryHeads = 32;
constexpr Index kKVHeads = 8;
constexpr Index kWindow = 4096;

// One filled cache is kept between benchmarks (the 1- and 2-thread runs of a configuration
// are registered next to each other and share it); a new key frees the previous one first.
template <class Cache>
std::shared_ptr<Cache> cached_cache(const std::string& key,
                                    const std::function<std::shared_ptr<Cache>()>& build) {
  static std::string held_key;
  static std::shared_ptr<void> held;
  if (held_key != key || !held) {
    held.reset();
    held = build();
    held_key = key;
  }
  return std::static_pointer_cast<Cache>(held);
}

template <class T>
std::shared_ptr<kvcache::StaticKVCache<T>> build_static(Index n, Index d,
                                                        Index kv_heads = kKVHeads) {
  auto cache = std::make_shared<kvcache::StaticKVCache<T>>(kBatch, n, kv_heads, d);
  cache->update(random_tensor<T>(kBatch, kv_heads, n, d, 1),
                random_tensor<T>(kBatch, kv_heads, n, d, 2));
  return cache;
}

template <int Bits>
std::shared_ptr<kvcache::QuantizedKVCache<float, Bits>> build_quantized(Index n, Index d) {
  auto cache = std::make_shared<kvcache::QuantizedKVCache<float, Bits>>(kBatch, n, kKVHeads, d);
  cache->update(random_tensor<float>(kBatch, kKVHeads, n, d, 1),
                random_tensor<float>(kBatch, kKVHeads, n, d, 2));
  return cache;
}

// One token per update: a longer chunk would grow the ring past the window.
std::shared_ptr<kvcache::SlidingWindowKVCache<float>> build_window(Index n, Index d) {
  auto cache = std::make_shared<kvcache::SlidingWindowKVCache<float>>(kBatch, kWindow, kKVHeads, d);
  constexpr Index kPool = 256;
  const Index token = kBatch * kKVHeads * d;
  std::vector<float> keys(static_cast<std::size_t>(kPool * token));
  std::vector<float> values(keys.size());
  fill_random(keys.data(), keys.size(), 1);
  fill_random(values.data(), values.size(), 2);
  using Map = Eigen::TensorMap<const Tensor4<float>>;
  for (Index i = 0; i < n; ++i) {
    const Index at = (i % kPool) * token;
    cache->update(Map(keys.data() + at, kBatch, kKVHeads, 1, d),
                  Map(values.data() + at, kBatch, kKVHeads, 1, d));
  }
  return cache;
}

std::shared_ptr<kvcache::PrefixKVCache<float>> build_prefix(Index n, Index d) {
  const Index prefix_len = n / 2, own = n - prefix_len;
  std::shared_ptr<const kvcache::FrozenKVCache<float>> frozen = build_static<float>(prefix_len, d)->freeze();
  auto cache = std::make_shared<kvcache::PrefixKVCache<float>>(frozen, own);
  cache->update(random_tensor<float>(kBatch, kKVHeads, own, d, 3),
                random_tensor<float>(kBatch, kKVHeads, own, d, 4));
  return cache;
}

// The decode loop of an engine: one output and one workspace for every step, no allocation. A
// step attends each of `layers` in turn: one cache (decode) or a model's L (decode_layers).
// Returns the loop's seconds; `fastest` holds its fastest step.
template <class Cache>
double decode_steps(benchmark::State& state, const std::vector<const Cache*>& layers, Index d,
                    int threads, FastestStep& fastest) {
  using T = typename Cache::element_type;
  // GQA 4:1 whatever the cache's KV heads (8, or 1 for the split-K case).
  const Tensor4<T> q =
      random_tensor<T>(kBatch, kQueryHeads / kKVHeads * layers.front()->num_heads(), 1, d, 7);
  kvcache::AttendOptions options;
  options.device = device_for(threads);
  Tensor4<T> out(q.dimensions());
  kvcache::AttendWorkspace workspace;
  const LoopTimer timer;
  for (auto _ : state) {
    fastest.start();
    for (const Cache* layer : layers) {
      kvcache::attend(q, *layer, out, workspace, options);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
    fastest.stop();
  }
  return timer.seconds();
}

template <class Cache>
void decode(benchmark::State& state, const std::string& key,
            const std::function<std::shared_ptr<Cache>()>& build, Index n_kv, Index d,
            int threads) {
  const std::shared_ptr<Cache> cache = cached_cache<Cache>(key, build);
  const std::size_t bytes = kv_bytes_read(*cache);
  const double read_bw = read_bandwidth(bytes, threads);  // cached per (bytes, threads)
  FastestStep fastest;
  const double seconds = decode_steps<Cache>(state, {cache.get()}, d, threads, fastest);
  report_decode_counters(state, bytes, read_bw, n_kv, threads, seconds, fastest);
}

// One decode step over L layers (the header: decode_layers).
template <class Cache>
void decode_layers(benchmark::State& state, const std::function<std::shared_ptr<Cache>()>& build,
                   Index n_kv, Index d, int threads) {
  std::vector<Cache> layers;
  std::size_t layer_bytes = 0;
  {
    const std::shared_ptr<Cache> first = build();
    layer_bytes = kv_bytes_read(*first);
    const std::size_t count =
        std::max<std::size_t>(2, (dram_probe_bytes() + layer_bytes - 1) / layer_bytes);
    layers.reserve(count);
    for (std::size_t i = 0; i < count; ++i) layers.push_back(*first);
  }
  std::vector<const Cache*> step;
  for (const Cache& layer : layers) step.push_back(&layer);
  FastestStep fastest;
  const double seconds = decode_steps<Cache>(state, step, d, threads, fastest);
  const auto count = static_cast<double>(layers.size());
  // The whole step streams from DRAM: its "hot" read is the DRAM probe's.
  report_decode_counters(state, layer_bytes * layers.size(), dram_read_bandwidth(threads), n_kv,
                         threads, seconds, fastest);
  state.counters["layers"] = count;
  state.counters["layer_ms"] = seconds / static_cast<double>(state.iterations()) / count * 1e3;
  state.counters["fastest_layer_ms"] = fastest.seconds() / count * 1e3;
}

// kind/D<d>/nkv<n>: a configuration's name, and the key of its filled cache (cached_cache).
std::string decode_key(const std::string& kind, Index d, Index n) {
  return kind + "/D" + std::to_string(d) + "/nkv" + std::to_string(n);
}

// Registers prefix + key/thr<t> for each thread count (key from decode_key), running
// body(state, t); min_time 0 keeps Google Benchmark's default.
void register_decode(const std::string& prefix, const std::string& key,
                     const std::vector<int>& threads, double min_time,
                     const std::function<void(benchmark::State&, int)>& body) {
  for (int t : threads) {
    const std::string name = prefix + key + "/thr" + std::to_string(t);
    auto* bench = benchmark::RegisterBenchmark(
        name.c_str(), [body, t](benchmark::State& state) { body(state, t); });
    bench->UseRealTime()->Unit(benchmark::kMillisecond);
    if (min_time > 0) bench->MinTime(min_time);
  }
}

// Calls visit(kind, build) for the five kinds a model's layers come in, build making one
// filled layer of n tokens (a std::function returning a shared_ptr to the cache type).
template <class Visit>
void for_each_layer_kind(Index d, Index n, Visit&& visit) {
  using kvcache::StaticKVCache;
  visit("static_fp32", std::function<std::shared_ptr<StaticKVCache<float>>()>(
                           [n, d] { return build_static<float>(n, d); }));
  visit("static_bf16", std::function<std::shared_ptr<StaticKVCache<Eigen::bfloat16>>()>(
                           [n, d] { return build_static<Eigen::bfloat16>(n, d); }));
  visit("static_fp16", std::function<std::shared_ptr<StaticKVCache<Eigen::half>>()>(
                           [n, d] { return build_static<Eigen::half>(n, d); }));
  visit("int8", std::function<std::shared_ptr<kvcache::Int8KVCache<float>>()>(
                    [n, d] { return build_quantized<8>(n, d); }));
  visit("int4", std::function<std::shared_ptr<kvcache::Int4KVCache<float>>()>(
                    [n, d] { return build_quantized<4>(n, d); }));
}

void register_all(bool full) {
  std::vector<std::pair<Index, Index>> configs;  // (head_dim, n_kv)
  if (full) {
    for (Index d : {Index(128), Index(64)})
      for (Index n = 512; n <= 65536; n *= 2) configs.emplace_back(d, n);
  } else {
    for (Index n : {Index(1024), Index(4096), Index(16384)}) configs.emplace_back(128, n);
    configs.emplace_back(64, 16384);
  }
  const std::vector<int> threads = {1, 2};
  for (const auto& [d, n] : configs) {
    // One cache attended again and again (the header: decode).
    auto single = [&, d = d, n = n](const std::string& kind, auto build) {
      using Cache = typename decltype(build())::element_type;
      const std::string key = decode_key(kind, d, n);
      register_decode("decode/", key, threads, 0,
                      [key, build, n, d](benchmark::State& state, int t) {
                        decode<Cache>(state, key, build, n, d, t);
                      });
    };
    for_each_layer_kind(d, n, single);
    single("window4096_fp32",
           std::function<std::shared_ptr<kvcache::SlidingWindowKVCache<float>>()>(
               [n = n, d = d] { return build_window(n, d); }));
    single("prefix_fp32", std::function<std::shared_ptr<kvcache::PrefixKVCache<float>>()>(
                              [n = n, d = d] { return build_prefix(n, d); }));
    single("static_fp32_1kv",
           std::function<std::shared_ptr<kvcache::StaticKVCache<float>>()>(
               [n = n, d = d] { return build_static<float>(n, d, 1); }));
  }
  std::vector<Index> model_lengths = {16384};
  if (full) model_lengths.push_back(65536);
  static constexpr Index kModelHeadDim = 128;  // Llama-3-8B's
  for (Index n : model_lengths)
    for_each_layer_kind(kModelHeadDim, n, [&](const std::string& kind, auto build) {
      using Cache = typename decltype(build())::element_type;
      // A step is 0.1-0.5 s: at least 3 s gives a handful of steps for fastest_layer_ms.
      register_decode("decode_layers/", decode_key(kind, kModelHeadDim, n), threads, 3.0,
                      [build, n](benchmark::State& state, int t) {
                        decode_layers<Cache>(state, build, n, kModelHeadDim, t);
                      });
    });
}

}  // namespace

int main(int argc, char** argv) {
  const bool full = kvcache_bench::take_full_flag(&argc, argv);
  benchmark::Initialize(&argc, argv);
  kvcache_bench::add_common_context();
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("kvcache_param_set", full ? "full" : "default");
  register_all(full);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
