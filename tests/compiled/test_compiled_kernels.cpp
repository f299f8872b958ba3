// A program built against kvcache::compiled: every translation unit but src/kernels.cpp sees
// only the declaration of the kernel variants (KVCACHE_COMPILED_KERNELS). attend() over every
// element type, a quantized cache of each code width and a paged pool - the eight variant
// entry points src/kernels.cpp defines - against the double-precision reference. The link
// itself checks that none is missing.
#include "support/catch.hpp"
#include "support/reference.hpp"

#ifndef KVCACHE_COMPILED_KERNELS
#error "tests/compiled is built with kvcache::compiled (KVCACHE_COMPILED_KERNELS)"
#endif

using namespace kvtest;

namespace {

/// attend() over the cache against the reference over its own keys() and values().
template <class Cache>
double error_of(const Cache& cache, const Tensor4<typename Cache::element_type>& q) {
  using L = typename Cache::layout_type;
  const auto got = kvcache::attend(q, cache);
  const auto want = reference_attention<L>(q, cache.keys(), cache.values(),
                                           iota_positions(cache.size()), cache.size() - seq_of<L>(q),
                                           ReferenceRules{});
  return max_abs_diff(got, want);
}

}  // namespace

TEMPLATE_TEST_CASE("compiled kernels: every element type, dense and quantized", "[compiled]",
                   (Case<float, BHSD>), (Case<double, BSHD>), (Case<Eigen::half, BHSD>),
                   (Case<Eigen::bfloat16, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  CAPTURE(kvcache::kernel_isa());
  const Index kv_len = 70, head_dim = 32;
  const Tensor4<T> k = random_tensor<T, L>(1, 2, kv_len, head_dim, 1);
  const Tensor4<T> v = random_tensor<T, L>(1, 2, kv_len, head_dim, 2);
  const Tensor4<T> q = random_tensor<T, L>(1, 8, 3, head_dim, 3);
  kvcache::StaticKVCache<T, L> dense(1, kv_len, 2, head_dim);
  dense.update(k, v);
  CHECK(error_of(dense, q) < tolerance<T>());
  kvcache::Int8KVCache<T, L> int8(1, kv_len, 2, head_dim, {16, 8});
  int8.update(k, v);
  CHECK(error_of(int8, q) < tolerance<T>());
  kvcache::Int4KVCache<T, L> int4(1, kv_len, 2, head_dim, {16, 8});
  int4.update(k, v);
  CHECK(error_of(int4, q) < tolerance<T>());
}

TEST_CASE("compiled kernels: a paged pool's ragged attend", "[compiled]") {
  kvcache::PagedConfig config;
  config.num_layers = 1;
  config.num_blocks = 8;
  config.block_size = 16;
  config.num_heads = 2;
  config.head_dim = 32;
  kvcache::PagedKVCache<float> pool(config);
  const auto s = pool.add_sequence();
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 2, 40, 32, 4);
  const Tensor4<float> v = random_tensor<float, BHSD>(1, 2, 40, 32, 5);
  pool.update(0, s, k, v);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 4, 1, 32, 6);
  Tensor4<float> out(1, 4, 1, 32);
  kvcache::AttendWorkspace workspace;
  const std::vector<kvcache::PagedKVCache<float>::SequenceId> sequences{s};
  const std::vector<Index> q_lens{1};
  kvcache::attend(q, pool, 0, sequences, q_lens, out, workspace);
  const auto want = reference_attention<BHSD>(q, pool.keys(0, s), pool.values(0, s),
                                              iota_positions(40), 39, ReferenceRules{});
  CHECK(max_abs_diff(out, want) < tolerance<float>());
}
