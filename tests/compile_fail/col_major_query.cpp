// Must not compile (ctest compile_fail.col_major_query): a ColMajor query tensor stops attend()
// with one static_assert naming what it expects, not a page of overload errors.
#include <kvcache/kvcache.hpp>

int main() {
  kvcache::StaticKVCache<float> cache(1, 8, 2, 4);
  Eigen::Tensor<float, 4> q(1, 2, 1, 4);  // ColMajor, the Eigen default
  q.setZero();
  auto out = kvcache::attend(q, cache);
  return static_cast<int>(out.size());
}
