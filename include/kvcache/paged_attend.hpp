// kvcache: attend() over a ragged batch of a PagedKVCache's sequences - prefill chunks and
// decode rows of many sequences in one call, reading the pool's blocks in place.
#ifndef KVCACHE_PAGED_ATTEND_HPP
#define KVCACHE_PAGED_ATTEND_HPP

#include <kvcache/attend.hpp>
#include <kvcache/paged_cache.hpp>

#include <algorithm>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace kvcache {

/// \brief Attention for several sequences of a paged cache in one call (decode and prefill
/// rows mixed), into a caller's output, with a reusable workspace.
///
/// \param q         [1, num_q_heads, sum(q_lens), head_dim] in Layout (Tensor4<T> or a
///                  TensorMap of one): the rows of sequences[0], then those of sequences[1],
///                  ...; num_q_heads a multiple of cache.num_heads() (GQA). The q_lens[i]
///                  rows of sequences[i] are its last q_lens[i] positions appended to `layer`
///                  (row j at position size(sequences[i], layer) - q_lens[i] + j).
/// \param layer     the layer to read, in [0, num_layers()) (else std::out_of_range)
/// \param sequences live sequences (a sequence may appear more than once)
/// \param q_lens    one per entry of sequences, each >= 0
/// \param out       q's shape, written (a Tensor4<T> or a TensorMap of a non-const one)
/// \param workspace grown to what the call needs, never shrunk: a loop that reuses it
///                  allocates nothing after its first call (serial path)
/// \param options   as for every attend(); a key_mask has one row per entry of sequences and
///                  at least as many columns as the longest sequence's size (positions past a
///                  sequence's size are not read)
///
/// Each sequence's rows equal attend() over a DynamicKVCache holding the same positions (bit
/// for bit: the blocks of the kernel fall on the same positions). The work units of every
/// sequence share one pass over the thread pool. Throws std::invalid_argument (naming expected
/// and received values) for an unknown sequence, q_lens that do not fit q or the sequences,
/// a q or out of the wrong shape, a key_mask too small, or the option errors of attend();
/// nothing is written before every check has passed.
template <class Q, class T, class Layout, class Out>
void attend(const Q& q, const PagedKVCache<T, Layout>& cache, Index layer,
            const std::vector<typename PagedKVCache<T, Layout>::SequenceId>& sequences,
            const std::vector<Index>& q_lens, Out&& out, AttendWorkspace& workspace,
            const AttendOptions& options = {}) {
  using Acc = accumulator_t<T>;
  using OutTensor = std::remove_reference_t<Out>;
  const char* where = "attend(paged)";
  detail::check_input_tensor<T, Q>();
  detail::check_input_tensor<T, OutTensor>();
  if constexpr (detail::is_tensor4_v<Q> && detail::is_tensor4_v<OutTensor>) {
    if (layer < 0 || layer >= cache.num_layers())
      throw std::out_of_range(detail::message("kvcache: ", where, ": layer must be in [0, ",
                                              cache.num_layers(), "), got ", layer));
    if (sequences.size() != q_lens.size())
      detail::throw_invalid_argument(where, ": expected one q_len per sequence (",
                                     sequences.size(), "); got ", q_lens.size());
    const detail::ConstView4<T> q_view = detail::view_of(q);
    const Shape qs = Layout::shape(q_view.dims);
    Index total = 0, longest = 0;
    for (std::size_t i = 0; i < sequences.size(); ++i) {
      if (!cache.contains(sequences[i]))
        detail::throw_invalid_argument(where, ": sequences[", i, "] = ", sequences[i],
                                       " is unknown or was removed");
      const Index size = cache.size(sequences[i], layer);
      if (q_lens[i] < 0 || q_lens[i] > size)
        detail::throw_invalid_argument(where, ": q_lens[", i, "] must be in [0, ", size,
                                       "] (the positions sequence ", sequences[i],
                                       " holds in layer ", layer, "), got ", q_lens[i]);
      total += q_lens[i];
      longest = std::max(longest, size);
    }
    if (qs.batch != 1 || qs.heads < 1 || qs.heads % cache.num_heads() != 0 ||
        qs.head_dim != cache.head_dim() || qs.seq != total)
      detail::throw_invalid_argument(
          where, ": expected q of shape ",
          detail::describe_expected<Layout>("1", "a multiple of " + std::to_string(cache.num_heads()),
                                            std::to_string(total) + " (sum of q_lens)",
                                            std::to_string(cache.head_dim())),
          "; got ", detail::describe_dims<Layout>(q_view.dims));
    detail::check_out<Layout>(where, out, q_view.dims);
    const detail::ScoreParams<Acc> score = detail::checked_score<Acc>(where, options, qs.head_dim);
    if (options.key_mask != nullptr) {
      const auto& m = *options.key_mask;
      if (m.dimension(0) < static_cast<Index>(sequences.size()) || m.dimension(1) < longest)
        detail::throw_invalid_argument(where, ": expected key_mask of shape [rows >= ",
                                       sequences.size(), ", columns >= ", longest,
                                       "] (one row per sequence, the longest size); got [",
                                       m.dimension(0), ", ", m.dimension(1), "]");
    }
    if (total == 0) return;

    const Strides strides = Layout::strides(qs);
    // Called for i = 0, 1, ..., n - 1 in order, twice (run_attention_problems): the running
    // offset of the sequence's rows restarts with i = 0.
    Index row_offset = 0;
    auto problem_at = [&](Index i) {
      if (i == 0) row_offset = 0;
      const std::size_t at = static_cast<std::size_t>(i);
      detail::AttentionProblem<T, Acc> problem;
      problem.kv = cache.attention_view(layer, sequences[at]);
      Shape shape = qs;
      shape.seq = q_lens[at];
      problem.q = detail::QueryArgs<T>{q_view.data + row_offset * strides.seq,
                                       out.data() + row_offset * strides.seq, shape, strides,
                                       problem.kv.position - shape.seq};
      row_offset += shape.seq;
      problem.mask.causal = options.causal;
      // Every query sits before position(): a wider window excludes no key (as attend()).
      problem.mask.window = options.window > problem.kv.position ? 0 : options.window;
      if (options.key_mask != nullptr) {
        problem.mask.key_mask = options.key_mask->data() + i * options.key_mask->dimension(1);
        problem.mask.key_mask_row_stride = options.key_mask->dimension(1);
      }
      problem.score = score;
      return problem;
    };
    detail::run_attention_problems<detail::KernelVariant::kFast, false, T, Acc>(
        static_cast<Index>(sequences.size()), detail::ProblemSource<T, Acc>(problem_at),
        options.device, workspace);
  }
}

}  // namespace kvcache

#endif  // KVCACHE_PAGED_ATTEND_HPP
