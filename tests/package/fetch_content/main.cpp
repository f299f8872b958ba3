// Package test consumer: the smallest real use of kvcache. Exits non-zero on failure.
#include <kvcache/kvcache.hpp>

#include <cstdio>

int main() {
  const kvcache::Index batch = 1, max_len = 8, kv_heads = 2, q_heads = 4, head_dim = 16;
  kvcache::StaticKVCache<float> cache(batch, max_len, kv_heads, head_dim);

  kvcache::Tensor4<float> k(batch, kv_heads, 1, head_dim), v(batch, kv_heads, 1, head_dim);
  k.setConstant(0.5f);
  v.setConstant(2.0f);
  cache.update(k, v);

  kvcache::Tensor4<float> q(batch, q_heads, 1, head_dim);
  q.setConstant(1.0f);
  const kvcache::Tensor4<float> out = kvcache::attend(q, cache);

  // One visible key: the output is that key's value.
  const bool ok = cache.size() == 1 && out.dimension(0) == batch && out.dimension(1) == q_heads &&
                  out.dimension(2) == 1 && out.dimension(3) == head_dim &&
                  out(0, 0, 0, 0) == 2.0f && out(0, q_heads - 1, 0, head_dim - 1) == 2.0f;
  std::printf("kvcache %d.%d.%d consumer: %s\n", kvcache::version.major, kvcache::version.minor,
              kvcache::version.patch, ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
