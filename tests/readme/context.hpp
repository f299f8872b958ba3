// The context the README's C++ snippets assume (tensors of the shapes their comments give,
// filled with numbers in [-1, 1)): what tests/readme/snippets.cpp builds them from.
#ifndef KVCACHE_TESTS_README_CONTEXT_HPP
#define KVCACHE_TESTS_README_CONTEXT_HPP

#include <kvcache/kvcache.hpp>

#include <cstdint>
#include <fstream>
#include <memory>
#include <sstream>
#include <variant>
#include <vector>

namespace readme {

/// A [d0, d1, d2, d3] float tensor of numbers in [-1, 1) from a fixed seed.
inline kvcache::Tensor4<float> filled(kvcache::Index d0, kvcache::Index d1, kvcache::Index d2,
                                      kvcache::Index d3, unsigned seed = 1) {
  kvcache::Tensor4<float> x(d0, d1, d2, d3);
  std::uint32_t state = seed * 2654435761u + 1u;
  for (kvcache::Index i = 0; i < x.size(); ++i) {
    state = state * 1664525u + 1013904223u;
    x.data()[i] = static_cast<float>(state >> 8) / static_cast<float>(1u << 23) - 1.0f;
  }
  return x;
}

}  // namespace readme

#endif  // KVCACHE_TESTS_README_CONTEXT_HPP
