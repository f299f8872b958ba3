// DynamicKVCache: same contents as a static cache, geometric growth (O(N) copies for N
// one-token appends), capacity and memory accounting.
#include "support/catch.hpp"
#include "support/reference.hpp"

using namespace kvtest;
using kvcache::DynamicKVCache;
using kvcache::StaticKVCache;

TEMPLATE_TEST_CASE("dynamic cache holds what a static cache holds", "[dynamic]",
                   (Case<float, BHSD>), (Case<float, BSHD>), (Case<double, BHSD>),
                   (Case<Eigen::half, BSHD>), (Case<Eigen::bfloat16, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index batch = 2, heads = 3, head_dim = 7, total = 70;
  const Tensor4<T> k = random_tensor<T, L>(batch, heads, total, head_dim, 11);
  const Tensor4<T> v = random_tensor<T, L>(batch, heads, total, head_dim, 12);
  DynamicKVCache<T, L> dynamic(batch, heads, head_dim);
  StaticKVCache<T, L> fixed(batch, total, heads, head_dim);
  REQUIRE(dynamic.capacity() == 0);
  REQUIRE(dynamic.memory_bytes() == 0);
  Index at = 0;
  for (Index chunk : {1, 1, 15, 16, 1, 0, 17, 19}) {
    dynamic.update(slice_seq<L>(k, at, chunk), slice_seq<L>(v, at, chunk));
    fixed.update(slice_seq<L>(k, at, chunk), slice_seq<L>(v, at, chunk));
    at += chunk;
    REQUIRE(dynamic.size() == at);
    REQUIRE(dynamic.position() == at);
    REQUIRE(dynamic.capacity() >= at);
    REQUIRE(dynamic.memory_bytes() ==
            2 * sizeof(T) * std::size_t(batch * heads * dynamic.capacity() * head_dim));
    REQUIRE(equal(dynamic.keys(), fixed.keys()));
    REQUIRE(equal(dynamic.values(), fixed.values()));
  }
  dynamic.crop(33);
  REQUIRE(equal(dynamic.keys(), slice_seq<L>(k, 0, 33)));
  dynamic.update(slice_seq<L>(k, 33, 37), slice_seq<L>(v, 33, 37));
  REQUIRE(equal(dynamic.values(), v));
}

TEMPLATE_TEST_CASE("dynamic cache grows geometrically: N one-token appends copy O(N)",
                   "[dynamic]", (Case<float, BHSD>), (Case<float, BSHD>)) {
  using L = typename TestType::layout;
  const Index n = 5000;
  const Tensor4<float> token = random_tensor<float, L>(1, 2, 1, 4, 13);
  DynamicKVCache<float, L> cache(1, 2, 4);
  Index copied = 0, growths = 0, capacity = cache.capacity();
  for (Index i = 0; i < n; ++i) {
    const Index before = cache.size();
    cache.update(token, token);
    if (cache.capacity() != capacity) {
      copied += before;  // a growth moves every held position once
      ++growths;
      capacity = cache.capacity();
    }
  }
  REQUIRE(cache.size() == n);
  REQUIRE(copied < 2 * n);
  REQUIRE(growths <= 10);  // 16, 32, ..., 8192: doubling from 16
  REQUIRE(cache.capacity() < 2 * n);
}

TEST_CASE("dynamic cache: reserve, initial capacity, reset keeps storage", "[dynamic]") {
  DynamicKVCache<float> cache(1, 2, 4, /*initial_capacity=*/10);
  REQUIRE(cache.capacity() == 10);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 2, 10, 4, 14);
  cache.update(k, k);
  REQUIRE(cache.capacity() == 10);  // exactly full: no growth yet
  cache.reserve(100);
  REQUIRE(cache.capacity() == 100);
  REQUIRE(equal(cache.keys(), k));
  cache.reserve(50);  // never shrinks
  REQUIRE(cache.capacity() == 100);
  const std::size_t bytes = cache.memory_bytes();
  cache.reset();
  REQUIRE(cache.size() == 0);
  REQUIRE(cache.memory_bytes() == bytes);
  cache.update(k, k);
  REQUIRE(equal(cache.values(), k));
}
