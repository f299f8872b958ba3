// The file an inference engine's author copies: a multi-layer KV cache fed from the engine's
// own projection buffers, attention written into the engine's own output buffer, no tensor
// copies, no transposes and (after the first step) no heap allocation per decode step.
//
//   * BSHD layout: a projection's output [tokens, heads * head_dim] already is
//     [batch 1, seq, heads, head_dim], so TensorMaps over it need no transpose.
//   * A ModelKVCache: one cache per layer (any kind; DynamicKVCache here, growing as needed).
//   * attend(q, cache, out, workspace, options): the allocation-free overload; `workspace`
//     and `out` live as long as the loop; a thread pool splits the work.
//
// The "model" is a stand-in: each layer's q, k, v are deterministic numbers. Run it; it checks
// its last step against the allocating attend() and prints what it did.
#include <kvcache/kvcache.hpp>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using kvcache::BSHD;
using kvcache::Index;
using Cache = kvcache::DynamicKVCache<float, BSHD>;
using Map = Eigen::TensorMap<kvcache::Tensor4<float>>;
using ConstMap = Eigen::TensorMap<const kvcache::Tensor4<float>>;

constexpr Index kLayers = 4, kQueryHeads = 8, kKVHeads = 2, kHeadDim = 64;

// Stand-in for a layer's projections of `tokens` new tokens at `position`: fills the engine's
// buffers, row-major [tokens, heads, head_dim].
void project(Index layer, Index position, Index tokens, std::vector<float>& q,
             std::vector<float>& k, std::vector<float>& v) {
  q.resize(std::size_t(tokens * kQueryHeads * kHeadDim));
  k.resize(std::size_t(tokens * kKVHeads * kHeadDim));
  v.resize(k.size());
  for (std::size_t i = 0; i < q.size(); ++i)
    q[i] = std::sin(0.37f * float(i + 1) + float(layer + position));
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = std::cos(0.11f * float(i + 7) + 0.5f * float(layer + position));
    v[i] = std::sin(0.05f * float(i + 3) - float(layer + position));
  }
}

}  // namespace

int main() {
  const Index prompt = 48, steps = 32;
  kvcache::ModelKVCache<Cache> caches(kLayers, [](Index) {
    return Cache(/*batch_size=*/1, kKVHeads, kHeadDim, /*initial_capacity=*/256);
  });
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  kvcache::AttendOptions options;
  options.causal = true;
  options.device = &device;
  kvcache::AttendWorkspace workspace;  // reused by every call

  std::vector<float> q, k, v, out(std::size_t(prompt * kQueryHeads * kHeadDim));
  Index position = 0;
  // Prefill (tokens = prompt), then decode (tokens = 1): the same calls.
  for (Index step = 0; step <= steps; ++step) {
    const Index tokens = step == 0 ? prompt : 1;
    for (Index layer = 0; layer < kLayers; ++layer) {
      project(layer, position, tokens, q, k, v);
      // The engine's buffers, seen as [1, tokens, heads, head_dim] tensors: no copy.
      caches[layer].update(ConstMap(k.data(), 1, tokens, kKVHeads, kHeadDim),
                           ConstMap(v.data(), 1, tokens, kKVHeads, kHeadDim));
      kvcache::attend(ConstMap(q.data(), 1, tokens, kQueryHeads, kHeadDim), caches[layer],
                      Map(out.data(), 1, tokens, kQueryHeads, kHeadDim), workspace, options);
      // ... the engine's output projection reads `out` here.
    }
    position += tokens;
  }

  // Check: the last step of the last layer equals the allocating overload, bit for bit.
  const kvcache::Tensor4<float> want =
      kvcache::attend(ConstMap(q.data(), 1, 1, kQueryHeads, kHeadDim), caches[kLayers - 1],
                      options);
  for (Index i = 0; i < want.size(); ++i)
    if (want.data()[i] != out[std::size_t(i)]) {
      std::printf("engine_loop: output %ld differs: %g vs %g\n", long(i), double(out[std::size_t(i)]),
                  double(want.data()[i]));
      return 1;
    }
  std::size_t bytes = 0;
  for (const Cache& layer : caches) bytes += layer.memory_bytes();
  std::printf("engine_loop: %ld layers, %ld-token prompt + %ld decode steps, %ld positions "
              "cached per layer, %zu bytes of K/V, workspace %zu bytes, kernel %s: ok\n",
              long(kLayers), long(prompt), long(steps), long(caches[0].size()), bytes,
              workspace.capacity_bytes(), kvcache::kernel_isa().c_str());
  return 0;
}
