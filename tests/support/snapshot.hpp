// Test support: everything observable of a cache, to check the strong exception guarantee
// (a failing call leaves size, position, capacity, memory and contents exactly as they were).
#ifndef KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP
#define KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP

#include "catch.hpp"
#include "reference.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

namespace kvtest {

template <class Cache>
struct Snapshot {
  explicit Snapshot(const Cache& c)
      : size(c.size()), position(c.position()), capacity(c.capacity()),
        bytes(c.memory_bytes()), keys(c.keys()), values(c.values()) {}
  bool operator==(const Snapshot& o) const {
    return size == o.size && position == o.position && capacity == o.capacity &&
           bytes == o.bytes && equal(keys, o.keys) && equal(values, o.values);
  }
  Index size, position, capacity;
  std::size_t bytes;
  Tensor4<typename Cache::element_type> keys, values;
};

/// Requires that cache.update(k, v) throws std::invalid_argument whose message says what was
/// expected and names `received`, and that the cache is exactly as it was.
template <class Cache, class Tensor>
void require_invalid_update(Cache& cache, const Tensor& k, const Tensor& v,
                            const std::string& received) {
  const Snapshot<Cache> before(cache);
  REQUIRE_THROWS_AS(cache.update(k, v), std::invalid_argument);
  const std::string what = message_of([&] { cache.update(k, v); });
  CAPTURE(what);
  REQUIRE(contains(what, "expected"));
  REQUIRE(contains(what, received));
  REQUIRE(Snapshot<Cache>(cache) == before);
}

}  // namespace kvtest

#endif  // KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP
