// StaticKVCache: what goes in comes out, bit for bit, in both layouts and every element type.
#include "support/catch.hpp"
#include "support/reference.hpp"

#include <vector>

using namespace kvtest;
using kvcache::StaticKVCache;

#define KVTEST_ALL_CASES                                                               \
  (Case<float, BHSD>), (Case<float, BSHD>), (Case<double, BHSD>), (Case<double, BSHD>), \
      (Case<Eigen::half, BHSD>), (Case<Eigen::half, BSHD>), (Case<Eigen::bfloat16, BHSD>), \
      (Case<Eigen::bfloat16, BSHD>)

TEMPLATE_TEST_CASE("static cache returns the appended tokens in order", "[static]",
                   KVTEST_ALL_CASES) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index batch = 2, heads = 3, head_dim = 5, max_len = 17;
  const Tensor4<T> k = random_tensor<T, L>(batch, heads, max_len, head_dim, 1);
  const Tensor4<T> v = random_tensor<T, L>(batch, heads, max_len, head_dim, 2);
  StaticKVCache<T, L> cache(batch, max_len, heads, head_dim);
  REQUIRE(cache.size() == 0);
  REQUIRE(cache.capacity() == max_len);
  REQUIRE(cache.batch_size() == batch);
  REQUIRE(cache.num_heads() == heads);
  REQUIRE(cache.head_dim() == head_dim);

  Index at = 0;
  for (Index chunk : {1, 4, 7, 0, 5}) {
    cache.update(slice_seq<L>(k, at, chunk), slice_seq<L>(v, at, chunk));
    at += chunk;
    REQUIRE(cache.size() == at);
    REQUIRE(cache.position() == at);
    REQUIRE(equal(cache.keys(), slice_seq<L>(k, 0, at)));
    REQUIRE(equal(cache.values(), slice_seq<L>(v, 0, at)));
  }
  REQUIRE(at == max_len);
  REQUIRE(cache.memory_bytes() == 2 * sizeof(T) * batch * heads * max_len * head_dim);
}

TEMPLATE_TEST_CASE("static cache: fewer batch rows write rows [0, b) and zero the rest",
                   "[static]", (Case<float, BHSD>), (Case<float, BSHD>)) {
  using L = typename TestType::layout;
  const Index heads = 2, head_dim = 3;
  const Tensor4<float> full = random_tensor<float, L>(3, heads, 6, head_dim, 3);
  StaticKVCache<float, L> cache(3, 6, heads, head_dim);
  cache.update(slice_seq<L>(full, 0, 4), slice_seq<L>(full, 0, 4));
  cache.reset();  // stale data now sits under the positions written next
  const Tensor4<float> part = slice_seq<L>(full, 0, 2, /*batch=*/2);
  cache.update(part, part);
  const Tensor4<float> keys = cache.keys();
  REQUIRE(batch_of<L>(keys) == 3);
  for (Index b = 0; b < 3; ++b)
    for (Index h = 0; h < heads; ++h)
      for (Index s = 0; s < 2; ++s)
        for (Index c = 0; c < head_dim; ++c)
          REQUIRE(at<L>(keys, b, h, s, c) == (b < 2 ? at<L>(full, b, h, s, c) : 0.0f));
}

TEMPLATE_TEST_CASE("static cache: reset and crop keep storage, later appends continue", "[static]",
                   (Case<float, BHSD>), (Case<float, BSHD>), (Case<Eigen::half, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Tensor4<T> k = random_tensor<T, L>(1, 2, 9, 4, 4);
  const Tensor4<T> v = random_tensor<T, L>(1, 2, 9, 4, 5);
  StaticKVCache<T, L> cache(1, 9, 2, 4);
  const std::size_t bytes = cache.memory_bytes();
  cache.update(slice_seq<L>(k, 0, 6), slice_seq<L>(v, 0, 6));

  const Index n = GENERATE(0, 1, 5, 6);
  cache.crop(n);
  REQUIRE(cache.size() == n);
  REQUIRE(equal(cache.keys(), slice_seq<L>(k, 0, n)));
  cache.update(slice_seq<L>(k, n, 3), slice_seq<L>(v, n, 3));
  REQUIRE(equal(cache.keys(), slice_seq<L>(k, 0, n + 3)));
  REQUIRE(equal(cache.values(), slice_seq<L>(v, 0, n + 3)));

  cache.reset();
  REQUIRE(cache.size() == 0);
  REQUIRE(cache.position() == 0);
  REQUIRE(cache.capacity() == 9);
  REQUIRE(cache.memory_bytes() == bytes);
  REQUIRE(cache.keys().size() == 0);
  cache.update(slice_seq<L>(k, 2, 9 - 2), slice_seq<L>(v, 2, 9 - 2));
  REQUIRE(equal(cache.keys(), slice_seq<L>(k, 2, 7)));
}

TEMPLATE_TEST_CASE("static cache takes TensorMaps of mutable and const data", "[static]",
                   (Case<float, BHSD>), (Case<Eigen::bfloat16, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Tensor4<T> k = random_tensor<T, L>(1, 2, 3, 8, 6);
  const Tensor4<T> v = random_tensor<T, L>(1, 2, 3, 8, 7);
  std::vector<T> k_buffer(k.data(), k.data() + k.size());
  std::vector<T> v_buffer(v.data(), v.data() + v.size());

  StaticKVCache<T, L> from_tensor(1, 8, 2, 8), from_maps(1, 8, 2, 8);
  from_tensor.update(k, v);
  from_tensor.update(k, v);
  Eigen::TensorMap<Tensor4<T>> k_map(k_buffer.data(), k.dimensions());
  Eigen::TensorMap<const Tensor4<T>> v_const_map(v_buffer.data(), v.dimensions());
  from_maps.update(k_map, v_const_map);
  Eigen::TensorMap<const Tensor4<T>> k_const_map(k_buffer.data(), k.dimensions());
  from_maps.update(k_const_map, v);  // a map and a tensor mixed
  REQUIRE(equal(from_maps.keys(), from_tensor.keys()));
  REQUIRE(equal(from_maps.values(), from_tensor.values()));
}

TEST_CASE("static cache fills to exactly its capacity", "[static]") {
  const Index len = GENERATE(1, 7, 16);
  StaticKVCache<float> cache(1, len, 1, 4);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 1, len, 4, 8);
  cache.update(k, k);
  REQUIRE(cache.size() == len);
  const Tensor4<float> one = random_tensor<float, BHSD>(1, 1, 1, 4, 9);
  REQUIRE_THROWS_AS(cache.update(one, one), std::length_error);
  REQUIRE(cache.size() == len);
  REQUIRE(equal(cache.keys(), k));
}
