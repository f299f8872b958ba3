// Soak: ten million tokens streamed one at a time through a SlidingWindowKVCache<float> with
// attention sinks. memory_bytes() must not change (the ring never grows for one-token updates)
// and size() must stay at sinks + window; at checkpoints (every million tokens, and around the
// first fills and wraps) keys()/values() must be exactly the sinks and the last window, and a
// decode attend() must match the naive double reference over exactly those tokens.
//
// Token values are a hash of (position, k or v, head, channel), so the reference rebuilds any
// position's token without the stream being stored. ctest label "soak": `ctest -L soak`
// runs it alone (a few seconds in Release).
#include "support/catch.hpp"
#include "support/reference.hpp"

#include <cstdint>
#include <vector>

using namespace kvtest;
using kvcache::SlidingWindowKVCache;

namespace {

constexpr Index kTokens = 10'000'000;
constexpr Index kHeads = 2, kQueryHeads = 4, kHeadDim = 8, kWindow = 256, kSinks = 4;

/// The element of channel c of head h of the key (which 0) or value (which 1) of the token at
/// absolute position p: uniform in [-1, 1), a multiple of 2^-23, so exact in float.
float token_element(Index p, int which, Index h, Index c) {
  std::uint64_t z = static_cast<std::uint64_t>(((p * 2 + which) * kHeads + h) * kHeadDim + c);
  z += 0x9e3779b97f4a7c15ULL;  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) / double(1 << 23) - 1.0);
}

/// Writes the key or value of the tokens at `positions` into a (1, kHeads, n, kHeadDim) tensor.
Tensor4<float> tokens_at(const std::vector<Index>& positions, int which) {
  Tensor4<float> out(1, kHeads, Index(positions.size()), kHeadDim);
  for (std::size_t j = 0; j < positions.size(); ++j)
    for (Index h = 0; h < kHeads; ++h)
      for (Index c = 0; c < kHeadDim; ++c) out(0, h, Index(j), c) = token_element(positions[j], which, h, c);
  return out;
}

/// Checks the cache after `appended` tokens against the tokens it must hold.
void check_checkpoint(const SlidingWindowKVCache<float>& cache, Index appended, unsigned seed) {
  CAPTURE(appended);
  std::vector<Index> held = iota_positions(std::min(appended, kSinks));
  for (Index p = std::max(kSinks, appended - kWindow); p < appended; ++p) held.push_back(p);
  const Tensor4<float> k = tokens_at(held, 0), v = tokens_at(held, 1);
  REQUIRE(cache.position() == appended);
  REQUIRE(cache.size() == Index(held.size()));
  REQUIRE(equal(cache.keys(), k));
  REQUIRE(equal(cache.values(), v));
  ReferenceRules rules;
  rules.cache_window = kWindow;
  rules.num_sink_tokens = kSinks;
  const Tensor4<float> q = random_tensor<float, BHSD>(1, kQueryHeads, 1, kHeadDim, seed);
  const auto want = reference_attention<BHSD>(q, k, v, held, appended - 1, rules);
  REQUIRE(max_abs_diff(kvcache::attend(q, cache), want) < tolerance<float>());
  // Two query rows would need the key just evicted (once anything was evicted).
  if (appended > kSinks + kWindow) {
    const Tensor4<float> q2 = random_tensor<float, BHSD>(1, kQueryHeads, 2, kHeadDim, seed);
    REQUIRE_THROWS_AS(kvcache::attend(q2, cache), std::invalid_argument);
  }
}

}  // namespace

TEST_CASE("10 million tokens one at a time through a sliding window with sinks", "[soak]") {
  SlidingWindowKVCache<float> cache(1, kWindow, kHeads, kHeadDim, kSinks);
  const std::size_t bytes = cache.memory_bytes();
  REQUIRE(bytes == std::size_t(2 * kHeads * kHeadDim * (kSinks + kWindow)) * sizeof(float));
  const std::vector<Index> checkpoints = {1,           kSinks,      kSinks + 1,
                                          kSinks + kWindow,         kSinks + kWindow + 1,
                                          2 * kWindow + kSinks + 7, 1'000'000,
                                          2'000'000,   3'000'000,   4'000'000,
                                          5'000'000,   6'000'000,   7'000'000,
                                          8'000'000,   9'000'000,   kTokens};
  std::size_t next_checkpoint = 0;
  Tensor4<float> k(1, kHeads, 1, kHeadDim), v(1, kHeads, 1, kHeadDim);
  // Counted, not REQUIREd per token: ten million assertions would dominate the run time.
  Index memory_changes = 0, wrong_sizes = 0;
  for (Index p = 0; p < kTokens; ++p) {
    for (Index h = 0; h < kHeads; ++h)
      for (Index c = 0; c < kHeadDim; ++c) {
        k(0, h, 0, c) = token_element(p, 0, h, c);
        v(0, h, 0, c) = token_element(p, 1, h, c);
      }
    cache.update(k, v);
    memory_changes += cache.memory_bytes() != bytes;
    wrong_sizes += cache.size() != std::min(p + 1, kSinks + kWindow);
    if (p + 1 == checkpoints[next_checkpoint]) {
      check_checkpoint(cache, p + 1, unsigned(next_checkpoint));
      ++next_checkpoint;
    }
  }
  REQUIRE(next_checkpoint == checkpoints.size());
  REQUIRE(memory_changes == 0);
  REQUIRE(wrong_sizes == 0);
  REQUIRE(cache.memory_bytes() == bytes);
}
