// The online-softmax state: merging states over disjoint key sets equals one pass over all.
#include "support/catch.hpp"
#include "support/reference.hpp"

#include <kvcache/detail/online_softmax.hpp>

#include <vector>

using kvcache::Index;
using kvcache::detail::SoftmaxState;

namespace {

/// A state over scores[begin, end) with values v[j] = (j, -j) (head_dim 2), built one score at
/// a time as the kernel does.
SoftmaxState<double> state_over(const std::vector<double>& scores, std::size_t begin,
                                std::size_t end, std::vector<double>& storage) {
  SoftmaxState<double> s;
  s.acc = storage.data();
  s.clear(2);
  for (std::size_t j = begin; j < end; ++j) {
    s.rescale(std::max(s.max, scores[j]), 2);
    const double w = std::exp(scores[j] - s.max);
    s.sum += w;
    s.acc[0] += w * double(j);
    s.acc[1] -= w * double(j);
  }
  return s;
}

}  // namespace

TEST_CASE("merging two partial states equals a single pass", "[softmax]") {
  const std::vector<double> scores = {3.0, -1.0, 40.0, 0.5, -200.0, 39.0, 2.0};
  const std::size_t split = GENERATE(0u, 1u, 3u, 6u, 7u);
  std::vector<double> a(2), b(2), whole(2);
  SoftmaxState<double> left = state_over(scores, 0, split, a);
  const SoftmaxState<double> right = state_over(scores, split, scores.size(), b);
  const SoftmaxState<double> all = state_over(scores, 0, scores.size(), whole);
  left.merge(right, 2);
  double got[2], want[2];
  left.finish(got, 2);
  all.finish(want, 2);
  REQUIRE(std::abs(got[0] - want[0]) < 1e-12);
  REQUIRE(std::abs(got[1] - want[1]) < 1e-12);

  // The same against a direct softmax.
  double total = 0, expect = 0;
  for (std::size_t j = 0; j < scores.size(); ++j) total += std::exp(scores[j] - 40.0);
  for (std::size_t j = 0; j < scores.size(); ++j) expect += std::exp(scores[j] - 40.0) / total * j;
  REQUIRE(std::abs(got[0] - expect) < 1e-12);
}

TEST_CASE("empty states merge without NaN and finish as zeros", "[softmax]") {
  std::vector<double> a(2), b(2);
  SoftmaxState<double> x, y;
  x.acc = a.data();
  y.acc = b.data();
  x.clear(2);
  y.clear(2);
  x.merge(y, 2);
  double out[2] = {1, 1};
  x.finish(out, 2);
  REQUIRE(out[0] == 0.0);
  REQUIRE(out[1] == 0.0);
  // An empty state merged into a full one changes nothing, and the other way round.
  const std::vector<double> scores = {1.0, 2.0};
  std::vector<double> c(2);
  SoftmaxState<double> full = state_over(scores, 0, 2, c);
  const double sum = full.sum;
  full.merge(y, 2);
  REQUIRE(full.sum == sum);
  y.merge(full, 2);
  REQUIRE(y.sum == sum);
  REQUIRE(y.max == full.max);
}
