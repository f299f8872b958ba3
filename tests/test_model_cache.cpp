// ModelKVCache: one cache per layer - independence of the layers, update(layer, ...) equal to
// operator[], reset, memory_bytes, size, index errors, layers of mixed kinds (std::variant and
// a factory) and per-layer prefixes from freeze().
#include "support/catch.hpp"
#include "support/reference.hpp"

#include <kvcache/model_cache.hpp>
#include <kvcache/prefix_cache.hpp>
#include <kvcache/sliding_window_cache.hpp>

#include <variant>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::DynamicKVCache;
using kvcache::ModelKVCache;
using kvcache::PrefixKVCache;
using kvcache::SlidingWindowKVCache;
using kvcache::StaticKVCache;

namespace {

}  // namespace

TEMPLATE_TEST_CASE("layers are independent caches built from the same arguments", "[model]",
                   BHSD, BSHD) {
  using L = TestType;
  const Index num_layers = 4, batch = 2, max_len = 32, heads = 2, head_dim = 8;
  ModelKVCache<StaticKVCache<float, L>> model(num_layers, batch, max_len, heads, head_dim);
  REQUIRE(model.num_layers() == num_layers);
  for (const auto& layer : model) {
    REQUIRE(layer.capacity() == max_len);
    REQUIRE(layer.batch_size() == batch);
    REQUIRE(layer.size() == 0);
  }

  // Layer l gets l + 1 tokens of its own data.
  std::vector<Tensor4<float>> ks, vs;
  for (Index l = 0; l < num_layers; ++l) {
    ks.push_back(random_tensor<float, L>(batch, heads, l + 1, head_dim, unsigned(10 + 2 * l)));
    vs.push_back(random_tensor<float, L>(batch, heads, l + 1, head_dim, unsigned(11 + 2 * l)));
    model[l].update(ks.back(), vs.back());
  }
  const auto& read_only = model;
  for (Index l = 0; l < num_layers; ++l) {
    REQUIRE(read_only[l].size() == l + 1);
    REQUIRE(equal(read_only[l].keys(), ks[static_cast<std::size_t>(l)]));
    REQUIRE(equal(read_only[l].values(), vs[static_cast<std::size_t>(l)]));
  }
  REQUIRE(model.size() == 1);  // layer 0's
  REQUIRE(model.memory_bytes() == num_layers * model[0].memory_bytes());
  REQUIRE(model.memory_bytes() ==
          std::size_t(num_layers) * 2 * std::size_t(batch * heads * max_len * head_dim) *
              sizeof(float));

  model.reset();
  for (const auto& layer : model) REQUIRE(layer.size() == 0);
  REQUIRE(model.size() == 0);
  REQUIRE(model.memory_bytes() == num_layers * model[0].memory_bytes());  // storage kept
}

TEMPLATE_TEST_CASE("update(layer, k, v) is operator[](layer).update(k, v)", "[model]", BHSD,
                   BSHD) {
  using L = TestType;
  ModelKVCache<DynamicKVCache<float, L>> by_index(3, 1, 2, 16);
  ModelKVCache<DynamicKVCache<float, L>> by_update(3, 1, 2, 16);
  for (Index step = 0; step < 5; ++step)
    for (Index l = 0; l < 3; ++l) {
      const unsigned seed = unsigned(100 + 10 * step + 2 * l);
      const Tensor4<float> k = random_tensor<float, L>(1, 2, step + 1, 16, seed);
      const Tensor4<float> v = random_tensor<float, L>(1, 2, step + 1, 16, seed + 1);
      by_index[l].update(k, v);
      by_update.update(l, k, v);
    }
  const Tensor4<float> q = random_tensor<float, L>(1, 8, 3, 16, 7);
  for (Index l = 0; l < 3; ++l) {
    REQUIRE(by_update[l].size() == 15);
    REQUIRE(equal(by_update[l].keys(), by_index[l].keys()));
    REQUIRE(equal(by_update[l].values(), by_index[l].values()));
    REQUIRE(equal(kvcache::attend(q, by_update[l]), kvcache::attend(q, by_index[l])));
  }
  REQUIRE(by_update.size() == 15);
}

TEST_CASE("model cache errors", "[model][errors]") {
  REQUIRE_THROWS_AS(ModelKVCache<StaticKVCache<float>>(0, 1, 8, 2, 4), std::invalid_argument);
  REQUIRE_THROWS_AS(ModelKVCache<StaticKVCache<float>>(-2, 1, 8, 2, 4), std::invalid_argument);
  REQUIRE(contains(message_of([] { (void)ModelKVCache<StaticKVCache<float>>(-2, 1, 8, 2, 4); }),
                   "num_layers must be positive, got -2"));
  // A layer's own constructor errors come through.
  REQUIRE_THROWS_AS(ModelKVCache<StaticKVCache<float>>(2, 1, 0, 2, 4), std::invalid_argument);

  ModelKVCache<StaticKVCache<float>> model(3, 1, 4, 2, 4);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 2, 3, 4, 1);
  model.update(1, k, k);
  const auto& read_only = model;
  for (Index bad : {Index(-1), Index(3), Index(100)}) {
    CAPTURE(bad);
    REQUIRE_THROWS_AS(model[bad], std::out_of_range);
    REQUIRE_THROWS_AS(read_only[bad], std::out_of_range);
    REQUIRE_THROWS_AS(model.update(bad, k, k), std::out_of_range);
    const std::string what = message_of([&] { model.update(bad, k, k); });
    CAPTURE(what);
    REQUIRE(contains(what, "layer " + std::to_string(bad)));
    REQUIRE(contains(what, "< 3"));
  }
  // Shape and capacity errors are the layer's, with the layer unchanged.
  const Tensor4<float> before = model[1].keys();
  REQUIRE_THROWS_AS(model.update(1, random_tensor<float, BHSD>(1, 3, 1, 4, 2),
                                 random_tensor<float, BHSD>(1, 3, 1, 4, 2)),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(model.update(1, k, k), std::length_error);
  REQUIRE(model[1].size() == 3);
  REQUIRE(equal(model[1].keys(), before));
  for (Index l : {Index(0), Index(2)}) REQUIRE(model[l].size() == 0);
}

TEMPLATE_TEST_CASE("mixed kinds per layer: sliding-window layers interleaved with full layers",
                   "[model]", BHSD, BSHD) {
  using L = TestType;
  using Full = StaticKVCache<float, L>;
  using Sliding = SlidingWindowKVCache<float, L>;
  using Layer = std::variant<Full, Sliding>;
  const Index num_layers = 4, heads = 2, head_dim = 8, window = 5, sinks = 2, total = 24;
  // Gemma 2 style: even layers local (sliding window), odd layers global.
  ModelKVCache<Layer> model(num_layers, [&](Index layer) -> Layer {
    if (layer % 2 == 0) return Sliding(1, window, heads, head_dim, sinks);
    return Full(1, total, heads, head_dim);
  });
  REQUIRE(model.num_layers() == num_layers);
  REQUIRE(std::holds_alternative<Sliding>(model[0]));
  REQUIRE(std::holds_alternative<Full>(model[1]));
  REQUIRE(model.memory_bytes() ==
          2 * std::get<Sliding>(model[0]).memory_bytes() + 2 * std::get<Full>(model[1]).memory_bytes());

  std::vector<Tensor4<float>> ks, vs;
  for (Index l = 0; l < num_layers; ++l) {
    ks.push_back(random_tensor<float, L>(1, heads, total, head_dim, unsigned(20 + 2 * l)));
    vs.push_back(random_tensor<float, L>(1, heads, total, head_dim, unsigned(21 + 2 * l)));
  }
  for (Index step = 0; step < total; ++step) {
    const Tensor4<float> q = random_tensor<float, L>(1, 2 * heads, 1, head_dim, unsigned(50 + step));
    for (Index l = 0; l < num_layers; ++l) {
      const auto li = static_cast<std::size_t>(l);
      model.update(l, slice_seq<L>(ks[li], step, 1), slice_seq<L>(vs[li], step, 1));
      ReferenceRules rules;
      if (l % 2 == 0) {
        rules.cache_window = window;
        rules.num_sink_tokens = sinks;
      }
      const auto want = reference_attention<L>(q, slice_seq<L>(ks[li], 0, step + 1),
                                               slice_seq<L>(vs[li], 0, step + 1),
                                               iota_positions(step + 1), step, rules);
      const Tensor4<float> got = kvcache::attend(q, model[l]);  // the variant overload
      REQUIRE(max_abs_diff(got, want) < tolerance<float>());
      REQUIRE(equal(got, std::visit([&](const auto& c) { return kvcache::attend(q, c); },
                                    model[l])));
    }
    REQUIRE(model.size() == std::min(step + 1, sinks + window));  // layer 0 is a sliding one
  }
  REQUIRE(std::get<Full>(model[1]).size() == total);
  model.reset();
  for (Index l = 0; l < num_layers; ++l)
    REQUIRE(std::visit([](const auto& c) { return c.position(); }, model[l]) == 0);
}

TEST_CASE("mixed static and dynamic layers", "[model]") {
  using Layer = std::variant<StaticKVCache<double>, DynamicKVCache<double>>;
  ModelKVCache<Layer> model(2, [](Index layer) -> Layer {
    if (layer == 0) return StaticKVCache<double>(1, 10, 1, 4);
    return DynamicKVCache<double>(1, 1, 4);
  });
  const Tensor4<double> k = random_tensor<double, BHSD>(1, 1, 10, 4, 1);
  model.update(0, k, k);
  model.update(1, k, k);
  model.update(1, k, k);  // the dynamic layer grows
  REQUIRE_THROWS_AS(model.update(0, k, k), std::length_error);
  REQUIRE(std::get<StaticKVCache<double>>(model[0]).size() == 10);
  REQUIRE(std::get<DynamicKVCache<double>>(model[1]).size() == 20);
  const Tensor4<double> q = random_tensor<double, BHSD>(1, 2, 1, 4, 2);
  REQUIRE(equal(kvcache::attend(q, model[0]),
                kvcache::attend(q, std::get<StaticKVCache<double>>(model[0]))));
}

TEMPLATE_TEST_CASE("per-layer prefixes: freeze() a prompt model, then prefix-cache sequences",
                   "[model][prefix]", BHSD, BSHD) {
  using L = TestType;
  const Index num_layers = 3, heads = 2, head_dim = 8, prompt_len = 20, new_len = 6;
  ModelKVCache<StaticKVCache<float, L>> prompt(num_layers, 1, 64, heads, head_dim);
  std::vector<Tensor4<float>> ks, vs;
  for (Index l = 0; l < num_layers; ++l) {
    ks.push_back(random_tensor<float, L>(1, heads, prompt_len + new_len, head_dim, unsigned(2 * l)));
    vs.push_back(random_tensor<float, L>(1, heads, prompt_len + new_len, head_dim, unsigned(2 * l + 1)));
    prompt.update(l, slice_seq<L>(ks.back(), 0, prompt_len), slice_seq<L>(vs.back(), 0, prompt_len));
  }
  const auto frozen = prompt.freeze();
  REQUIRE(frozen.size() == std::size_t(num_layers));
  prompt.reset();  // the snapshots are independent of the prompt model

  ModelKVCache<PrefixKVCache<float, L>> sequence(
      num_layers, [&](Index l) { return PrefixKVCache<float, L>(frozen[std::size_t(l)], new_len); });
  REQUIRE(sequence.size() == prompt_len);
  REQUIRE(sequence.memory_bytes() ==
          std::size_t(num_layers) * 2 * std::size_t(heads * new_len * head_dim) * sizeof(float));
  const Tensor4<float> q = random_tensor<float, L>(1, 2 * heads, 2, head_dim, 99);
  for (Index l = 0; l < num_layers; ++l) {
    const auto li = static_cast<std::size_t>(l);
    sequence.update(l, slice_seq<L>(ks[li], prompt_len, new_len),
                    slice_seq<L>(vs[li], prompt_len, new_len));
    const auto want = reference_attention<L>(q, ks[li], vs[li], iota_positions(prompt_len + new_len),
                                             prompt_len + new_len - 2, {});
    REQUIRE(max_abs_diff(kvcache::attend(q, sequence[l]), want) < tolerance<float>());
  }
  sequence.reset();  // back to the prefixes
  REQUIRE(sequence.size() == prompt_len);
  for (Index l = 0; l < num_layers; ++l) REQUIRE(sequence[l].size() == prompt_len);
}
