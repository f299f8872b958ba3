// kvcache paged-cache benchmarks: the ragged attend against one contiguous cache over the same
// bytes, and a serving workload with continuous batching and a shared system prompt.
//
// paged/ragged_decode/fill<chunk>/bs<block_size>/thr<threads>
//   32 sequences of 4096 tokens in a PagedKVCache<float> (Hkv 8, head_dim 128), filled round
//   robin `chunk` tokens at a time: fill4096 gives each sequence one run of consecutive pool
//   blocks (the pool's own cost, without fragmentation); fill256 is a chunked prefill (each
//   sequence's blocks come in runs of 256 / block_size consecutive pool blocks), fill16 one
//   block at a time (every pool block's neighbours belong to other sequences: a sequence grown
//   by decoding). One
//   step is one ragged attend of 32 decode rows (q_len 1 each, Hq 32). Each iteration also runs
//   one decode step over a DynamicKVCache<float> of 32 x 4096 = 131072 tokens (the same 1 GiB
//   of K/V), alternating with the paged step so both see the same machine. Counters:
//     paged_GBps, dynamic_GBps  K/V bytes read per step / the step's wall time
//     ratio                     paged_GBps / dynamic_GBps (goal >= 0.9)
//
// serving/requests256/prompt1024/bs<block_size>/thr<threads>
//   256 requests: a shared 1024-token system prompt, a question of 64 to 512 tokens and 128
//   generated tokens each; at most 32 at once, a finished request's slot going to the next
//   (continuous batching). A new request calls add_sequence(prompt + question), appends the
//   positions the pool did not hold, and publishes its prompt and question (cache_prefix); its
//   prefill rows share the step's ragged attend with every other request's decode row. One
//   layer of a Llama-3-8B shape (Hkv 8, Hq 32, head_dim 128, fp32): memory scales with layers.
//   K/V and queries are random (no model): the figures are about the cache. One iteration is
//   the whole workload. Counters:
//     kv_MiB_paged       the most K/V memory sequences held at once (blocks held x block bytes)
//     kv_MiB_per_request what DynamicKVCache per request would have held at those moments
//                        (its geometric growth from a prefill of prompt + question)
//     memory_ratio       kv_MiB_per_request / kv_MiB_paged (goal >= 4)
//     waste_pct          positions allocated to sequences but not filled, over the positions
//                        of the blocks they hold, averaged over steps (goal < 2 at bs 16)
//     prefix_hit_pct     positions add_sequence() found cached / positions asked for
//     prefill_saved      prefill positions not computed thanks to the prefix index
//     prompt_prefills    requests that prefilled the system prompt themselves (goal 1)
//     decode_tok_per_s   generated tokens / wall time of the workload
//   With KVCACHE_SERVING_TRACE=DIR, each run also writes DIR/serving_bs<B>_thr<T>.csv, one line
//   per step (active requests, rows, the two memories, waste), which scripts/plot_bench.py
//   --serving turns into a plot.
#include "bench_common.hpp"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace {

using kvcache::Index;
using namespace kvcache_bench;

constexpr Index kKVHeads = 8;
constexpr Index kQueryHeads = 32;
constexpr Index kHeadDim = 128;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// --- ragged decode -----------------------------------------------------------------------------

constexpr Index kSequences = 32;
constexpr Index kLength = 4096;
struct RaggedSetup {
  Index block_size = 0, fill = 0;
  std::unique_ptr<kvcache::PagedKVCache<float>> pool;
  std::unique_ptr<kvcache::DynamicKVCache<float>> dynamic;
  std::vector<kvcache::PagedKVCache<float>::SequenceId> ids;
};

/// One setup at a time (1 GiB each for the pool and the contiguous cache).
RaggedSetup& ragged_setup(Index block_size, Index fill) {
  static RaggedSetup setup;
  if (setup.block_size == block_size && setup.fill == fill) return setup;
  setup = RaggedSetup{};
  const Tensor4<float> k = random_tensor<float>(1, kKVHeads, fill, kHeadDim, 1);
  const Tensor4<float> v = random_tensor<float>(1, kKVHeads, fill, kHeadDim, 2);
  kvcache::PagedConfig config;
  config.num_blocks = kSequences * kLength / block_size;
  config.block_size = block_size;
  config.num_heads = kKVHeads;
  config.head_dim = kHeadDim;
  setup.pool = std::make_unique<kvcache::PagedKVCache<float>>(config);
  for (Index s = 0; s < kSequences; ++s) setup.ids.push_back(setup.pool->add_sequence());
  for (Index filled = 0; filled < kLength; filled += fill)
    for (auto id : setup.ids) setup.pool->update(0, id, k, v);
  setup.dynamic = std::make_unique<kvcache::DynamicKVCache<float>>(1, kKVHeads, kHeadDim,
                                                                   kSequences * kLength);
  for (Index filled = 0; filled < kSequences * kLength; filled += fill)
    setup.dynamic->update(k, v);
  setup.block_size = block_size;
  setup.fill = fill;
  return setup;
}

void ragged_decode(benchmark::State& state, Index block_size, Index fill, int threads) {
  RaggedSetup& setup = ragged_setup(block_size, fill);
  kvcache::AttendOptions options;
  options.device = device_for(threads);
  const Tensor4<float> q = random_tensor<float>(1, kQueryHeads, kSequences, kHeadDim, 3);
  const Tensor4<float> q_one = random_tensor<float>(1, kQueryHeads, 1, kHeadDim, 4);
  Tensor4<float> out(q.dimensions()), out_one(q_one.dimensions());
  kvcache::AttendWorkspace paged_ws, dynamic_ws;
  const std::vector<Index> q_lens(static_cast<std::size_t>(kSequences), 1);
  const double bytes = 2.0 * kSequences * kLength * kKVHeads * kHeadDim * sizeof(float);
  double paged_seconds = 0, dynamic_seconds = 0;
  // One untimed step of each first (workspaces, first touches), so a run of one iteration
  // measures the steady state too.
  kvcache::attend(q, *setup.pool, 0, setup.ids, q_lens, out, paged_ws, options);
  kvcache::attend(q_one, *setup.dynamic, out_one, dynamic_ws, options);
  for (auto _ : state) {
    auto start = std::chrono::steady_clock::now();
    kvcache::attend(q, *setup.pool, 0, setup.ids, q_lens, out, paged_ws, options);
    benchmark::DoNotOptimize(out.data());
    paged_seconds += seconds_since(start);
    start = std::chrono::steady_clock::now();
    kvcache::attend(q_one, *setup.dynamic, out_one, dynamic_ws, options);
    benchmark::DoNotOptimize(out_one.data());
    dynamic_seconds += seconds_since(start);
    benchmark::ClobberMemory();
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["paged_GBps"] = n * bytes / paged_seconds * 1e-9;
  state.counters["dynamic_GBps"] = n * bytes / dynamic_seconds * 1e-9;
  state.counters["ratio"] = dynamic_seconds / paged_seconds;
  state.counters["threads"] = threads;
}

// --- serving workload --------------------------------------------------------------------------

constexpr Index kRequests = 256;
constexpr Index kPromptLength = 1024;
constexpr Index kGenerated = 128;
constexpr Index kBatchSlots = 32;

Index question_length(Index request) { return 64 + (request * 37) % 449; }  // 64 .. 512

/// Capacity of a DynamicKVCache after a prefill of `prefill` positions and `decoded` one-token
/// appends (its growth rule: max(needed, 2 x capacity, 16)).
Index dynamic_capacity(Index prefill, Index decoded) {
  Index capacity = std::max<Index>(prefill, 16);
  for (Index size = prefill + 1; size <= prefill + decoded; ++size)
    if (size > capacity) capacity = std::max<Index>({size, 2 * capacity, 16});
  return capacity;
}

void serving(benchmark::State& state, Index block_size, int threads) {
  using Pool = kvcache::PagedKVCache<float, kvcache::BSHD>;
  using Map = Eigen::TensorMap<const Tensor4<float>>;
  const Index max_length = kPromptLength + 512 + kGenerated;
  // K/V rows to copy from (BSHD: a run of positions is contiguous) and the queries.
  std::vector<float> source(static_cast<std::size_t>(max_length * kKVHeads * kHeadDim));
  fill_random(source.data(), source.size(), 5);
  // The most query rows of one step: the first request's whole prefill, the others' questions.
  const Index max_rows = kPromptLength + kBatchSlots * 512;
  std::vector<float> queries(static_cast<std::size_t>(max_rows * kQueryHeads * kHeadDim));
  fill_random(queries.data(), queries.size(), 6);
  std::vector<float> outputs(queries.size());
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(kPromptLength));
  for (Index i = 0; i < kPromptLength; ++i) prompt[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(1000 + i);
  kvcache::AttendOptions options;
  options.device = device_for(threads);
  const double block_bytes = 2.0 * static_cast<double>(block_size * kKVHeads * kHeadDim) * sizeof(float);

  struct Active {
    Pool::SequenceId id;
    Index request, prefill, generated;
  };
  double peak_paged = 0, peak_dynamic = 0, waste_sum = 0, steps = 0, asked = 0, found = 0,
         seconds = 0, prompt_prefills = 0;
  std::ofstream trace;
  if (const char* dir = std::getenv("KVCACHE_SERVING_TRACE")) {
    trace.open(std::string(dir) + "/serving_bs" + std::to_string(block_size) + "_thr" +
               std::to_string(threads) + ".csv");
    trace << "step,active,rows,paged_MiB,per_request_MiB,waste_pct\n";
  }
  for (auto _ : state) {
    kvcache::PagedConfig config;
    config.num_blocks = 2048 * 16 / block_size;
    config.block_size = block_size;
    config.num_heads = kKVHeads;
    config.head_dim = kHeadDim;
    Pool pool(config);
    kvcache::AttendWorkspace workspace;
    std::vector<Active> active;
    std::vector<Pool::SequenceId> ids;
    std::vector<Index> q_lens;
    Index next_request = 0;
    peak_paged = peak_dynamic = waste_sum = steps = asked = found = 0;
    prompt_prefills = 0;
    const auto start = std::chrono::steady_clock::now();
    while (next_request < kRequests || !active.empty()) {
      ids.clear();
      q_lens.clear();
      // Decode rows of the running requests: one new position each.
      for (Active& a : active) {
        const Index at = pool.size(a.id);
        pool.update(0, a.id, Map(source.data() + at * kKVHeads * kHeadDim, 1, 1, kKVHeads, kHeadDim),
                    Map(source.data() + at * kKVHeads * kHeadDim, 1, 1, kKVHeads, kHeadDim));
        ++a.generated;
        ids.push_back(a.id);
        q_lens.push_back(1);
      }
      // New requests take the free slots: prefill what the pool does not hold.
      while (active.size() < static_cast<std::size_t>(kBatchSlots) && next_request < kRequests) {
        const Index r = next_request++;
        std::vector<std::int32_t> tokens = prompt;
        for (Index i = 0; i < question_length(r); ++i) tokens.push_back(static_cast<std::int32_t>(r * 4096 + i));
        const Pool::Match match = pool.add_sequence(tokens);
        const Index length = static_cast<Index>(tokens.size());
        const Index rows = length - match.cached;
        asked += static_cast<double>(length);
        found += static_cast<double>(match.cached);
        if (match.cached < kPromptLength) ++prompt_prefills;
        const float* from = source.data() + match.cached * kKVHeads * kHeadDim;
        pool.update(0, match.sequence, Map(from, 1, rows, kKVHeads, kHeadDim),
                    Map(from, 1, rows, kKVHeads, kHeadDim));
        pool.cache_prefix(match.sequence, tokens);
        active.push_back(Active{match.sequence, r, length, 0});
        ids.push_back(match.sequence);
        q_lens.push_back(rows);
      }
      Index total_rows = 0;
      for (Index n : q_lens) total_rows += n;
      Map q(queries.data(), 1, total_rows, kQueryHeads, kHeadDim);
      Eigen::TensorMap<Tensor4<float>> out(outputs.data(), 1, total_rows, kQueryHeads, kHeadDim);
      kvcache::attend(q, pool, 0, ids, q_lens, out, workspace, options);
      benchmark::DoNotOptimize(outputs.data());
      // Memory at this step: blocks sequences hold, and what per-request caches would hold.
      const Index held_blocks = pool.num_blocks() - pool.free_blocks() - pool.evictable_blocks();
      double dynamic_positions = 0;
      for (const Active& a : active)
        dynamic_positions += static_cast<double>(dynamic_capacity(a.prefill, a.generated));
      const double per_position = block_bytes / static_cast<double>(block_size);
      peak_paged = std::max(peak_paged, static_cast<double>(held_blocks) * block_bytes);
      peak_dynamic = std::max(peak_dynamic, dynamic_positions * per_position);
      const Index published_only = pool.evictable_blocks();
      const Index used = pool.num_blocks() - pool.free_blocks() - published_only;
      const double waste = used > 0 ? static_cast<double>(pool.wasted_positions()) /
                                          static_cast<double>(used * block_size)
                                    : 0.0;
      if (used > 0) {
        waste_sum += waste;
        steps += 1;
      }
      if (trace.is_open())
        trace << static_cast<Index>(steps) << ',' << active.size() << ',' << total_rows << ','
              << static_cast<double>(held_blocks) * block_bytes / (1024.0 * 1024.0) << ','
              << dynamic_positions * per_position / (1024.0 * 1024.0) << ',' << 100.0 * waste
              << '\n';
      // Finished requests leave; their slots go to the next ones.
      for (std::size_t i = 0; i < active.size();) {
        if (active[i].generated == kGenerated) {
          pool.remove_sequence(active[i].id);
          active[i] = active.back();
          active.pop_back();
        } else {
          ++i;
        }
      }
    }
    seconds = seconds_since(start);
  }
  state.counters["kv_MiB_paged"] = peak_paged / (1024.0 * 1024.0);
  state.counters["kv_MiB_per_request"] = peak_dynamic / (1024.0 * 1024.0);
  state.counters["memory_ratio"] = peak_dynamic / peak_paged;
  state.counters["waste_pct"] = 100.0 * waste_sum / steps;
  state.counters["prefix_hit_pct"] = 100.0 * found / asked;
  state.counters["prefill_saved"] = found;
  state.counters["prompt_prefills"] = prompt_prefills;
  state.counters["decode_tok_per_s"] = static_cast<double>(kRequests * kGenerated) / seconds;
  state.counters["threads"] = threads;
}

void register_all() {
  for (Index fill : {Index(4096), Index(256), Index(16)})
    for (Index bs : {Index(16), Index(32)})
      for (int t : {1, 2}) {
        if (fill < bs) continue;
        const std::string name = "paged/ragged_decode/fill" + std::to_string(fill) + "/bs" +
                                 std::to_string(bs) + "/thr" + std::to_string(t);
        benchmark::RegisterBenchmark(name.c_str(),
                                     [bs, fill, t](benchmark::State& s) { ragged_decode(s, bs, fill, t); })
            ->UseRealTime()
            ->Unit(benchmark::kMillisecond);
      }
  for (Index bs : {Index(16), Index(32)})
    for (int t : {1, 2}) {
      const std::string name = "serving/requests256/prompt1024/bs" + std::to_string(bs) + "/thr" +
                               std::to_string(t);
      benchmark::RegisterBenchmark(name.c_str(), [bs, t](benchmark::State& s) { serving(s, bs, t); })
          ->UseRealTime()
          ->Iterations(1)
          ->Unit(benchmark::kMillisecond);
    }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  kvcache_bench::add_common_context();
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
