// kvcache: how attend() runs - the work units of a call (batch row x KV head x query chunk,
// and splits of a long sequence), where their scratch lives in an AttendWorkspace, which
// compiled variant computes them, and the merge of split states. The arithmetic is elsewhere:
// detail/kernel/variants.hpp (the compiled variants), detail/kernel/reference.hpp (the twin).
#ifndef KVCACHE_DETAIL_KERNEL_SCHEDULE_HPP
#define KVCACHE_DETAIL_KERNEL_SCHEDULE_HPP

#include <kvcache/attend_workspace.hpp>
#include <kvcache/detail/kernel/reference.hpp>
#include <kvcache/detail/kernel/unit.hpp>
#include <kvcache/detail/kernel/variants.hpp>
#include <kvcache/kernel_isa.hpp>

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <type_traits>

namespace kvcache {
namespace detail {

/// Which kernel attend_view runs: kFast, the compiled variant kernel_isa() names; kReference,
/// the scalar twin (detail/kernel/reference.hpp), for the tests to compare with.
enum class KernelVariant { kFast, kReference };

/// Split-K: a work item whose cache is long is cut into splits of the held positions, each a
/// unit of its own, and their softmax states merged in split order. The number of splits
/// depends only on the shapes (never on the device), so the serial path and any thread pool
/// compute the same units and give the same bits.
/// Units aimed at: enough for a pool to balance when there are few items (batch 1, few KV
/// heads, one query token).
inline constexpr Index kTargetUnits = 16;
/// Shortest split: below it, the merge and the partial states cost more than they save.
inline constexpr Index kMinSplitLength = 2048;

/// How a call is cut into work units, and where their scratch lives in an AttendWorkspace.
struct AttentionPlan {
  Index rep = 1, chunk = 1, num_chunks = 0, num_items = 0;
  Index splits = 1, split_length = 0;
  Index max_rows = 0;       ///< rows of the largest unit
  std::size_t slot_bytes = 0;     ///< scratch of one thread running units
  std::size_t partial_bytes = 0;  ///< per unit, when splits > 1: states, scale, accumulators

  Index num_units() const { return num_items * splits; }
};

inline std::size_t round_up_to_line(std::size_t bytes) {
  return (bytes + kCacheLine - 1) / kCacheLine * kCacheLine;
}

template <class T, class Acc>
AttentionPlan plan_attention(const QueryArgs<T>& q, const KVView<T>& kv) {
  AttentionPlan plan;
  plan.rep = q.shape.heads / kv.num_heads;
  plan.chunk = std::max<Index>(1, kRowsPerItem / plan.rep);
  plan.num_chunks = (q.shape.seq + plan.chunk - 1) / plan.chunk;
  plan.num_items = q.shape.batch * kv.num_heads * plan.num_chunks;
  plan.max_rows = plan.rep * std::min(plan.chunk, q.shape.seq);

  const Index held = kv.held_length();
  plan.split_length = held;
  if (plan.num_items > 0 && plan.num_items < kTargetUnits && held >= 2 * kMinSplitLength) {
    const Index wanted = std::min(kTargetUnits / plan.num_items, held / kMinSplitLength);
    // Cuts fall on key blocks and on quantized blocks.
    Index align = kKeyBlock;
    if (kv.quantized.num_blocks > 0) align = std::lcm(kKeyBlock, kv.quantized.group_size);
    const Index length = ((held + wanted - 1) / wanted + align - 1) / align * align;
    plan.splits = (held + length - 1) / length;
    plan.split_length = length;
  }
  const Index elements = unit_scratch_elements(plan.max_rows, q.shape.head_dim, kv.quantized);
  plan.slot_bytes = round_up_to_line(sizeof(SoftmaxState<Acc>) * count(plan.max_rows)) +
                    round_up_to_line(sizeof(Acc) * count(elements));
  plan.partial_bytes = round_up_to_line(sizeof(Acc) * count(plan.max_rows) *
                                        count(PartialState<Acc>::elements(q.shape.head_dim)));
  return plan;
}

/// Whether every accumulator of num_rows states is finite.
template <class Acc>
bool accumulators_finite(const SoftmaxState<Acc>* states, Index num_rows, Index head_dim) {
  for (Index row = 0; row < num_rows; ++row)
    for (Index c = 0; c < head_dim; ++c)
      if (!(Eigen::numext::isfinite)(states[row].acc[c])) return false;
  return true;
}

/// One attention problem: query rows over one cache's view, with its masking and score rules.
/// A plain attend() is one problem; the ragged attend of a paged cache is one per sequence.
template <class T, class Acc>
struct AttentionProblem {
  QueryArgs<T> q;
  KVView<T> kv;
  MaskRules mask;
  ScoreParams<Acc> score;
};

/// What builds problem i of a call: a reference to any callable taking an Index and returning
/// an AttentionProblem<T, Acc> (it must outlive the call), with one type for every caller. So
/// run_attention_problems is one function per element type, which a compiled-kernels build
/// compiles once, in src/kernels.cpp (docs/kernel.md, "Compiled kernels").
template <class T, class Acc>
class ProblemSource {
 public:
  template <class BuildProblem>
  explicit ProblemSource(const BuildProblem&& build) = delete;  // would dangle
  template <class BuildProblem>
  explicit ProblemSource(const BuildProblem& build)
      : build_(&build), call_([](const void* callable, Index i) {
          return (*static_cast<const BuildProblem*>(callable))(i);
        }) {}

  AttentionProblem<T, Acc> operator()(Index i) const { return call_(build_, i); }

 private:
  const void* build_;
  AttentionProblem<T, Acc> (*call_)(const void*, Index);
};

/// Where the problems of a call and their plans live at the front of the workspace, and where
/// each problem's units and partial states start.
template <class T, class Acc>
struct ProblemEntry {
  AttentionProblem<T, Acc> problem;
  AttentionPlan plan;
  Index first_unit;            ///< global index of the problem's unit 0
  std::size_t partial_offset;  ///< bytes from the partials' start to the problem's first
};

/// Runs attention for every problem of a call: every (batch row, KV head, chunk of query
/// positions) and, for long caches with few such items, every split of the positions; on
/// `device` when given. problem_at(i) builds problem i of num_problems (it is called twice per
/// problem: once to size the workspace, once to fill it). Scratch comes from `workspace`
/// (grown if needed; nothing else is allocated on the serial path). Every unit is computed
/// the same way whatever thread runs it and whatever other problems share the call, and splits
/// merge in order, so a problem's result depends neither on the device nor on the batch.
template <KernelVariant Variant, bool QuantizedBlocks, class T, class Acc>
void run_attention_problems(Index num_problems, ProblemSource<T, Acc> problem_at,
                            const Eigen::ThreadPoolDevice* device, AttendWorkspace& workspace) {
  using Entry = ProblemEntry<T, Acc>;
  // Pass 1: the plans, for the workspace's size.
  Index total_units = 0;
  std::size_t slot_bytes = 0, partial_bytes = 0;
  for (Index i = 0; i < num_problems; ++i) {
    const AttentionProblem<T, Acc> problem = problem_at(i);
    const AttentionPlan plan = plan_attention<T, Acc>(problem.q, problem.kv);
    total_units += plan.num_units();
    slot_bytes = std::max(slot_bytes, plan.slot_bytes);
    if (plan.splits > 1) partial_bytes += static_cast<std::size_t>(plan.num_units()) * plan.partial_bytes;
  }
  if (total_units == 0) return;
  // Scratch slots: one per thread that may run units at once (pool threads and the caller).
  const Index slots =
      device != nullptr && device->numThreads() > 1 && total_units > 1 ? device->numThreads() + 1 : 1;
  const std::size_t entries_bytes = round_up_to_line(sizeof(Entry) * count(num_problems));
  workspace.reserve(entries_bytes + static_cast<std::size_t>(slots) * slot_bytes + partial_bytes);
  unsigned char* const base = workspace.data();
  Entry* const entries = reinterpret_cast<Entry*>(base);
  unsigned char* const slot_base = base + entries_bytes;
  unsigned char* const partials = slot_base + static_cast<std::size_t>(slots) * slot_bytes;

  // Pass 2: the problems and plans, in the workspace (trivially copyable).
  static_assert(std::is_trivially_copyable_v<Entry>, "kvcache: workspace entries are raw bytes");
  {
    Index first_unit = 0;
    std::size_t partial_offset = 0;
    for (Index i = 0; i < num_problems; ++i) {
      Entry entry{problem_at(i), AttentionPlan{}, first_unit, partial_offset};
      entry.plan = plan_attention<T, Acc>(entry.problem.q, entry.problem.kv);
      first_unit += entry.plan.num_units();
      if (entry.plan.splits > 1)
        partial_offset += static_cast<std::size_t>(entry.plan.num_units()) * entry.plan.partial_bytes;
      std::memcpy(static_cast<void*>(entries + i), &entry, sizeof(Entry));
    }
  }
  // (Only the reference variant instantiates the twin.)
  UnitFunction<T, Acc> attend_unit = nullptr;
  if constexpr (Variant == KernelVariant::kReference)
    attend_unit = &reference::attend_unit<T, Acc>;
  else
    attend_unit = unit_function<T, Acc, QuantizedBlocks>(selected_isa());

  struct Item {
    Index batch_idx, kv_head_idx, q_begin, q_end, num_rows;
  };
  auto item_at = [](const Entry& e, Index item) {
    const AttentionPlan& plan = e.plan;
    const Index num_heads = e.problem.kv.num_heads;
    const Index chunk_idx = item % plan.num_chunks;
    const Index kv_head_idx = (item / plan.num_chunks) % num_heads;
    const Index batch_idx = item / (plan.num_chunks * num_heads);
    const Index q_begin = chunk_idx * plan.chunk;
    const Index q_end = std::min(e.problem.q.shape.seq, q_begin + plan.chunk);
    return Item{batch_idx, kv_head_idx, q_begin, q_end, plan.rep * (q_end - q_begin)};
  };
  // Query row `row` of item `it` gets acc / sum of its state (value sums scaled as given).
  auto write_row = [](const Entry& e, const Item& it, Index row, const SoftmaxState<Acc>& state,
                      Acc value_scale) {
    const QueryArgs<T>& q = e.problem.q;
    const Index rows_per_head = it.q_end - it.q_begin;
    const Index head = it.kv_head_idx * e.plan.rep + row / rows_per_head;
    state.finish(q.out + q.row_offset(it.batch_idx, head, it.q_begin + row % rows_per_head),
                 q.shape.head_dim, value_scale);
  };
  // The problem a global unit belongs to: the first whose units end after it (problems of no
  // units, a sequence with no query rows, end where they begin and are skipped).
  auto entry_of = [&](Index unit) -> const Entry& {
    Index low = 0, high = num_problems - 1;
    while (low < high) {
      const Index mid = (low + high) / 2;
      if (entries[mid].first_unit + entries[mid].plan.num_units() > unit)
        high = mid;
      else
        low = mid + 1;
    }
    return entries[low];
  };

  auto run_units = [&](Index first, Index last) {
    // The slot of this thread: pool threads 0 .. n-1 take slots 1 .. n, the caller slot 0.
    const Index slot = slots > 1 ? device->currentThreadId() + 1 : 0;
    unsigned char* const mine = slot_base + static_cast<std::size_t>(slot) * slot_bytes;
    for (Index unit = first; unit < last; ++unit) {
      const Entry& e = entry_of(unit);
      const AttentionPlan& plan = e.plan;
      const Index local = unit - e.first_unit;
      auto* const states = reinterpret_cast<SoftmaxState<Acc>*>(mine);
      std::uninitialized_default_construct_n(states, plan.max_rows);
      const UnitScratch<Acc> scratch{
          states, reinterpret_cast<Acc*>(mine + round_up_to_line(sizeof(SoftmaxState<Acc>) *
                                                                 count(plan.max_rows)))};
      const Item it = item_at(e, local / plan.splits);
      const Index split = local % plan.splits;
      const KVView<T> part = plan.splits == 1 ? e.problem.kv
                                              : e.problem.kv.clipped(split * plan.split_length,
                                                                     (split + 1) * plan.split_length);
      ScoreParams<Acc> unit_score = e.problem.score;
      attend_unit(e.problem.q, part, e.problem.mask, unit_score, it.batch_idx, it.kv_head_idx,
                  it.q_begin, it.q_end, scratch);
      // Value sums beyond Acc's range (|v| near its maximum): once more with scaled weights.
      if (!accumulators_finite(scratch.states, it.num_rows, e.problem.q.shape.head_dim)) {
        unit_score.value_scale = overflow_value_scale<Acc>();
        attend_unit(e.problem.q, part, e.problem.mask, unit_score, it.batch_idx, it.kv_head_idx,
                    it.q_begin, it.q_end, scratch);
      }
      if (plan.splits == 1) {
        for (Index row = 0; row < it.num_rows; ++row)
          write_row(e, it, row, scratch.states[row], unit_score.value_scale);
      } else {
        Acc* const saved = reinterpret_cast<Acc*>(partials + e.partial_offset +
                                                  static_cast<std::size_t>(local) * plan.partial_bytes);
        const Index head_dim = e.problem.q.shape.head_dim;
        for (Index row = 0; row < it.num_rows; ++row)
          PartialState<Acc>::save(scratch.states[row], unit_score.value_scale, head_dim,
                                  saved + row * PartialState<Acc>::elements(head_dim));
      }
    }
  };

  if (slots == 1) {
    run_units(0, total_units);
  } else {
    // Cost per unit: the K/V bytes it reads and the flops it does (of the first problem's
    // plan: a hint for Eigen's block size, not a promise), so Eigen splits finely.
    const AttentionPlan& plan = entries[0].plan;
    const Index head_dim = entries[0].problem.q.shape.head_dim;
    const double length = static_cast<double>(plan.split_length);
    const double bytes = 2.0 * length * static_cast<double>(head_dim * Index(sizeof(T)));
    const double flops =
        4.0 * static_cast<double>(plan.max_rows) * length * static_cast<double>(head_dim);
    device->parallelFor(total_units, Eigen::TensorOpCost(bytes, 0, flops), run_units);
  }
  if (partial_bytes == 0) return;

  // Merge each item's splits in order (split 0 absorbs the others) and write its rows. Splits
  // are brought to the smallest value scale among them (exact powers of two); if the merged
  // sums overflow at scale 1, the merge runs again at overflow_value_scale().
  for (Index i = 0; i < num_problems; ++i) {
    const Entry& e = entries[i];
    const AttentionPlan& plan = e.plan;
    if (plan.splits == 1) continue;
    const Index head_dim = e.problem.q.shape.head_dim;
    SoftmaxState<Acc>* const states = reinterpret_cast<SoftmaxState<Acc>*>(slot_base);
    std::uninitialized_default_construct_n(states, plan.max_rows);
    Acc* const merged = reinterpret_cast<Acc*>(
        slot_base + round_up_to_line(sizeof(SoftmaxState<Acc>) * count(plan.max_rows)));  // (row, head_dim)
    Acc* const rescaled = merged + plan.max_rows * head_dim;                             // (head_dim)
    const Index part_stride = static_cast<Index>(plan.partial_bytes / sizeof(Acc));
    for (Index item = 0; item < plan.num_items; ++item) {
      const Item it = item_at(e, item);
      for (Index row = 0; row < it.num_rows; ++row) {
        // Split s of this row: parts + s * part_stride.
        const Acc* const parts =
            reinterpret_cast<const Acc*>(partials + e.partial_offset +
                                         static_cast<std::size_t>(item * plan.splits) *
                                             plan.partial_bytes) +
            row * PartialState<Acc>::elements(head_dim);
        Acc target_scale = Acc(1);
        for (Index split = 0; split < plan.splits; ++split)
          target_scale =
              std::min(target_scale, PartialState<Acc>(parts + split * part_stride).value_scale());
        SoftmaxState<Acc>& state = states[row];
        state.acc = merged + row * head_dim;
        PartialState<Acc>::merge(parts, part_stride, plan.splits, head_dim, target_scale, state,
                                 rescaled);
        if (target_scale == Acc(1) && !accumulators_finite(&state, 1, head_dim)) {
          target_scale = overflow_value_scale<Acc>();
          PartialState<Acc>::merge(parts, part_stride, plan.splits, head_dim, target_scale, state,
                                   rescaled);
        }
        write_row(e, it, row, state, target_scale);
      }
    }
  }
}

/// run_attention_problems for one problem: attention of q over one cache's view.
template <KernelVariant Variant = KernelVariant::kFast, bool QuantizedBlocks = true, class T,
          class Acc>
void run_attention(const QueryArgs<T>& q, const KVView<T>& kv, const MaskRules& mask,
                   const ScoreParams<Acc>& score, const Eigen::ThreadPoolDevice* device,
                   AttendWorkspace& workspace) {
  const auto the_problem = [&](Index) { return AttentionProblem<T, Acc>{q, kv, mask, score}; };
  run_attention_problems<Variant, QuantizedBlocks, T, Acc>(
      1, ProblemSource<T, Acc>(the_problem), device, workspace);
}

#if defined(KVCACHE_COMPILED_KERNELS) && !defined(KVCACHE_DEFINE_KERNELS)
// The schedule is compiled once with the kernel variants (src/kernels.cpp, through the branch
// below); the other translation units only call it. The reference variant stays in the headers.
extern template void run_attention_problems<KernelVariant::kFast, false, float, float>(
    Index, ProblemSource<float, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
extern template void run_attention_problems<KernelVariant::kFast, true, float, float>(
    Index, ProblemSource<float, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
extern template void run_attention_problems<KernelVariant::kFast, false, double, double>(
    Index, ProblemSource<double, double>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
extern template void run_attention_problems<KernelVariant::kFast, true, double, double>(
    Index, ProblemSource<double, double>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
extern template void run_attention_problems<KernelVariant::kFast, false, Eigen::half, float>(
    Index, ProblemSource<Eigen::half, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
extern template void run_attention_problems<KernelVariant::kFast, true, Eigen::half, float>(
    Index, ProblemSource<Eigen::half, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
extern template void run_attention_problems<KernelVariant::kFast, false, Eigen::bfloat16, float>(
    Index, ProblemSource<Eigen::bfloat16, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
extern template void run_attention_problems<KernelVariant::kFast, true, Eigen::bfloat16, float>(
    Index, ProblemSource<Eigen::bfloat16, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
#endif
#if defined(KVCACHE_DEFINE_KERNELS)
// The definitions the KVCACHE_COMPILED_KERNELS translation units call (variants.hpp has the
// variants').
template void run_attention_problems<KernelVariant::kFast, false, float, float>(
    Index, ProblemSource<float, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
template void run_attention_problems<KernelVariant::kFast, true, float, float>(
    Index, ProblemSource<float, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
template void run_attention_problems<KernelVariant::kFast, false, double, double>(
    Index, ProblemSource<double, double>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
template void run_attention_problems<KernelVariant::kFast, true, double, double>(
    Index, ProblemSource<double, double>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
template void run_attention_problems<KernelVariant::kFast, false, Eigen::half, float>(
    Index, ProblemSource<Eigen::half, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
template void run_attention_problems<KernelVariant::kFast, true, Eigen::half, float>(
    Index, ProblemSource<Eigen::half, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
template void run_attention_problems<KernelVariant::kFast, false, Eigen::bfloat16, float>(
    Index, ProblemSource<Eigen::bfloat16, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
template void run_attention_problems<KernelVariant::kFast, true, Eigen::bfloat16, float>(
    Index, ProblemSource<Eigen::bfloat16, float>, const Eigen::ThreadPoolDevice*, AttendWorkspace&);
#endif

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KERNEL_SCHEDULE_HPP
