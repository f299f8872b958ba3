// Compiled (not run) by the test build with -Wconversion -Wsign-conversion -Wshadow -Werror on top of
// -Wall -Wextra -Wpedantic, Eigen as a system include, as a strict consumer builds: every cache
// kind's update, both attend overloads, save and load, a model, freeze and a prefix must
// compile without a warning from kvcache's headers (issue 13).
#include <kvcache/kvcache.hpp>
#include <cstdint>
#include <sstream>
#include <vector>
template <class Cache>
void exercise(Cache& cache) {
  using T = typename Cache::element_type;
  using L = typename Cache::layout_type;
  kvcache::Tensor4<T> k(L::dims({1, 2, 3, 16})), v(L::dims({1, 2, 3, 16})), q(L::dims({1, 4, 3, 16}));
  k.setConstant(T(0.5f)); v.setConstant(T(0.25f)); q.setConstant(T(1.0f));
  cache.update(k, v);
  auto out = kvcache::attend(q, cache);
  kvcache::AttendWorkspace ws;
  kvcache::attend(q, cache, out, ws);
  std::stringstream s;
  cache.save(s);
  (void)Cache::load(s);
}
int main() {
  kvcache::StaticKVCache<float> a(1, 64, 2, 16); exercise(a);
  kvcache::DynamicKVCache<Eigen::half, kvcache::BSHD> b(1, 2, 16); exercise(b);
  kvcache::SlidingWindowKVCache<Eigen::bfloat16> c(1, 8, 2, 16, 2); exercise(c);
  kvcache::Int8KVCache<float> d(1, 64, 2, 16, {}); exercise(d);
  kvcache::Int4KVCache<double, kvcache::BSHD> e(1, 64, 2, 16, {}); exercise(e);
  kvcache::ModelKVCache<kvcache::StaticKVCache<float>> m(2, [](kvcache::Index) { return kvcache::StaticKVCache<float>(1, 8, 2, 16); });
  std::stringstream s; m.save(s); (void)decltype(m)::load(s);
  auto frozen = a.freeze();
  kvcache::PrefixKVCache<float> p(frozen, 16);
  kvcache::Tensor4<float> k(1, 2, 1, 16), v(1, 2, 1, 16); k.setZero(); v.setZero(); p.update(k, v);
  kvcache::PagedConfig config; config.num_blocks = 8; config.block_size = 4; config.num_heads = 2; config.head_dim = 16;
  kvcache::PagedKVCache<Eigen::bfloat16, kvcache::BSHD> pool(config);
  const auto id = pool.add_sequence(std::vector<std::int32_t>{1, 2, 3, 4, 5}).sequence;
  kvcache::Tensor4<Eigen::bfloat16> pk(1, 1, 2, 16); pk.setZero(); pool.update(0, id, pk, pk);
  pool.cache_prefix(id, {1});
  kvcache::Tensor4<Eigen::bfloat16> pq(1, 2, 2, 16), pout(1, 2, 2, 16); pq.setZero();  // BSHD: 2 rows, 2 heads
  kvcache::AttendWorkspace workspace;
  kvcache::attend(pq, pool, 0, {id, pool.fork(id)}, {1, 1}, pout, workspace);
  std::stringstream ps; pool.save(ps); (void)decltype(pool)::load(ps);
}
