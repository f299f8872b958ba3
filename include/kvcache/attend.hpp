// kvcache: attend() - masked scaled-dot-product attention over a cache, in place.
#ifndef KVCACHE_ATTEND_HPP
#define KVCACHE_ATTEND_HPP

#include <kvcache/attend_options.hpp>
#include <kvcache/attend_workspace.hpp>
#include <kvcache/cache_concept.hpp>
#include <kvcache/detail/kernel/schedule.hpp>
#include <kvcache/errors.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

namespace kvcache {
namespace detail {

/// Checks the caller's output of the allocation-free attend(): writable (else compilation
/// stops with one message) and of q's shape (else std::invalid_argument naming both).
template <class Layout, class Out>
void check_out(const char* where, const Out& out, const std::array<Index, 4>& q_dims) {
  static_assert(!std::is_const_v<typename Out::Scalar> && !std::is_const_v<Out>,
                "kvcache: attend's out must be writable (a Tensor4 or a TensorMap of a "
                "non-const Tensor4)");
  const auto out_dims = out.dimensions();
  const std::array<Index, 4> out_shape{out_dims[0], out_dims[1], out_dims[2], out_dims[3]};
  if (out_shape != q_dims)
    throw_invalid_argument(where, ": expected out of q's shape ", describe_dims<Layout>(q_dims),
                           "; got ", describe_dims<Layout>(out_shape));
}

/// Checks the options every attend() reads the same way (window, softcap, scale) and returns
/// the score parameters: scale (default 1 / sqrt(head_dim)) and softcap.
template <class Acc>
ScoreParams<Acc> checked_score(const char* where, const AttendOptions& options, Index head_dim) {
  if (options.window < 0)
    throw_invalid_argument(where, ": window must be >= 0 (0: none), got ", options.window);
  if (!(options.softcap >= 0) || !std::isfinite(options.softcap))
    throw_invalid_argument(where, ": softcap must be finite and >= 0 (0: none), got ",
                           options.softcap);
  if (options.scale && !std::isfinite(*options.scale))
    throw_invalid_argument(where, ": scale must be finite, got ", *options.scale);
  ScoreParams<Acc> score;
  score.scale = options.scale ? static_cast<Acc>(*options.scale)
                              : Acc(1) / std::sqrt(static_cast<Acc>(head_dim));
  score.softcap = static_cast<Acc>(options.softcap);
  return score;
}

/// Checks q and the options against a cache's view, then runs the kernel into `out`
/// (q's shape, already allocated). Every check runs before any output is written.
/// QuantizedBlocks: whether the view may hold quantized blocks (holds_quantized_blocks of the
/// cache); the kernel's quantized path is compiled only then.
template <class Layout, KernelVariant Variant = KernelVariant::kFast, bool QuantizedBlocks = true,
          class T>
void attend_view(const char* where, const ConstView4<T>& q, const KVView<T>& kv,
                 const AttendOptions& options, T* out, AttendWorkspace& workspace) {
  using Acc = accumulator_t<T>;
  if (!QuantizedBlocks && kv.quantized.num_blocks > 0)
    throw std::logic_error(std::string(where) +
                           ": the cache's view holds quantized blocks but its type does not "
                           "declare quantized_blocks = true (kvcache/cache_concept.hpp)");
  const Shape qs = Layout::shape(q.dims);
  if (qs.batch < 1 || qs.batch > kv.batch_size || qs.heads < 1 || qs.heads % kv.num_heads != 0 ||
      qs.head_dim != kv.head_dim || qs.seq < 0)
    throw_invalid_argument(
        where, ": expected q of shape ",
        describe_expected<Layout>("1.." + std::to_string(kv.batch_size),
                                  "a multiple of " + std::to_string(kv.num_heads), "q_len",
                                  std::to_string(kv.head_dim)),
        "; got ", describe_dims<Layout>(q.dims));
  const ScoreParams<Acc> score = checked_score<Acc>(where, options, qs.head_dim);

  MaskRules mask;
  mask.causal = options.causal;
  mask.window = combine_windows(options.window, kv.window);
  mask.num_sink_tokens = kv.num_sink_tokens;
  // The queries are the last q_len tokens appended; with positional rules they need positions.
  if ((mask.causal || mask.window > 0) && qs.seq > kv.position)
    throw_invalid_argument(where, ": q_len ", qs.seq, " exceeds the ", kv.position,
                           " positions appended; causal or windowed queries are the last q_len "
                           "tokens appended");
  // Every query sits before position(): a window wider than position() excludes no key. As
  // none, it also keeps t - window out of reach of Index overflow (window near its maximum).
  if (mask.window > kv.position) mask.window = 0;
  if (options.key_mask != nullptr) {
    const auto& m = *options.key_mask;
    if (m.dimension(0) < qs.batch || m.dimension(1) != kv.position)
      throw_invalid_argument(where, ": expected key_mask of shape [rows >= ", qs.batch, ", ",
                             kv.position, "] (batch rows, position()); got [", m.dimension(0),
                             ", ", m.dimension(1), "]");
    mask.key_mask = m.data();
    mask.key_mask_row_stride = m.dimension(1);
  }
  // A sliding-window cache has evicted [num_sink_tokens, first_held_position): the first query
  // row's window (t - window, t] must not reach into it (later rows' windows start later).
  if (qs.seq > 0 && kv.first_held_position > kv.num_sink_tokens) {
    const Index first_query = kv.position - qs.seq;
    const Index needed_from = mask.window > 0 ? first_query - mask.window + 1 : 0;
    if (std::max(needed_from, kv.num_sink_tokens) < kv.first_held_position)
      throw_invalid_argument(
          where, ": q_len ", qs.seq, " puts the first query at position ", first_query,
          ", whose window of ", mask.window, " needs keys from position ", needed_from,
          ", but positions [", kv.num_sink_tokens, ", ", kv.first_held_position,
          ") are no longer held; expected q_len <= ",
          mask.window > 0 ? std::max<Index>(0, kv.position - kv.first_held_position -
                                                   mask.window + 1)
                          : Index(0));
  }
  if (qs.seq == 0) return;

  QueryArgs<T> args{q.data, out, qs, Layout::strides(qs), kv.position - qs.seq};
  run_attention<Variant, QuantizedBlocks>(args, kv, mask, score, options.device, workspace);
}

}  // namespace detail

/// \brief Scaled-dot-product attention of q over a cache's held positions, reading the cache
/// in place (one pass, online softmax, K/V heads never copied or expanded).
///
/// \param q       (b <= cache.batch_size(), num_q_heads, q_len, head_dim) in the cache's
///                layout; num_q_heads a multiple of cache.num_heads(): query head h reads KV
///                head h / (num_q_heads / num_heads). The queries are the last q_len tokens
///                appended (row i at absolute position position() - q_len + i).
/// \param cache   any kvcache cache
/// \param options masking, scale, softcap, thread pool: see AttendOptions
/// \return        q's shape; scores scale * q . k, softmax with the natural exponent,
///                accumulated in float (double for double). Fully masked rows are zeros.
///
/// Throws std::invalid_argument, naming expected and received shapes, for a q or key_mask
/// that does not fit the cache, a negative window or softcap, or causal/windowed queries
/// longer than the positions appended.
///
/// A q that is not a Tensor4<T> (or a TensorMap of one) of the cache's T, or a cache that is not
/// one (cache_concept.hpp), stops compilation with one static_assert naming what is expected.
template <class Q, class Cache, std::enable_if_t<is_kv_cache_v<Cache>, int> = 0>
Tensor4<typename Cache::element_type> attend(const Q& q, const Cache& cache,
                                             const AttendOptions& options = {}) {
  using T = typename Cache::element_type;
  detail::check_input_tensor<T, Q>();
  Tensor4<T> out;
  if constexpr (detail::is_tensor4_v<Q>) {  // else the check above has stopped compilation
    const detail::ConstView4<T> q_view = detail::view_of(q);
    out.resize(q_view.dims);
    AttendWorkspace workspace;
    detail::attend_view<typename Cache::layout_type, detail::KernelVariant::kFast,
                        holds_quantized_blocks_v<Cache>>("attend", q_view, cache.attention_view(),
                                                         options, out.data(), workspace);
  }
  return out;
}

/// \brief attend() into a caller's output, with a reusable workspace: a decode loop that keeps
/// `out` and `workspace` across steps does not touch the heap after its first step (the
/// serial path; a thread pool's own scheduling may allocate).
///
/// \param out       a Tensor4<T> or a TensorMap of one (not const), with q's shape: it is
///                  written, never resized. Must not overlap q or the cache.
/// \param workspace grown to what the call needs, never shrunk (AttendWorkspace)
///
/// Same checks, results (bit for bit) and exceptions as attend(q, cache, options), plus
/// std::invalid_argument when out's shape is not q's. Nothing is written before every
/// check has passed.
template <class Q, class Cache, class Out, std::enable_if_t<is_kv_cache_v<Cache>, int> = 0>
void attend(const Q& q, const Cache& cache, Out&& out, AttendWorkspace& workspace,
            const AttendOptions& options = {}) {
  using T = typename Cache::element_type;
  using OutTensor = std::remove_reference_t<Out>;
  detail::check_input_tensor<T, Q>();
  detail::check_input_tensor<T, OutTensor>();
  if constexpr (detail::is_tensor4_v<Q> && detail::is_tensor4_v<OutTensor>) {
    const detail::ConstView4<T> q_view = detail::view_of(q);
    detail::check_out<typename Cache::layout_type>("attend", out, q_view.dims);
    detail::attend_view<typename Cache::layout_type, detail::KernelVariant::kFast,
                        holds_quantized_blocks_v<Cache>>("attend", q_view, cache.attention_view(),
                                                         options, out.data(), workspace);
  }
}

/// \brief attend() over a layer that holds one of several cache kinds (a std::variant, as in a
/// mixed ModelKVCache): attends over the active alternative. Same contract as the cache
/// overload; every alternative must have the same element type.
template <class Q, class... Caches,
          std::enable_if_t<(is_kv_cache_v<Caches> && ...), int> = 0>
auto attend(const Q& q, const std::variant<Caches...>& cache, const AttendOptions& options = {}) {
  return std::visit([&](const auto& alternative) { return attend(q, alternative, options); },
                    cache);
}

namespace detail {

/// attend() computed by the kernel's scalar reference twin (KernelVariant::kReference): the
/// same checks and segments, one key and one query row at a time. For tests.
template <class Q, class Cache>
Tensor4<typename Cache::element_type> attend_with_reference_kernel(
    const Q& q, const Cache& cache, const AttendOptions& options = {}) {
  using T = typename Cache::element_type;
  check_input_tensor<T, Q>();
  const ConstView4<T> q_view = view_of(q);
  Tensor4<T> out(q_view.dims);
  AttendWorkspace workspace;
  attend_view<typename Cache::layout_type, KernelVariant::kReference>(
      "attend", q_view, cache.attention_view(), options, out.data(), workspace);
  return out;
}

}  // namespace detail

/// \brief Attention over explicit k, v tensors: key positions 0 .. k_len - 1, query row i at
/// k_len - q_len + i. Same rules and guarantees as the cache overload.
///
/// \tparam Layout BHSD (default) or BSHD, the layout of q, k, v and the result
/// \param k, v    (batch, num_kv_heads, k_len, head_dim), the same shape; q's batch <= batch
template <class Layout = BHSD, class Q, class K, class V,
          std::enable_if_t<detail::is_tensor4_v<Q> && detail::is_tensor4_v<K> &&
                               detail::is_tensor4_v<V>,
                           int> = 0>
Tensor4<detail::tensor4_element_t<Q>> attend(const Q& q, const K& k, const V& v,
                                             const AttendOptions& options = {}) {
  static_assert(is_layout_v<Layout>, "kvcache: the layout must be kvcache::BHSD or kvcache::BSHD");
  using T = detail::tensor4_element_t<Q>;
  static_assert(is_kv_element_v<T>,
                "kvcache: the element type must be float, double, Eigen::half or Eigen::bfloat16");
  detail::check_input_tensor<T, K>();
  detail::check_input_tensor<T, V>();
  const detail::ConstView4<T> q_view = detail::view_of(q);
  const detail::ConstView4<T> k_view = detail::view_of(k);
  const detail::ConstView4<T> v_view = detail::view_of(v);
  if (k_view.dims != v_view.dims)
    detail::throw_invalid_argument(
        "attend: k and v must have the same shape: expected v of k's shape ",
        detail::describe_dims<Layout>(k_view.dims), "; got ",
        detail::describe_dims<Layout>(v_view.dims));
  const Shape ks = Layout::shape(k_view.dims);
  detail::KVView<T> kv;
  kv.batch_size = ks.batch;
  kv.num_heads = ks.heads;
  kv.head_dim = ks.head_dim;
  kv.position = ks.seq;
  if (ks.batch < 1 || ks.heads < 1 || ks.head_dim < 1)
    detail::throw_invalid_argument("attend: k and v need batch, heads and head_dim >= 1; got ",
                                   detail::describe_dims<Layout>(k_view.dims));
  kv.add({k_view.data, v_view.data, Layout::strides(ks), 0, ks.seq});
  Tensor4<T> out(q_view.dims);
  AttendWorkspace workspace;
  detail::attend_view<Layout, detail::KernelVariant::kFast, false>("attend", q_view, kv, options,
                                                                 out.data(), workspace);
  return out;
}

}  // namespace kvcache

#endif  // KVCACHE_ATTEND_HPP
