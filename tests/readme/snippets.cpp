// The README's C++ snippets, compiled and run (ctest readme.snippet_<n> runs `kvcache_readme_snippets
// <n>`). tests/CMakeLists.txt extracts the n-th ```cpp block of README.md into
// readme_snippet_<n>.inc; each function below declares the context its snippet assumes (tensors
// of the shapes its comments give, filled with numbers in [-1, 1)) and includes it, so a snippet
// that stops compiling, or throws when run as written, fails the tests. A snippet added to the
// README without a function here fails the configure step.
#include "context.hpp"

#include <cstdio>
#include <cstdlib>

// README snippet 1 (Quick start): a complete program body.
int snippet_1() {
#include "readme_snippet_1.inc"
  return out.dimension(2) == 1 ? 0 : 1;
}

// README snippet 2 (sliding window): k, v of 16 tokens, q of 16 rows.
int snippet_2() {
  using namespace kvcache;
  const Tensor4<float> k = readme::filled(1, 8, 16, 128, 1), v = readme::filled(1, 8, 16, 128, 2);
  const Tensor4<float> q = readme::filled(1, 32, 16, 128, 3);
  {
#include "readme_snippet_2.inc"
    return out.dimension(2) == 16 ? 0 : 1;
  }
}

// README snippet 3 (quantized): k, v of 16 tokens, q of 16 rows.
int snippet_3() {
  using namespace kvcache;
  const Tensor4<float> k = readme::filled(1, 8, 16, 128, 1), v = readme::filled(1, 8, 16, 128, 2);
  const Tensor4<float> q = readme::filled(1, 32, 16, 128, 3);
  {
#include "readme_snippet_3.inc"
    return out.dimension(2) == 16 ? 0 : 1;
  }
}

// README snippet 4 (shared prefix): a 24-token system prompt, two continuations of 3 tokens.
int snippet_4() {
  using namespace kvcache;
  const Tensor4<float> k_sys = readme::filled(1, 8, 24, 128, 1), v_sys = readme::filled(1, 8, 24, 128, 2);
  const Tensor4<float> k_a = readme::filled(1, 8, 3, 128, 3), v_a = readme::filled(1, 8, 3, 128, 4);
  const Tensor4<float> k_b = readme::filled(1, 8, 3, 128, 5), v_b = readme::filled(1, 8, 3, 128, 6);
  const Tensor4<float> q_a = readme::filled(1, 32, 3, 128, 7), q_b = readme::filled(1, 32, 3, 128, 8);
  {
#include "readme_snippet_4.inc"
    return out_a.dimension(2) == 3 && out_b.dimension(2) == 3 ? 0 : 1;
  }
}

// README snippet 5 (per layer): k, v of 16 tokens, q of 16 rows, a layer index.
int snippet_5() {
  using namespace kvcache;
  const Tensor4<float> k = readme::filled(1, 8, 16, 128, 1), v = readme::filled(1, 8, 16, 128, 2);
  const Tensor4<float> q = readme::filled(1, 32, 16, 128, 3);
  const Index layer = 3;
  {
#include "readme_snippet_5.inc"
  }
  return 0;
}

// README snippet 6 (paged pool): a 40-token prompt and its keys/values per layer, q packing the
int snippet_6() {
  using namespace kvcache;
  const Index prompt_length = 40, layer = 5;
  std::vector<std::int32_t> prompt_ids;
  for (Index i = 0; i < prompt_length; ++i) prompt_ids.push_back(static_cast<std::int32_t>(100 + i));
  std::vector<Tensor4<float>> k_rest, v_rest;
  for (Index l = 0; l < 32; ++l) {
    k_rest.push_back(readme::filled(1, 8, prompt_length, 128, static_cast<unsigned>(2 * l + 1)));
    v_rest.push_back(readme::filled(1, 8, prompt_length, 128, static_cast<unsigned>(2 * l + 2)));
  }
  const Tensor4<float> q = readme::filled(1, 32, prompt_length + 1, 128, 99);
  Tensor4<float> out(q.dimensions());
  AttendWorkspace workspace;
  {
#include "readme_snippet_6.inc"
  }
  return 0;
}

// README snippet 7 (a decode loop into a caller's output): a static cache, one-token k, v, q.
int snippet_7() {
  kvcache::StaticKVCache<float> cache(1, 64, 8, 128);
  const kvcache::Tensor4<float> k = readme::filled(1, 8, 1, 128, 1), v = readme::filled(1, 8, 1, 128, 2);
  const kvcache::Tensor4<float> q = readme::filled(1, 32, 1, 128, 3);
  kvcache::AttendOptions options;
  const int n = 4;
  {
#include "readme_snippet_7.inc"
  }
  return cache.size() == 4 ? 0 : 1;
}

// README snippet 8 (persistence): a cache to save, and streams holding the records the other
int snippet_8() {
  using namespace kvcache;
  StaticKVCache<float> cache(1, 32, 8, 128);
  cache.update(readme::filled(1, 8, 5, 128, 1), readme::filled(1, 8, 5, 128, 2));
  std::stringstream in2, in3, in4;
  cache.save(in2);
  QuantConfig config;
  ModelKVCache<Int4KVCache<float>>(2, 1, 64, 8, 128, config).save(in3);
  using Mixed = ModelKVCache<std::variant<StaticKVCache<float>, SlidingWindowKVCache<float>>>;
  Mixed(2, [](Index layer) -> std::variant<StaticKVCache<float>, SlidingWindowKVCache<float>> {
    if (layer == 0) return StaticKVCache<float>(1, 16, 8, 128);
    return SlidingWindowKVCache<float>(1, 8, 8, 128);
  }).save(in4);
  {
#include "readme_snippet_8.inc"
    return back.size() == 5 && big.size() == 5 ? 0 : 1;
  }
}

int main(int argc, char** argv) {
  using Snippet = int (*)();
  const Snippet snippets[] = {snippet_1, snippet_2, snippet_3, snippet_4,
                              snippet_5, snippet_6, snippet_7, snippet_8};
  const int n = argc > 1 ? std::atoi(argv[1]) : 0;
  if (n < 1 || n > static_cast<int>(sizeof snippets / sizeof snippets[0])) {
    std::fprintf(stderr, "usage: kvcache_readme_snippets <1..8>\n");
    return 2;
  }
  return snippets[n - 1]();
}
