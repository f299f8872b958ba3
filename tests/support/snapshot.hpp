// Test support: everything observable of a cache, to check the strong exception guarantee
// (a failing call leaves size, position, capacity, memory and contents exactly as they were).
#ifndef KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP
#define KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP

#include "reference.hpp"

#include <cstddef>

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

}  // namespace kvtest

#endif  // KVCACHE_TESTS_SUPPORT_SNAPSHOT_HPP
