// Test support: everything observable of a cache, to check the strong exception guarantee
// (a failing call leaves size, position, capacity, memory and contents exactly as they were).
#ifndef KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP
#define KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP

#include "catch.hpp"
#include "reference.hpp"

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace kvtest {

/// What one cache shows: its counters, memory, held keys and values, and raw quantized bytes.
template <class T>
struct CacheState {
  template <class Cache>
  explicit CacheState(const Cache& c)
      : size(c.size()), position(c.position()), capacity(c.capacity()),
        bytes(c.memory_bytes()), keys(c.keys()), values(c.values()),
        blocks(quantized_bytes(c)) {}
  bool operator==(const CacheState& o) const {
    return size == o.size && position == o.position && capacity == o.capacity &&
           bytes == o.bytes && equal(keys, o.keys) && equal(values, o.values) &&
           blocks == o.blocks;
  }
  Index size, position, capacity;
  std::size_t bytes;
  Tensor4<T> keys, values;
  std::vector<std::uint8_t> blocks;
};

/// Everything observable of a cache of any kind (FrozenKVCache included).
template <class Cache>
struct Snapshot : CacheState<typename Cache::element_type> {
  explicit Snapshot(const Cache& c) : CacheState<typename Cache::element_type>(c) {}
};

/// The element type of a ModelKVCache layer: a cache's, or that of a variant's alternatives.
template <class Layer>
struct layer_element {
  using type = typename Layer::element_type;
};
template <class First, class... Rest>
struct layer_element<std::variant<First, Rest...>> {
  using type = typename First::element_type;
};

/// Everything observable of a ModelKVCache: every layer's state (and, for variant layers,
/// which kind each layer holds) and the total memory.
template <class Layer>
struct Snapshot<kvcache::ModelKVCache<Layer>> {
  using T = typename layer_element<Layer>::type;
  explicit Snapshot(const kvcache::ModelKVCache<Layer>& model)
      : num_layers(model.num_layers()), size(model.size()), bytes(model.memory_bytes()) {
    for (const Layer& layer : model) {
      if constexpr (kvcache::detail::is_variant<Layer>::value) {
        kinds.push_back(layer.index());
        layers.push_back(std::visit([](const auto& c) { return CacheState<T>(c); }, layer));
      } else {
        kinds.push_back(0);
        layers.push_back(CacheState<T>(layer));
      }
    }
  }
  bool operator==(const Snapshot& o) const {
    return num_layers == o.num_layers && size == o.size && bytes == o.bytes &&
           kinds == o.kinds && layers == o.layers;
  }
  Index num_layers, size;
  std::size_t bytes;
  std::vector<std::size_t> kinds;
  std::vector<CacheState<T>> layers;
};

/// Requires that call() throws an Error (or a type derived from it) and leaves `cache` - any
/// type Snapshot takes - exactly as it was. Returns the exception's message. Any other
/// exception escapes, and Catch reports it as unexpected.
template <class Error, class Cache, class Call>
std::string require_throws_unchanged(const Cache& cache, Call&& call) {
  const Snapshot<Cache> before(cache);
  bool thrown = false;
  std::string what;
  try {
    call();
  } catch (const Error& e) {
    thrown = true;
    what = e.what();
  }
  CAPTURE(what);
  REQUIRE(thrown);
  REQUIRE(Snapshot<Cache>(cache) == before);
  return what;
}

/// Requires that cache.update(k, v) throws std::invalid_argument whose message says what was
/// expected and names `received`, and that the cache is exactly as it was.
template <class Cache, class Tensor>
void require_invalid_update(Cache& cache, const Tensor& k, const Tensor& v,
                            const std::string& received) {
  const std::string what =
      require_throws_unchanged<std::invalid_argument>(cache, [&] { cache.update(k, v); });
  CAPTURE(what);
  REQUIRE(contains(what, "expected"));
  REQUIRE(contains(what, received));
}

}  // namespace kvtest

#endif  // KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP
