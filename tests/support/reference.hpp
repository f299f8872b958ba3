// Test support: an independent, naive attention in double precision, straight from the
// masking rules of API.md. It shares no code with the library's kernel or masks.
#ifndef KVCACHE_TESTS_SUPPORT_REFERENCE_HPP
#define KVCACHE_TESTS_SUPPORT_REFERENCE_HPP

#include <kvcache/kvcache.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace kvtest {

/// A test's (element type, layout) pair.
template <class T, class L>
struct Case {
  using element = T;
  using layout = L;
};

using kvcache::BHSD;
using kvcache::BSHD;
using kvcache::Index;
using kvcache::Tensor4;
using Mask = Eigen::Tensor<bool, 2, Eigen::RowMajor, Index>;

/// Element (b, h, s, d) of a tensor stored in Layout.
template <class Layout, class Tensor>
auto& at(Tensor& x, Index b, Index h, Index s, Index d) {
  if constexpr (std::is_same_v<Layout, BHSD>)
    return x(b, h, s, d);
  else
    return x(b, s, h, d);
}

/// The head_dim elements (b, h, s, 0 ...) of a tensor stored in Layout, contiguous in both
/// layouts. Inner loops index this row rather than call at() per element: at -O1 (the fuzzers'
/// build) Eigen's index helpers are not inlined, and per-element at() in the reference's loops
/// took a quarter of fuzz_operations' time.
template <class Layout, class Tensor>
auto* row(Tensor& x, Index b, Index h, Index s) {
  return &at<Layout>(x, b, h, s, 0);
}

/// Dimensions (b, h, s, d) as the Layout orders them.
template <class Layout>
std::array<Index, 4> dims(Index b, Index h, Index s, Index d) {
  if constexpr (std::is_same_v<Layout, BHSD>)
    return {b, h, s, d};
  else
    return {b, s, h, d};
}

template <class Layout, class Tensor>
Index batch_of(const Tensor& x) { return x.dimension(0); }
template <class Layout, class Tensor>
Index heads_of(const Tensor& x) { return x.dimension(std::is_same_v<Layout, BHSD> ? 1 : 2); }
template <class Layout, class Tensor>
Index seq_of(const Tensor& x) { return x.dimension(std::is_same_v<Layout, BHSD> ? 2 : 1); }
template <class Layout, class Tensor>
Index head_dim_of(const Tensor& x) { return x.dimension(3); }

/// A tensor of the given (b, h, s, d) in Layout with values uniform in [-magnitude, magnitude],
/// rounded to T, from a fixed seed so every failure replays.
template <class T, class Layout>
Tensor4<T> random_tensor(Index b, Index h, Index s, Index d, unsigned seed,
                         double magnitude = 1.0) {
  Tensor4<T> x(dims<Layout>(b, h, s, d));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> uniform(-magnitude, magnitude);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(static_cast<float>(uniform(rng)));
  return x;
}

/// Like random_tensor, with values uniform in [-magnitude, magnitude] computed in double and
/// rounded once to T: for magnitudes beyond float's range (double near its largest number).
template <class T, class Layout>
Tensor4<T> scaled_random_tensor(Index b, Index h, Index s, Index d, unsigned seed,
                                double magnitude) {
  const Tensor4<double> unit = random_tensor<double, Layout>(b, h, s, d, seed);
  Tensor4<T> x(unit.dimensions());
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(unit.data()[i] * magnitude);
  return x;
}

/// What the reference needs beyond q, k, v.
struct ReferenceRules {
  double scale = std::numeric_limits<double>::quiet_NaN();  // NaN: 1 / sqrt(head_dim)
  bool causal = true;
  Index window = 0;          // the option's window
  Index cache_window = 0;    // a sliding-window cache's own window
  Index num_sink_tokens = 0; // exempt from both windows
  double softcap = 0;
  const Mask* key_mask = nullptr;
};

inline ReferenceRules rules_from(const kvcache::AttendOptions& o) {
  ReferenceRules r;
  if (o.scale) r.scale = *o.scale;
  r.causal = o.causal;
  r.window = o.window;
  r.softcap = o.softcap;
  r.key_mask = o.key_mask;
  return r;
}

/// Naive attention in double. key_positions[j] is the absolute position of key j of k, v;
/// query row i sits at first_query_position + i. Returns (b, hq, q_len, d) in Layout.
template <class Layout, class T>
Eigen::Tensor<double, 4, Eigen::RowMajor, Index> reference_attention(
    const Tensor4<T>& q, const Tensor4<T>& k, const Tensor4<T>& v,
    const std::vector<Index>& key_positions, Index first_query_position,
    const ReferenceRules& rules) {
  const Index batch = batch_of<Layout>(q), hq = heads_of<Layout>(q), q_len = seq_of<Layout>(q),
              d = head_dim_of<Layout>(q), hkv = heads_of<Layout>(k), k_len = seq_of<Layout>(k);
  const double scale = std::isnan(rules.scale) ? 1.0 / std::sqrt(double(d)) : rules.scale;
  Eigen::Tensor<double, 4, Eigen::RowMajor, Index> out(dims<Layout>(batch, hq, q_len, d));
  out.setZero();
  std::vector<double> scores(static_cast<std::size_t>(k_len));
  std::vector<bool> visible(static_cast<std::size_t>(k_len));
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < hq; ++h) {
      const Index kvh = h / (hq / hkv);
      for (Index i = 0; i < q_len; ++i) {
        const Index t = first_query_position + i;
        double max_score = -std::numeric_limits<double>::infinity();
        bool any = false;
        const T* q_row = row<Layout>(q, b, h, i);
        for (Index j = 0; j < k_len; ++j) {
          const Index p = key_positions[static_cast<std::size_t>(j)];
          bool ok = true;
          if (rules.causal && !(p <= t)) ok = false;
          const bool sink = p < rules.num_sink_tokens;
          if (rules.window > 0 && !sink && !(t - rules.window < p)) ok = false;
          if (rules.cache_window > 0 && !sink && !(t - rules.cache_window < p)) ok = false;
          if (rules.key_mask && !(*rules.key_mask)(b, p)) ok = false;
          visible[static_cast<std::size_t>(j)] = ok;
          if (!ok) continue;
          const T* k_row = row<Layout>(k, b, kvh, j);
          double s = 0;
          for (Index c = 0; c < d; ++c) s += double(q_row[c]) * double(k_row[c]);
          s *= scale;
          if (rules.softcap > 0) s = rules.softcap * std::tanh(s / rules.softcap);
          scores[static_cast<std::size_t>(j)] = s;
          max_score = std::max(max_score, s);
          any = true;
        }
        if (!any) continue;  // rule 4: zeros
        double total = 0;
        for (Index j = 0; j < k_len; ++j)
          if (visible[static_cast<std::size_t>(j)])
            total += std::exp(scores[static_cast<std::size_t>(j)] - max_score);
        double* out_row = row<Layout>(out, b, h, i);
        for (Index j = 0; j < k_len; ++j) {
          if (!visible[static_cast<std::size_t>(j)]) continue;
          const double w = std::exp(scores[static_cast<std::size_t>(j)] - max_score) / total;
          const T* v_row = row<Layout>(v, b, kvh, j);
          for (Index c = 0; c < d; ++c) out_row[c] += w * double(v_row[c]);
        }
      }
    }
  return out;
}

/// Positions [begin, begin + length) and batch rows [0, batch) of x (batch -1: all).
template <class Layout, class T>
Tensor4<T> slice_seq(const Tensor4<T>& x, Index begin, Index length, Index batch = -1) {
  const Index b = batch < 0 ? batch_of<Layout>(x) : batch, h = heads_of<Layout>(x),
              d = head_dim_of<Layout>(x);
  Tensor4<T> out(dims<Layout>(b, h, length, d));
  for (Index bi = 0; bi < b; ++bi)
    for (Index hi = 0; hi < h; ++hi)
      for (Index s = 0; s < length; ++s)
        std::copy_n(row<Layout>(x, bi, hi, begin + s), d, row<Layout>(out, bi, hi, s));
  return out;
}

/// "[1, 2, 3, 4]": dimensions as the library prints them.
inline std::string describe(const std::array<Index, 4>& d) {
  return "[" + std::to_string(d[0]) + ", " + std::to_string(d[1]) + ", " + std::to_string(d[2]) +
         ", " + std::to_string(d[3]) + "]";
}

/// True when `part` occurs in `text` (for checking exception messages).
inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// Calls f and returns the message of the Exception it throws ("" if none; an exception of
/// another type propagates, so a test that names the type also checks it).
template <class Exception = std::exception, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const Exception& e) {
    return e.what();
  }
  return "";
}

/// Positions 0, 1, ..., n - 1.
inline std::vector<Index> iota_positions(Index n, Index first = 0) {
  std::vector<Index> p(static_cast<std::size_t>(n));
  for (Index j = 0; j < n; ++j) p[static_cast<std::size_t>(j)] = first + j;
  return p;
}

/// Largest |got - want| over all elements (shapes must match; a mismatch is infinity).
template <class T>
double max_abs_diff(const Tensor4<T>& got, const Eigen::Tensor<double, 4, Eigen::RowMajor, Index>& want) {
  if (got.dimensions() != want.dimensions()) return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (Index i = 0; i < got.size(); ++i) {
    const double diff = std::abs(double(got.data()[i]) - want.data()[i]);
    if (std::isnan(diff)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, diff);
  }
  return worst;
}

/// True when two tensors have the same shape and equal elements.
template <class T>
bool equal(const Tensor4<T>& a, const Tensor4<T>& b) {
  if (a.dimensions() != b.dimensions()) return false;
  for (Index i = 0; i < a.size(); ++i)
    if (!(a.data()[i] == b.data()[i])) return false;
  return true;
}

/// Absolute tolerance of attention outputs (values in [-1, 1]) for each element type.
template <class T>
constexpr double tolerance() {
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  else if constexpr (std::is_same_v<T, float>) return 2e-5;
  else if constexpr (std::is_same_v<T, Eigen::half>) return 5e-3;
  else return 3e-2;
}

/// The bytes of every quantized block a cache holds, (batch, head, block) order, read through
/// its attention view: a QuantizedKVCache's integer codes, zero points and scales; empty for
/// the other kinds. keys() and values() show the dequantized numbers, which two different
/// blocks could share; these bytes tell them apart.
template <class Cache>
std::vector<std::uint8_t> quantized_bytes(const Cache& c) {
  const auto view = c.attention_view();
  const kvcache::detail::QuantSegment& s = view.quantized;
  std::vector<std::uint8_t> out;
  if (s.num_blocks == 0) return out;
  for (Index b = 0; b < view.batch_size; ++b)
    for (Index h = 0; h < view.num_heads; ++h) {
      const std::uint8_t* first = s.blocks + b * s.batch_stride + h * s.head_stride;
      out.insert(out.end(), first, first + s.num_blocks * s.bytes_per_block);
    }
  return out;
}

}  // namespace kvtest

#endif  // KVCACHE_TESTS_SUPPORT_REFERENCE_HPP
