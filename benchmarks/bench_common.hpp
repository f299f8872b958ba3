// kvcache benchmarks: helpers shared by the bench_*.cpp suites.
//
//  * deterministic random fills (fixed seeds, splitmix64: fast enough for 512 MiB caches);
//  * the read-bandwidth probe: a plain vectorised sum over a float buffer of a given size,
//    measured in the same binary and run as the benchmark that uses it, cached per (bytes,
//    threads), so a "roofline" ratio survives a noisy, shared machine;
//  * the bytes a decode step reads from a cache (what its attention_view() covers);
//  * thread pools (Eigen::ThreadPoolDevice) by thread count;
//  * the suites' own flags (--full) and the counters every decode benchmark reports.
#ifndef KVCACHE_BENCH_COMMON_HPP
#define KVCACHE_BENCH_COMMON_HPP

#include <kvcache/kvcache.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace kvcache_bench {

using kvcache::Index;
template <class T>
using Tensor4 = kvcache::Tensor4<T>;

// ---------------------------------------------------------------------------------------------
// Element type names (benchmark names and plot labels).

template <class T>
const char* dtype_name();
template <>
inline const char* dtype_name<float>() { return "fp32"; }
template <>
inline const char* dtype_name<Eigen::bfloat16>() { return "bf16"; }
template <>
inline const char* dtype_name<Eigen::half>() { return "fp16"; }
template <>
inline const char* dtype_name<double>() { return "fp64"; }

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers.

/// splitmix64: a fixed seed gives the same sequence on every machine and run.
class Random {
 public:
  explicit Random(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [-1, 1).
  float uniform() {
    return static_cast<float>(static_cast<double>(next() >> 40) * (2.0 / 16777216.0) - 1.0);
  }

 private:
  std::uint64_t state_;
};

/// Fills n elements with uniform numbers in [-amplitude, amplitude), fixed seed.
template <class T>
void fill_random(T* data, std::size_t n, std::uint64_t seed, float amplitude = 1.0f) {
  Random rng(seed);
  for (std::size_t i = 0; i < n; ++i) data[i] = static_cast<T>(amplitude * rng.uniform());
}

/// A random BHSD tensor (batch, heads, seq, head_dim), fixed seed.
template <class T>
Tensor4<T> random_tensor(Index batch, Index heads, Index seq, Index head_dim,
                         std::uint64_t seed) {
  Tensor4<T> t(batch, heads, seq, head_dim);
  fill_random(t.data(), static_cast<std::size_t>(t.size()), seed);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Thread pools: one Eigen::ThreadPool per thread count, alive for the whole run.

/// nullptr for 1 thread (the serial path), else a ThreadPoolDevice over a pool of `threads`.
inline const Eigen::ThreadPoolDevice* device_for(int threads) {
  if (threads <= 1) return nullptr;
  struct Pool {
    explicit Pool(int n) : pool(n), device(&pool, n) {}
    Eigen::ThreadPool pool;
    Eigen::ThreadPoolDevice device;
  };
  static std::map<int, std::unique_ptr<Pool>> pools;
  auto& slot = pools[threads];
  if (!slot) slot = std::make_unique<Pool>(threads);
  return &slot->device;
}

// ---------------------------------------------------------------------------------------------
// The read-bandwidth probe.

namespace detail {

/// Sum of n floats with eight independent 8-lane accumulators (GCC/Clang vector extensions:
/// vectorised whatever -march says, no -ffast-math needed, and the loads cannot be elided
/// since the result is passed to benchmark::DoNotOptimize). Compiled for AVX-512, AVX2 and the
/// baseline, the CPU picking one at load time (g++'s target_clones), so the probe reads as fast
/// as the widest loads this CPU has, like the kernel it is compared with.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
inline float vector_sum(const float* data, std::size_t n) {
  typedef float v8f __attribute__((vector_size(32)));
  constexpr std::size_t kLanes = 8, kUnroll = 8, kStep = kLanes * kUnroll;
  v8f acc[kUnroll] = {};
  const std::size_t full = n - n % kStep;
  for (std::size_t i = 0; i < full; i += kStep) {
    for (std::size_t u = 0; u < kUnroll; ++u) {
      v8f x;
      std::memcpy(&x, data + i + u * kLanes, sizeof(x));  // an unaligned vector load
      acc[u] += x;
    }
  }
  v8f total = acc[0];
  for (std::size_t u = 1; u < kUnroll; ++u) total += acc[u];
  float sum = 0;
  for (std::size_t l = 0; l < kLanes; ++l) sum += total[l];
  for (std::size_t i = full; i < n; ++i) sum += data[i];
  return sum;
}

/// One timed pass: `reps` sums over the buffer, split in `threads` contiguous slices
/// (threads > 1: on the same Eigen pool the benchmarks use). Returns seconds.
inline double timed_read(const float* data, std::size_t n, int threads, int reps) {
  const auto start = std::chrono::steady_clock::now();
  if (threads <= 1) {
    for (int r = 0; r < reps; ++r) {
      float s = vector_sum(data, n);
      benchmark::DoNotOptimize(s);
      benchmark::ClobberMemory();
    }
  } else {
    const Eigen::ThreadPoolDevice* device = device_for(threads);
    std::vector<float> partial(static_cast<std::size_t>(threads));
    Eigen::Barrier barrier(static_cast<unsigned>(threads));
    const std::size_t slice = (n / static_cast<std::size_t>(threads) + 63) / 64 * 64;
    for (int t = 0; t < threads; ++t) {
      device->enqueueNoNotification([&, t] {
        const std::size_t begin = std::min(n, static_cast<std::size_t>(t) * slice);
        const std::size_t end = std::min(n, begin + slice);
        float sum = 0;
        for (int r = 0; r < reps; ++r) {
          sum += vector_sum(data + begin, end - begin);
          benchmark::ClobberMemory();
        }
        partial[static_cast<std::size_t>(t)] = sum;
        barrier.Notify();
      });
    }
    barrier.Wait();
    benchmark::DoNotOptimize(partial.data());
  }
  benchmark::ClobberMemory();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace detail

/// A read probe: a plain vectorised read of a buffer of `bytes` bytes (so it sits in L2/L3 when
/// a cache of that size does, and streams from DRAM when the cache does) with some number of
/// threads. Each pass reads about 64 MiB, so thread dispatch does not dominate: a buffer smaller
/// than that is re-read until it has read 64 MiB (as a decode loop re-reads a small cache); a
/// larger one is cut into equal windows of at least 64 MiB and a pass reads the next window,
/// so the buffer is read in order and, when it is far larger than the last-level cache, no
/// window is still in cache when its turn comes again. The buffer is a KVBuffer, like the
/// caches' storage (aligned, on huge pages where the system gives them), so the probe reads
/// memory on the same terms.
class ReadProbe {
 public:
  explicit ReadProbe(std::size_t bytes)
      : buffer_(std::max<std::size_t>(bytes / sizeof(float), 64)),
        windows_(std::max<std::size_t>(1, buffer_.size() / kPassFloats)),
        window_(buffer_.size() / windows_),
        reps_(windows_ > 1 ? 1 : static_cast<int>((kPassFloats + buffer_.size() - 1) / buffer_.size())) {
    fill_random(buffer_.data(), buffer_.size(), /*seed=*/12345);
  }

  /// Seconds of the next pass with `threads` threads.
  double pass(int threads) {
    const float* start = buffer_.data() + next_ * window_;
    next_ = (next_ + 1) % windows_;
    return detail::timed_read(start, window_, threads, reps_);
  }
  /// Bytes one pass reads.
  double pass_bytes() const { return static_cast<double>(reps_) * static_cast<double>(window_ * sizeof(float)); }
  /// Passes in one sweep of the buffer.
  std::size_t windows() const { return windows_; }

 private:
  static constexpr std::size_t kPassFloats = (std::size_t(64) << 20) / sizeof(float);
  kvcache::detail::KVBuffer<float> buffer_;
  std::size_t windows_, window_;
  int reps_;
  std::size_t next_ = 0;
};

/// Bytes per second of a probe's median pass with `threads` threads: one warm-up sweep (page
/// faults, caches, clocks), then at least 7 passes, at least one sweep and at least 0.2 s.
inline double measure_read(ReadProbe& probe, int threads) {
  for (std::size_t i = 0; i < probe.windows(); ++i) probe.pass(threads);
  std::vector<double> seconds;
  double total = 0;
  while (seconds.size() < std::max<std::size_t>(7, probe.windows()) ||
         (total < 0.2 && seconds.size() < 1000)) {
    seconds.push_back(probe.pass(threads));
    total += seconds.back();
  }
  const auto middle = seconds.begin() + static_cast<std::ptrdiff_t>(seconds.size() / 2);
  std::nth_element(seconds.begin(), middle, seconds.end());
  return probe.pass_bytes() / *middle;
}

/// Bytes per second of a plain vectorised read of `bytes` bytes with `threads` threads
/// (measure_read of a ReadProbe of that size), once per (bytes, threads) per process, then
/// cached; the probe's buffer is freed.
inline double read_bandwidth(std::size_t bytes, int threads = 1) {
  static std::map<std::pair<std::size_t, int>, double> measured;
  const auto key = std::make_pair(bytes, threads);
  const auto found = measured.find(key);
  if (found != measured.end()) return found->second;
  ReadProbe probe(bytes);
  const double bandwidth = measure_read(probe, threads);
  measured.emplace(key, bandwidth);
  return bandwidth;
}

/// Bytes of the last-level cache as the OS reports it (Linux: the largest
/// /sys/devices/system/cpu/cpu0/cache/index*/size; 0 where it says nothing).
inline std::size_t last_level_cache_bytes() {
  std::size_t largest = 0;
  for (int index = 0; index < 8; ++index) {
    std::ifstream file("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size");
    std::size_t amount = 0;
    std::string unit;
    if (!(file >> amount)) continue;
    file >> unit;  // "K", "M" or nothing (sysfs writes "32768K")
    const std::size_t scale = unit == "K" ? (std::size_t(1) << 10) : unit == "M" ? (std::size_t(1) << 20) : 1;
    largest = std::max(largest, amount * scale);
  }
  return largest;
}

/// Bytes of the buffer of the DRAM probe: four times this machine's last-level cache, and at
/// least 256 MiB (eight times the 32 MiB L3 of a Zen 5 CCD; a Xeon's L3 can hold 300 MiB,
/// where a fixed 256 MiB would be read from cache), so no pass finds it in any cache.
inline std::size_t dram_probe_bytes() {
  static const std::size_t bytes = std::max(std::size_t(256) << 20, 4 * last_level_cache_bytes());
  return bytes;
}

/// The DRAM probe: a ReadProbe over a buffer far larger than the last-level cache
/// (dram_probe_bytes()), one per process, kept so that a benchmark can read it again right
/// after its timing loop.
inline ReadProbe& dram_probe() {
  static ReadProbe probe(dram_probe_bytes());
  return probe;
}

/// Bytes per second of a plain vectorised read of the DRAM probe with `threads` threads: the
/// memory bus (measure_read, once per thread count per process). read_bandwidth(bytes) is the
/// read of a cache's own size, which sits in L2/L3 when the cache does.
inline double dram_read_bandwidth(int threads = 1) {
  static std::map<int, double> measured;
  const auto found = measured.find(threads);
  if (found != measured.end()) return found->second;
  const double bandwidth = measure_read(dram_probe(), threads);
  measured.emplace(threads, bandwidth);
  return bandwidth;
}

/// Bytes per second of the fastest of `passes` passes of the DRAM probe with `threads` threads,
/// measured now: a shared machine's bus moves by tens of percent over minutes (other tenants),
/// so a benchmark's fastest step is compared with the bus as it was right after its loop,
/// not as it was when the process started.
inline double dram_fastest_now(int threads, int passes = 16) {
  ReadProbe& probe = dram_probe();
  double fastest = std::numeric_limits<double>::infinity();
  for (int i = 0; i < passes; ++i) fastest = std::min(fastest, probe.pass(threads));
  return probe.pass_bytes() / fastest;
}

/// The context lines every benchmark binary prints in its header: the kernel variant attend()
/// runs (kvcache::kernel_isa(), KVCACHE_ISA caps it) and the DRAM probe's size.
inline void add_common_context() {
  benchmark::AddCustomContext("kvcache_kernel_isa", kvcache::kernel_isa());
  benchmark::AddCustomContext("kvcache_dram_probe_MiB", std::to_string(dram_probe_bytes() >> 20));
}

// ---------------------------------------------------------------------------------------------
// Bytes a decode step reads.

/// The K/V bytes attend() reads for one step over `cache`: every position of its
/// attention_view() - T segments (keys and values) plus quantized blocks (codes, scales and
/// zeros) - for every batch row and KV head. For a quantized cache that is codes + scales +
/// unquantized tail of the held tokens; for a prefix cache it includes the shared prefix; for
/// a sliding window only what the ring holds.
template <class Cache>
std::size_t kv_bytes_read(const Cache& cache) {
  using T = typename Cache::element_type;
  const auto view = cache.attention_view();
  const auto rows = static_cast<std::size_t>(view.batch_size * view.num_heads);
  std::size_t per_row = 0;
  for (int s = 0; s < view.num_segments; ++s)
    per_row += static_cast<std::size_t>(view.segments[static_cast<std::size_t>(s)].length) * 2 *
               static_cast<std::size_t>(view.head_dim) * sizeof(T);
  per_row += static_cast<std::size_t>(view.quantized.num_blocks) *
             static_cast<std::size_t>(view.quantized.bytes_per_block);
  return rows * per_row;
}

// ---------------------------------------------------------------------------------------------
// Counters.

/// Wall-clock seconds of a benchmark's timing loop (start it right before `for (auto _ :
/// state)`, read it right after): ratios computed from it are plain counters, not "/s" rates.
class LoopTimer {
 public:
  LoopTimer() : start_(std::chrono::steady_clock::now()) {}
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }

 private:
  std::chrono::steady_clock::time_point start_;
};

/// The fastest step of a benchmark's timing loop: call start() right before the step and
/// stop() right after it (two clock reads, tens of nanoseconds against a step of 0.1 ms or
/// more). On a shared machine a step that nothing else disturbed is the steadiest figure.
class FastestStep {
 public:
  void start() { start_ = std::chrono::steady_clock::now(); }
  void stop() {
    fastest_ = std::min(fastest_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
  double seconds() const { return fastest_; }

 private:
  std::chrono::steady_clock::time_point start_;
  double fastest_ = std::numeric_limits<double>::infinity();
};

/// After the timing loop of a decode benchmark: bytes/s (SetBytesProcessed with the K/V bytes
/// read per step), "roofline" = (bytes/s) / (read bandwidth of as many bytes with as many
/// threads: hot when the cache fits in L2/L3), "roofline_dram" = (bytes/s) / (read bandwidth of
/// a buffer far larger than the last-level cache with as many threads: the bus), both from
/// the loop's mean step and the probes' median pass; "fastest_ms" (the fastest step) and
/// "roofline_dram_fastest" = (bytes / fastest step) / (the fastest of 16 DRAM probe passes read
/// right after the loop, dram_fastest_now): the same ratio from each side's least disturbed
/// run at the same time, which a noisy machine moves far less; plus the plain numbers the plot
/// script needs. Benchmarks must UseRealTime().
/// `loop_seconds`: wall time of the whole timing loop (LoopTimer).
inline void report_decode_counters(benchmark::State& state, std::size_t bytes_per_step,
                                   double read_bytes_per_second, Index n_kv, int threads,
                                   double loop_seconds, const FastestStep& fastest) {
  const auto iterations = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes_per_step) * state.iterations());
  const double bytes_per_second = iterations * static_cast<double>(bytes_per_step) / loop_seconds;
  const double dram_median = dram_read_bandwidth(threads);
  state.counters["roofline"] = bytes_per_second / read_bytes_per_second;
  state.counters["roofline_dram"] = bytes_per_second / dram_median;
  state.counters["fastest_ms"] = fastest.seconds() * 1e3;
  state.counters["roofline_dram_fastest"] =
      static_cast<double>(bytes_per_step) / fastest.seconds() / dram_fastest_now(threads);
  state.counters["GBps"] = bytes_per_second * 1e-9;
  state.counters["read_GBps"] = read_bytes_per_second * 1e-9;
  state.counters["dram_GBps"] = dram_median * 1e-9;
  state.counters["kv_MiB"] = static_cast<double>(bytes_per_step) / (1024.0 * 1024.0);
  state.counters["n_kv"] = static_cast<double>(n_kv);
  state.counters["threads"] = threads;
}

// ---------------------------------------------------------------------------------------------
// Suite flags.

/// Removes --full (and honours KVCACHE_BENCH_FULL=1) before benchmark::Initialize sees argv:
/// true selects the documented full parameter set instead of the reduced default one.
inline bool take_full_flag(int* argc, char** argv) {
  bool full = false;
  if (const char* env = std::getenv("KVCACHE_BENCH_FULL")) full = std::string(env) == "1";
  int out = 1;
  for (int i = 1; i < *argc; ++i) {
    if (std::strcmp(argv[i], "--full") == 0)
      full = true;
    else
      argv[out++] = argv[i];
  }
  *argc = out;
  argv[out] = nullptr;
  return full;
}

}  // namespace kvcache_bench

#endif  // KVCACHE_BENCH_COMMON_HPP
