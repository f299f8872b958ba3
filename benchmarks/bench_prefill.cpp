// kvcache prefill benchmark: 512 queries x 512 keys, causal, over a StaticKVCache holding the
// 512 tokens (the prompt's own attention), batch 1, Hq 32, Hkv 8, head_dim 128; fp32 and bf16;
// 1 and 2 threads.
//
// Names: prefill/<dtype>/q512/nkv512/thr<threads>.
//
// Counters:
//   FLOPS       dense-equivalent flop rate, 4 * D * Hq * q_len * n_kv / real time (causal
//               masking skips about half of that work, the count does not)
//   GFLOPS      the same in 1e9 flop/s, measured with the loop's wall clock
//   gemm_ratio  GFLOPS / the flop rate of an Eigen float GEMM of the same work, measured once
//               per thread count in this process: per query head, S = Q(512x128) K^T and
//               O = S(512x512) V (dense, no softmax). 1 thread: Eigen::MatrixXf products;
//               2 threads: Eigen::Tensor contractions on the same ThreadPoolDevice.
//   gemm_GFLOPS the reference rate itself
#include "bench_common.hpp"

#include <string>

namespace {

using kvcache::Index;
using namespace kvcache_bench;

constexpr Index kBatch = 1;
constexpr Index kQueryHeads = 32;
constexpr Index kKVHeads = 8;
constexpr Index kHeadDim = 128;
constexpr Index kQueries = 512;
constexpr Index kKeys = 512;

double dense_flops() {
  return 4.0 * static_cast<double>(kHeadDim * kQueryHeads * kQueries * kKeys);
}

/// Seconds of one pass of the reference GEMM work (kQueryHeads x two products).
double gemm_pass(int threads) {
  static Eigen::MatrixXf q = Eigen::MatrixXf::Random(kQueries, kHeadDim);
  static Eigen::MatrixXf k = Eigen::MatrixXf::Random(kKeys, kHeadDim);
  static Eigen::MatrixXf v = Eigen::MatrixXf::Random(kKeys, kHeadDim);
  static Eigen::MatrixXf s(kQueries, kKeys);
  static Eigen::MatrixXf o(kQueries, kHeadDim);
  const auto start = std::chrono::steady_clock::now();
  if (threads <= 1) {
    for (Index h = 0; h < kQueryHeads; ++h) {
      s.noalias() = q * k.transpose();
      o.noalias() = s * v;
      benchmark::DoNotOptimize(o.data());
      benchmark::ClobberMemory();
    }
  } else {
    using Map2 = Eigen::TensorMap<Eigen::Tensor<float, 2>>;
    Map2 tq(q.data(), kQueries, kHeadDim), tk(k.data(), kKeys, kHeadDim),
        tv(v.data(), kKeys, kHeadDim), ts(s.data(), kQueries, kKeys), to(o.data(), kQueries, kHeadDim);
    const Eigen::array<Eigen::IndexPair<int>, 1> qk = {Eigen::IndexPair<int>(1, 1)};
    const Eigen::array<Eigen::IndexPair<int>, 1> sv = {Eigen::IndexPair<int>(1, 0)};
    const Eigen::ThreadPoolDevice& device = *device_for(threads);
    for (Index h = 0; h < kQueryHeads; ++h) {
      ts.device(device) = tq.contract(tk, qk);
      to.device(device) = ts.contract(tv, sv);
      benchmark::DoNotOptimize(o.data());
      benchmark::ClobberMemory();
    }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Flop rate of the reference GEMM work: median of at least 5 passes and 0.3 s, cached.
double gemm_flops_per_second(int threads) {
  static std::map<int, double> measured;
  const auto found = measured.find(threads);
  if (found != measured.end()) return found->second;
  gemm_pass(threads);  // warm-up
  std::vector<double> seconds;
  double total = 0;
  while (seconds.size() < 5 || (total < 0.3 && seconds.size() < 1000)) {
    seconds.push_back(gemm_pass(threads));
    total += seconds.back();
  }
  std::nth_element(seconds.begin(), seconds.begin() + static_cast<std::ptrdiff_t>(seconds.size() / 2),
                   seconds.end());
  const double rate = dense_flops() / seconds[seconds.size() / 2];
  measured.emplace(threads, rate);
  return rate;
}

template <class T>
void prefill(benchmark::State& state, int threads) {
  kvcache::StaticKVCache<T> cache(kBatch, kKeys, kKVHeads, kHeadDim);
  cache.update(random_tensor<T>(kBatch, kKVHeads, kKeys, kHeadDim, 1),
               random_tensor<T>(kBatch, kKVHeads, kKeys, kHeadDim, 2));
  const Tensor4<T> q = random_tensor<T>(kBatch, kQueryHeads, kQueries, kHeadDim, 7);
  kvcache::AttendOptions options;  // causal by default
  options.device = device_for(threads);
  const double gemm_rate = gemm_flops_per_second(threads);

  const LoopTimer timer;
  for (auto _ : state) {
    Tensor4<T> out = kvcache::attend(q, cache, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double seconds = timer.seconds();
  const double flops = dense_flops() * static_cast<double>(state.iterations());
  state.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsRate);
  state.counters["GFLOPS"] = flops / seconds * 1e-9;
  state.counters["gemm_ratio"] = flops / seconds / gemm_rate;
  state.counters["gemm_GFLOPS"] = gemm_rate * 1e-9;
  state.counters["threads"] = threads;
}

template <class T>
void register_dtype() {
  for (int t : {1, 2}) {
    const std::string name = std::string("prefill/") + dtype_name<T>() + "/q" +
                             std::to_string(kQueries) + "/nkv" + std::to_string(kKeys) + "/thr" +
                             std::to_string(t);
    benchmark::RegisterBenchmark(name.c_str(), [t](benchmark::State& state) { prefill<T>(state, t); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  }
}

}  // namespace

int main(int argc, char** argv) {
  kvcache_bench::take_full_flag(&argc, argv);  // accepted for symmetry; one parameter set
  benchmark::Initialize(&argc, argv);
  kvcache_bench::add_common_context();
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_dtype<float>();
  register_dtype<Eigen::bfloat16>();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
