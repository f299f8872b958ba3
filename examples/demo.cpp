// kvcache demo: a prefill and a few decode steps of grouped-query attention over a
// StaticKVCache, checked against a naive loop, then a DynamicKVCache growing as tokens arrive.
//
// The keys, values and queries are deterministic pseudo-random numbers (fixed seed), so the
// checksums are the same on every run; the times are not. Exits non-zero if a check fails.
#include <kvcache/kvcache.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

namespace {

using kvcache::Index;
using kvcache::Tensor4;

constexpr Index kBatch = 1;
constexpr Index kKvHeads = 2;
constexpr Index kQueryHeads = 8;  // grouped-query attention: 4 query heads per KV head
constexpr Index kHeadDim = 64;
constexpr Index kPromptLen = 16;
constexpr Index kDecodeSteps = 8;
constexpr Index kMaxSeqLen = 32;

// Uniform in [-1, 1) from std::mt19937, whose output sequence the standard fixes (the
// standard distributions are not portable, so they are not used).
class Random {
 public:
  explicit Random(std::uint32_t seed) : engine_(seed) {}
  Tensor4<float> tensor(Index d0, Index d1, Index d2, Index d3) {
    Tensor4<float> t(d0, d1, d2, d3);
    for (Index i = 0; i < t.size(); ++i)
      t.data()[i] = static_cast<float>(engine_() * (2.0 / 4294967296.0) - 1.0);
    return t;
  }

 private:
  std::mt19937 engine_;
};

// Tokens [begin, begin + len) of a [batch, heads, seq, head_dim] tensor.
Tensor4<float> tokens(const Tensor4<float>& all, Index begin, Index len) {
  const Eigen::array<Index, 4> offsets{0, 0, begin, 0};
  const Eigen::array<Index, 4> extents{all.dimension(0), all.dimension(1), len, all.dimension(3)};
  return all.slice(offsets, extents);
}

// Causal grouped-query attention straight from the definition, in double: the reference the
// kernel's result is compared with. k, v hold every position so far; q is the last q_len.
Tensor4<float> naive_attention(const Tensor4<float>& q, const Tensor4<float>& k,
                               const Tensor4<float>& v) {
  const Index q_len = q.dimension(2), kv_len = k.dimension(2), dim = q.dimension(3);
  const Index group = q.dimension(1) / k.dimension(1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dim));
  Tensor4<float> out(q.dimensions());
  std::vector<double> score(static_cast<std::size_t>(kv_len));
  for (Index b = 0; b < q.dimension(0); ++b)
    for (Index h = 0; h < q.dimension(1); ++h)
      for (Index i = 0; i < q_len; ++i) {
        const Index t = kv_len - q_len + i;  // absolute position of query row i
        double max_score = -INFINITY;
        for (Index p = 0; p <= t; ++p) {
          double s = 0;
          for (Index d = 0; d < dim; ++d) s += double(q(b, h, i, d)) * k(b, h / group, p, d);
          score[p] = s * scale;
          max_score = std::max(max_score, score[p]);
        }
        double denominator = 0;
        for (Index p = 0; p <= t; ++p) denominator += std::exp(score[p] - max_score);
        for (Index d = 0; d < dim; ++d) {
          double acc = 0;
          for (Index p = 0; p <= t; ++p)
            acc += std::exp(score[p] - max_score) * v(b, h / group, p, d);
          out(b, h, i, d) = static_cast<float>(acc / denominator);
        }
      }
  return out;
}

double checksum(const Tensor4<float>& t) {
  double sum = 0;
  for (Index i = 0; i < t.size(); ++i) sum += t.data()[i];
  return sum;
}

float max_abs_diff(const Tensor4<float>& a, const Tensor4<float>& b) {
  const Eigen::Tensor<float, 0, Eigen::RowMajor, Index> m = (a - b).abs().maximum();
  return m();
}

}  // namespace

int main() {
  constexpr float kTolerance = 1e-5f;  // float kernel vs double reference, values in [-1, 1]
  bool ok = true;
  Random random(2026);
  const Index total = kPromptLen + kDecodeSteps;
  const Tensor4<float> all_k = random.tensor(kBatch, kKvHeads, total, kHeadDim);
  const Tensor4<float> all_v = random.tensor(kBatch, kKvHeads, total, kHeadDim);

  std::printf("kvcache %d.%d.%d demo\n\n", kvcache::version.major, kvcache::version.minor,
              kvcache::version.patch);
  std::printf(
      "StaticKVCache<float>: batch %ld, %ld KV heads, %ld query heads, head_dim %ld, "
      "max_seq_len %ld\n",
      long(kBatch), long(kKvHeads), long(kQueryHeads), long(kHeadDim), long(kMaxSeqLen));
  std::printf("prefill of %ld prompt tokens (causal), then %ld decode steps of one token\n\n",
              long(kPromptLen), long(kDecodeSteps));
  std::printf("%-10s %5s %8s %5s %8s %12s %15s %10s %12s\n", "step", "q_len", "position", "size",
              "capacity", "memory_bytes", "checksum", "max_error", "attend_us");

  kvcache::StaticKVCache<float> cache(kBatch, kMaxSeqLen, kKvHeads, kHeadDim);
  Tensor4<float> last_q, last_out;
  float worst_error = 0;
  for (Index step = 0; step <= kDecodeSteps; ++step) {
    const bool prefill = step == 0;
    const Index begin = prefill ? 0 : kPromptLen + step - 1;
    const Index q_len = prefill ? kPromptLen : 1;
    cache.update(tokens(all_k, begin, q_len), tokens(all_v, begin, q_len));
    const Tensor4<float> q = random.tensor(kBatch, kQueryHeads, q_len, kHeadDim);

    const auto start = std::chrono::steady_clock::now();
    Tensor4<float> out = kvcache::attend(q, cache);  // causal by default
    const auto stop = std::chrono::steady_clock::now();

    const float error = max_abs_diff(out, naive_attention(q, cache.keys(), cache.values()));
    worst_error = std::max(worst_error, error);
    char name[16] = "prefill";
    if (!prefill) std::snprintf(name, sizeof name, "decode %ld", long(step));
    std::printf("%-10s %5ld %8ld %5ld %8ld %12zu %+15.8f %10.2e %12.1f\n", name, long(q_len),
                long(cache.position()), long(cache.size()), long(cache.capacity()),
                cache.memory_bytes(), checksum(out), double(error),
                std::chrono::duration<double, std::micro>(stop - start).count());
    last_q = q;
    last_out = std::move(out);
  }
  std::printf("\nlargest difference from the naive double-precision attention: %.2e (%s)\n",
              double(worst_error), worst_error <= kTolerance ? "ok" : "TOO LARGE");
  ok = ok && worst_error <= kTolerance;

  // The same tokens appended one at a time to a cache without a fixed maximum, which must
  // give the same attention; then more tokens, to watch the capacity double.
  constexpr Index kDynamicTokens = 200;
  std::printf(
      "\nDynamicKVCache<float>: same shape, no maximum; %ld tokens appended one at a time "
      "(the first %ld as above)\n\n",
      long(kDynamicTokens), long(total));
  std::printf("%8s %8s %12s\n", "position", "capacity", "memory_bytes");
  kvcache::DynamicKVCache<float> dynamic(kBatch, kKvHeads, kHeadDim);
  std::printf("%8ld %8ld %12zu  (empty)\n", long(dynamic.position()), long(dynamic.capacity()),
              dynamic.memory_bytes());
  Index reallocations = 0;
  float dynamic_diff = 0;
  for (Index p = 0; p < kDynamicTokens; ++p) {
    const Index capacity_before = dynamic.capacity();
    if (p < total) {
      dynamic.update(tokens(all_k, p, 1), tokens(all_v, p, 1));
    } else {
      dynamic.update(random.tensor(kBatch, kKvHeads, 1, kHeadDim),
                     random.tensor(kBatch, kKvHeads, 1, kHeadDim));
    }
    if (dynamic.capacity() != capacity_before) {
      ++reallocations;
      std::printf("%8ld %8ld %12zu  grew\n", long(dynamic.position()), long(dynamic.capacity()),
                  dynamic.memory_bytes());
    }
    if (dynamic.position() == total)  // the static cache's last decode step, repeated
      dynamic_diff = max_abs_diff(kvcache::attend(last_q, dynamic), last_out);
  }
  std::printf("%8ld %8ld %12zu  (end)\n", long(dynamic.position()), long(dynamic.capacity()),
              dynamic.memory_bytes());
  std::printf("\n%ld appends, %ld reallocations\n", long(kDynamicTokens), long(reallocations));
  std::printf("decode step %ld over the dynamic cache differs from the static cache by %.2e (%s)\n",
              long(kDecodeSteps), double(dynamic_diff),
              dynamic_diff <= kTolerance ? "ok" : "TOO LARGE");
  ok = ok && dynamic_diff <= kTolerance;

  std::printf("\n%s\n", ok ? "demo: all checks passed" : "demo: a check FAILED");
  return ok ? 0 : 1;
}
