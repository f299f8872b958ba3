// PagedKVCache: random operation sequences (add, add by tokens, fork, append, crop, remove,
// publish, exhaustion) checked against a model in which a position's keys and values are a
// function of the token ids up to it (as in a real model); the ragged attend against the
// double reference and, bit for bit, against a DynamicKVCache holding the same positions; the
// strong guarantee on every error; no allocation on the update and attend path; concurrent
// attends over shared blocks.
#include "support/catch.hpp"
#include "support/reference.hpp"

#include "support/counting_allocator.hpp"

#include <map>
#include <random>
#include <set>
#include <thread>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::AttendWorkspace;
using kvcache::OutOfBlocks;
using kvcache::PagedConfig;
using kvcache::PagedKVCache;

namespace {

/// A number in [-1, 1) from a 64-bit key (splitmix64).
double unit_from(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<double>(x >> 11) / static_cast<double>(1ull << 52) - 1.0;
}

/// The model: the keys and values of position p in a layer depend on the token ids [0, p] (a
/// hash chain) and nothing else, so a sequence that reuses a published prefix must read
/// exactly the numbers its own prefill would have written.
template <class T, class L>
struct Model {
  Index num_layers, num_heads, head_dim;

  /// Keys (or values) of positions [begin, end) of `tokens` in `layer`: [1, heads, n, d] in L.
  Tensor4<T> rows(const std::vector<std::int32_t>& tokens, Index begin, Index end, Index layer,
                  bool values) const {
    Tensor4<T> x(dims<L>(1, num_heads, end - begin, head_dim));
    std::uint64_t chain = 1469598103934665603ull;
    for (Index p = 0; p < end; ++p) {
      chain = (chain ^ static_cast<std::uint32_t>(tokens[static_cast<std::size_t>(p)])) *
              1099511628211ull;
      if (p < begin) continue;
      for (Index h = 0; h < num_heads; ++h)
        for (Index c = 0; c < head_dim; ++c) {
          const std::uint64_t key = chain ^ (static_cast<std::uint64_t>(layer) << 56) ^
                                    (static_cast<std::uint64_t>(h) << 40) ^
                                    (static_cast<std::uint64_t>(c) << 20) ^ (values ? 7u : 3u);
          at<L>(x, 0, h, p - begin, c) = static_cast<T>(static_cast<float>(unit_from(key)));
        }
    }
    return x;
  }
};

/// What the model knows of a live sequence: its token ids and, per layer, how many of them the
/// pool holds (layers can differ after an update ran out of blocks part way).
struct ModelSequence {
  std::vector<std::int32_t> tokens;
  std::vector<Index> sizes;
  std::vector<std::int32_t> planned = {};  ///< the ids appends take first (a shared prompt)
  Index smallest() const { return *std::min_element(sizes.begin(), sizes.end()); }
  Index largest() const { return *std::max_element(sizes.begin(), sizes.end()); }
};

/// Everything observable of a pool, for the strong guarantee.
template <class T>
struct PoolSnapshot {
  std::vector<std::int64_t> ids;
  std::vector<Index> sizes;
  std::vector<Tensor4<T>> tensors;
  Index free_blocks, published, evictable;

  template <class Pool>
  explicit PoolSnapshot(const Pool& pool)
      : ids(pool.sequences()),
        free_blocks(pool.free_blocks()),
        published(pool.published_blocks()),
        evictable(pool.evictable_blocks()) {
    for (auto s : ids)
      for (Index layer = 0; layer < pool.num_layers(); ++layer) {
        sizes.push_back(pool.size(s, layer));
        tensors.push_back(pool.keys(layer, s));
        tensors.push_back(pool.values(layer, s));
      }
  }
  bool operator==(const PoolSnapshot& o) const {
    if (ids != o.ids || sizes != o.sizes || free_blocks != o.free_blocks ||
        published != o.published || evictable != o.evictable)
      return false;
    for (std::size_t i = 0; i < tensors.size(); ++i)
      if (!equal(tensors[i], o.tensors[i])) return false;
    return true;
  }
};

/// One row of a key mask: the row of sequence i, for the reference (batch row 0).
Mask mask_row(const Mask& m, Index row, Index columns) {
  Mask r(1, columns);
  for (Index p = 0; p < columns; ++p) r(0, p) = m(row, p);
  return r;
}

/// The ragged attend over `ids` against the double reference and, bit for bit, against a
/// DynamicKVCache per sequence holding the model's positions.
template <class T, class L, class Pool>
void check_ragged_attend(const Pool& pool, const Model<T, L>& model,
                         const std::map<std::int64_t, ModelSequence>& live,
                         const std::vector<std::int64_t>& ids, const std::vector<Index>& q_lens,
                         Index layer, Index q_heads, const AttendOptions& options,
                         unsigned seed) {
  Index total = 0, longest = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    total += q_lens[i];
    longest = std::max(longest, pool.size(ids[i], layer));
  }
  const Tensor4<T> q = random_tensor<T, L>(1, q_heads, total, model.head_dim, seed);
  Tensor4<T> out(q.dimensions());
  out.setConstant(T(9));
  AttendWorkspace workspace;
  kvcache::attend(q, pool, layer, ids, q_lens, out, workspace, options);
  Index offset = 0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const ModelSequence& m = live.at(ids[i]);
    const Index size = m.sizes[static_cast<std::size_t>(layer)];
    const Tensor4<T> k = model.rows(m.tokens, 0, size, layer, false);
    const Tensor4<T> v = model.rows(m.tokens, 0, size, layer, true);
    const Tensor4<T> qi = slice_seq<L>(q, offset, q_lens[i]);
    const Tensor4<T> got = slice_seq<L>(out, offset, q_lens[i]);
    AttendOptions one = options;
    Mask row;
    if (options.key_mask != nullptr) {
      row = mask_row(*options.key_mask, static_cast<Index>(i), size);
      one.key_mask = &row;
    }
    const auto want = reference_attention<L>(qi, k, v, iota_positions(size), size - q_lens[i],
                                             rules_from(one));
    INFO("sequence " << ids[i] << " size " << size << " q_len " << q_lens[i]);
    REQUIRE(max_abs_diff(got, want) <= tolerance<T>());
    kvcache::DynamicKVCache<T, L> dynamic(1, model.num_heads, model.head_dim);
    dynamic.update(k, v);
    one.device = nullptr;
    REQUIRE(equal(got, kvcache::attend(qi, dynamic, one)));
    offset += q_lens[i];
  }
}

/// Random operations on a pool; after each, every live sequence's keys and values equal the
/// model's, and every error left the pool as it was. exact: the pool never evicts (large
/// enough), so add_sequence(tokens) must find exactly the longest published prefix.
template <class T, class L>
void random_operations(const PagedConfig& config, Index q_heads, unsigned seed, int steps,
                       bool exact) {
  PagedKVCache<T, L> pool(config);
  const Model<T, L> model{config.num_layers, config.num_heads, config.head_dim};
  const Index bs = config.block_size;
  std::mt19937 rng(seed);
  auto uniform = [&](Index low, Index high) {
    return std::uniform_int_distribution<Index>(low, high)(rng);
  };
  std::map<std::int64_t, ModelSequence> live;
  std::set<std::vector<std::int32_t>> published;  // block-aligned token prefixes
  // A few shared prompts, so that prefixes repeat.
  std::vector<std::vector<std::int32_t>> prompts(3);
  for (auto& p : prompts)
    for (Index i = 0; i < 3 * bs + 1; ++i) p.push_back(static_cast<std::int32_t>(uniform(0, 50)));
  int out_of_blocks = 0, matched_positions = 0;

  auto expect_unchanged_after = [&](auto&& op) {
    const PoolSnapshot<T> before(pool);
    bool threw = false;
    try {
      op();
    } catch (const OutOfBlocks&) {
      threw = true;
    }
    if (threw) {
      ++out_of_blocks;
      REQUIRE(PoolSnapshot<T>(pool) == before);
    }
    return threw;
  };
  auto random_live = [&]() {
    auto it = live.begin();
    std::advance(it, uniform(0, static_cast<Index>(live.size()) - 1));
    return it->first;
  };

  for (int step = 0; step < steps; ++step) {
    const Index op = live.empty() ? 0 : uniform(0, 9);
    INFO("step " << step << " op " << op);
    if (op == 0) {
      const auto id = pool.add_sequence();
      live[id] = ModelSequence{{}, std::vector<Index>(static_cast<std::size_t>(config.num_layers), 0),
                               prompts[static_cast<std::size_t>(uniform(0, 2))]};
    } else if (op == 1) {
      std::vector<std::int32_t> tokens = prompts[static_cast<std::size_t>(uniform(0, 2))];
      tokens.resize(static_cast<std::size_t>(uniform(0, static_cast<Index>(tokens.size()))));
      for (Index extra = uniform(0, bs); extra > 0; --extra)
        tokens.push_back(static_cast<std::int32_t>(uniform(0, 50)));
      const auto match = pool.add_sequence(tokens);
      REQUIRE(match.cached % bs == 0);
      REQUIRE(match.cached <= static_cast<Index>(tokens.size()));
      if (exact) {
        Index want = 0;
        while (want + bs <= static_cast<Index>(tokens.size()) &&
               published.count(std::vector<std::int32_t>(tokens.begin(), tokens.begin() + want + bs)))
          want += bs;
        REQUIRE(match.cached == want);
      }
      matched_positions += static_cast<int>(match.cached);
      const std::vector<std::int32_t> planned = tokens;
      tokens.resize(static_cast<std::size_t>(match.cached));
      live[match.sequence] = ModelSequence{
          tokens, std::vector<Index>(static_cast<std::size_t>(config.num_layers), match.cached),
          planned};
    } else if (op == 2) {
      const auto parent = random_live();
      const auto child = pool.fork(parent);
      live[child] = live[parent];
    } else if (op <= 5) {  // append to every layer (the layers behind first catch up)
      const auto s = random_live();
      ModelSequence& m = live[s];
      const Index target = m.largest() + uniform(1, 2 * bs + 1);
      while (static_cast<Index>(m.tokens.size()) < target) {
        const std::size_t next = m.tokens.size();
        const bool as_planned = next < m.planned.size() &&
                                std::equal(m.tokens.begin(), m.tokens.end(), m.planned.begin());
        m.tokens.push_back(as_planned ? m.planned[next] : static_cast<std::int32_t>(uniform(0, 50)));
      }
      for (Index layer = 0; layer < config.num_layers; ++layer) {
        Index& size = m.sizes[static_cast<std::size_t>(layer)];
        const Tensor4<T> k = model.rows(m.tokens, size, target, layer, false);
        const Tensor4<T> v = model.rows(m.tokens, size, target, layer, true);
        if (expect_unchanged_after([&] { pool.update(layer, s, k, v); })) break;
        size = target;
      }
      m.tokens.resize(static_cast<std::size_t>(m.largest()));
    } else if (op == 6) {
      const auto s = random_live();
      ModelSequence& m = live[s];
      const Index n = uniform(0, m.smallest());
      pool.crop(s, n);
      m.tokens.resize(static_cast<std::size_t>(n));
      for (Index& size : m.sizes) size = n;
    } else if (op == 7) {
      const auto s = random_live();
      pool.remove_sequence(s);
      live.erase(s);
    } else if (op == 8) {
      const auto s = random_live();
      const ModelSequence& m = live[s];
      const std::vector<std::int32_t> tokens(m.tokens.begin(),
                                             m.tokens.begin() + uniform(0, m.smallest()));
      pool.cache_prefix(s, tokens);
      for (Index n = bs; n <= static_cast<Index>(tokens.size()); n += bs)
        published.insert(std::vector<std::int32_t>(tokens.begin(), tokens.begin() + n));
    } else {  // a ragged attend over some sequences of one layer
      std::vector<std::int64_t> ids;
      std::vector<Index> q_lens;
      const Index layer = uniform(0, config.num_layers - 1);
      for (Index n = uniform(1, 4); n > 0; --n) {
        const auto s = random_live();
        ids.push_back(s);
        const Index size = live[s].sizes[static_cast<std::size_t>(layer)];
        q_lens.push_back(uniform(0, std::min<Index>(size, 2 * bs + 1)));
      }
      AttendOptions options;
      options.causal = uniform(0, 3) != 0;
      if (uniform(0, 2) == 0) options.window = uniform(1, 3 * bs);
      if (uniform(0, 3) == 0) options.softcap = 5.0f;
      Index longest = 0;
      for (auto s : ids) longest = std::max(longest, live[s].sizes[static_cast<std::size_t>(layer)]);
      Mask mask(static_cast<Index>(ids.size()), longest + 3);
      for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = uniform(0, 4) != 0;
      if (uniform(0, 2) == 0) options.key_mask = &mask;
      check_ragged_attend<T, L>(pool, model, live, ids, q_lens, layer, q_heads, options,
                                seed + static_cast<unsigned>(step));
    }
    // Every live sequence holds the model's numbers; the counts add up.
    REQUIRE(pool.sequences().size() == live.size());
    for (const auto& [id, m] : live)
      for (Index layer = 0; layer < config.num_layers; ++layer) {
        const Index size = m.sizes[static_cast<std::size_t>(layer)];
        REQUIRE(pool.size(id, layer) == size);
        REQUIRE(equal(pool.keys(layer, id), model.rows(m.tokens, 0, size, layer, false)));
        REQUIRE(equal(pool.values(layer, id), model.rows(m.tokens, 0, size, layer, true)));
        REQUIRE(pool.wasted_positions(layer) <= static_cast<Index>(live.size()) * (bs - 1));
      }
    if (exact) REQUIRE(pool.published_blocks() == static_cast<Index>(published.size()));
    REQUIRE(pool.free_blocks() >= 0);
    REQUIRE(pool.free_blocks() + pool.evictable_blocks() <= pool.num_blocks());
  }
  if (exact) CHECK(matched_positions > 0);
  if (!exact) CHECK(out_of_blocks > 0);
}

}  // namespace

TEMPLATE_TEST_CASE("a paged pool under random operations holds what its sequences wrote",
                   "[paged]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::bfloat16, BHSD>), (Case<double, BSHD>),
                   (Case<Eigen::half, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  PagedConfig config;
  config.num_layers = 2;
  config.num_heads = 2;
  SECTION("a large pool (nothing evicted): prefix matches are exact, GQA 2") {
    config.num_blocks = 512;
    config.block_size = 4;
    config.head_dim = 8;
    random_operations<T, L>(config, 4, 11, 150, true);
  }
  SECTION("a small pool: eviction and exhaustion, odd head_dim, block_size 3") {
    config.num_blocks = 24;
    config.block_size = 3;
    config.head_dim = 5;
    random_operations<T, L>(config, 2, 12, 200, false);
  }
  SECTION("block_size 1 and one head") {
    config.num_blocks = 200;
    config.block_size = 1;
    config.num_heads = 1;
    config.head_dim = 3;
    random_operations<T, L>(config, 3, 13, 100, true);
  }
}

TEST_CASE("a long ragged batch splits and still matches a DynamicKVCache bit for bit",
          "[paged]") {
  PagedConfig config;
  config.num_blocks = 2 * 5000 / 16 + 8;
  config.block_size = 16;
  config.num_heads = 2;
  config.head_dim = 16;
  PagedKVCache<float> pool(config);
  const Model<float, BHSD> model{1, 2, 16};
  std::map<std::int64_t, ModelSequence> live;
  std::mt19937 rng(5);
  for (Index length : {Index(4500), Index(37)}) {
    const auto s = pool.add_sequence();
    ModelSequence m{{}, {length}};
    for (Index i = 0; i < length; ++i) m.tokens.push_back(static_cast<std::int32_t>(rng() % 100));
    pool.update(0, s, model.rows(m.tokens, 0, length, 0, false),
                model.rows(m.tokens, 0, length, 0, true));
    live[s] = m;
  }
  const std::vector<std::int64_t> ids = pool.sequences();
  AttendOptions options;
  check_ragged_attend<float, BHSD>(pool, model, live, ids, {1, 5}, 0, 4, options, 3);
  Eigen::ThreadPool threads(2);
  Eigen::ThreadPoolDevice device(&threads, 2);
  options.device = &device;
  check_ragged_attend<float, BHSD>(pool, model, live, ids, {3, 0}, 0, 4, options, 4);
}

TEST_CASE("fork shares blocks and copies a shared block only on write", "[paged]") {
  PagedConfig config;
  config.num_blocks = 6;
  config.block_size = 4;
  config.num_heads = 1;
  config.head_dim = 2;
  PagedKVCache<float> pool(config);
  const auto a = pool.add_sequence();
  Tensor4<float> six(1, 1, 6, 2), one(1, 1, 1, 2);
  six.setConstant(1.0f);
  one.setConstant(2.0f);
  pool.update(0, a, six, six);
  REQUIRE(pool.free_blocks() == 4);
  const auto b = pool.fork(a);
  REQUIRE(pool.free_blocks() == 4);  // shared, nothing copied
  pool.update(0, b, one, one);       // b writes into the shared partly filled block: a copy
  REQUIRE(pool.free_blocks() == 3);
  REQUIRE(pool.keys(0, a)(0, 0, 5, 0) == 1.0f);
  REQUIRE(pool.size(a) == 6);
  REQUIRE(pool.keys(0, b)(0, 0, 6, 0) == 2.0f);
  pool.update(0, a, one, one);  // a's block is its own again: written in place
  REQUIRE(pool.free_blocks() == 3);
  pool.remove_sequence(a);
  REQUIRE(pool.free_blocks() == 4);  // the shared first block stays with b
  pool.remove_sequence(b);
  REQUIRE(pool.free_blocks() == 6);
}

TEST_CASE("published prefixes outlive their sequence and go least recently used first",
          "[paged]") {
  PagedConfig config;
  config.num_blocks = 4;
  config.block_size = 2;
  config.num_heads = 1;
  config.head_dim = 2;
  PagedKVCache<float> pool(config);
  Tensor4<float> two(1, 1, 2, 2);
  two.setConstant(0.5f);
  auto publish = [&](std::vector<std::int32_t> tokens) {
    const auto s = pool.add_sequence();
    pool.update(0, s, two, two);
    pool.cache_prefix(s, tokens);
    pool.remove_sequence(s);
  };
  publish({1, 2});
  publish({3, 4});
  REQUIRE(pool.published_blocks() == 2);
  REQUIRE(pool.free_blocks() == 2);
  REQUIRE(pool.evictable_blocks() == 2);
  const auto reader = pool.add_sequence(std::vector<std::int32_t>{1, 2, 9});
  REQUIRE(reader.cached == 2);  // {1, 2} is now the most recently used
  pool.remove_sequence(reader.sequence);
  REQUIRE(pool.evictable_blocks() == 2);
  // Three blocks wanted, two free: the least recently used published block, {3, 4}, goes.
  const auto s = pool.add_sequence();
  Tensor4<float> six(1, 1, 6, 2);
  six.setZero();
  pool.update(0, s, six, six);
  REQUIRE(pool.published_blocks() == 1);
  REQUIRE(pool.add_sequence(std::vector<std::int32_t>{3, 4}).cached == 0);
  REQUIRE(pool.add_sequence(std::vector<std::int32_t>{1, 2}).cached == 2);  // held again
  // Nothing left to evict or free: OutOfBlocks, derived from std::length_error, nothing changed.
  REQUIRE_THROWS_AS(pool.update(0, s, two, two), std::length_error);
  REQUIRE(pool.size(s) == 6);
  REQUIRE(pool.published_blocks() == 1);
}

TEST_CASE("bad input to a paged pool throws naming what was expected, with nothing changed",
          "[paged]") {
  PagedConfig config;
  config.num_layers = 2;
  config.num_blocks = 8;
  config.block_size = 4;
  config.num_heads = 2;
  config.head_dim = 4;
  REQUIRE_THROWS_AS(PagedKVCache<float>(PagedConfig{}), std::invalid_argument);
  PagedKVCache<float> pool(config);
  const auto s = pool.add_sequence();
  Tensor4<float> k(1, 2, 3, 4);
  k.setConstant(1);
  pool.update(0, s, k, k);
  const PoolSnapshot<float> before(pool);
  Tensor4<float> wrong(1, 3, 3, 4);
  CHECK(contains(message_of([&] { pool.update(0, s, wrong, wrong); }), "[1, 2, new_len, 4]"));
  CHECK_THROWS_AS(pool.update(2, s, k, k), std::out_of_range);
  CHECK_THROWS_AS(pool.update(0, 99, k, k), std::invalid_argument);
  CHECK_THROWS_AS(pool.size(99), std::invalid_argument);
  CHECK_THROWS_AS(pool.fork(99), std::invalid_argument);
  CHECK_THROWS_AS(pool.remove_sequence(99), std::invalid_argument);
  CHECK_THROWS_AS(pool.crop(s, 1), std::invalid_argument);  // layer 1 holds 0 positions
  CHECK_THROWS_AS(pool.cache_prefix(s, {1}), std::invalid_argument);
  Tensor4<float> long_input(1, 2, 33, 4);
  long_input.setZero();
  CHECK_THROWS_AS(pool.update(1, s, long_input, long_input), OutOfBlocks);
  Tensor4<float> q(1, 4, 2, 4), out(1, 4, 2, 4);
  q.setZero();
  AttendWorkspace ws;
  const std::vector<std::int64_t> ids{s};
  CHECK(contains(message_of([&] { kvcache::attend(q, pool, 0, ids, {1}, out, ws); }),
                 "sum of q_lens"));
  CHECK_THROWS_AS(kvcache::attend(q, pool, 0, ids, {4}, out, ws), std::invalid_argument);
  CHECK_THROWS_AS(kvcache::attend(q, pool, 0, ids, {1, 1}, out, ws), std::invalid_argument);
  CHECK_THROWS_AS(kvcache::attend(q, pool, 5, ids, {2}, out, ws), std::out_of_range);
  Tensor4<float> small_out(1, 4, 1, 4);
  CHECK_THROWS_AS(kvcache::attend(q, pool, 0, ids, {2}, small_out, ws), std::invalid_argument);
  Mask narrow(1, 2);
  AttendOptions options;
  options.key_mask = &narrow;
  CHECK(contains(message_of([&] { kvcache::attend(q, pool, 0, ids, {2}, out, ws, options); }),
                 "columns >= 3"));
  REQUIRE(PoolSnapshot<float>(pool) == before);
  pool.remove_sequence(s);
  CHECK_THROWS_AS(pool.size(s), std::invalid_argument);  // ids are never reused
  CHECK(pool.add_sequence() != s);
}

TEST_CASE("a paged pool's update and ragged attend allocate nothing after the first step",
          "[paged][workspace]") {
  PagedConfig config;
  config.num_layers = 2;
  config.num_blocks = 64;
  config.block_size = 4;
  config.num_heads = 2;
  config.head_dim = 8;
  PagedKVCache<float> pool(config);
  std::vector<std::int64_t> ids;
  Tensor4<float> prompt = random_tensor<float, BHSD>(1, 2, 9, 8, 1);
  for (int i = 0; i < 3; ++i) {
    ids.push_back(pool.add_sequence());
    for (Index layer = 0; layer < 2; ++layer) pool.update(layer, ids.back(), prompt, prompt);
  }
  ids.push_back(pool.fork(ids[0]));  // a shared partly filled block: the first write copies it
  const Tensor4<float> step = random_tensor<float, BHSD>(1, 2, 1, 8, 2);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 4, 4, 8, 3);
  Tensor4<float> out(q.dimensions());
  AttendWorkspace workspace;
  const std::vector<Index> q_lens{1, 1, 1, 1};
  kvcache::attend(q, pool, 0, ids, q_lens, out, workspace);
  const long before = allocation_count.load();
  for (int t = 0; t < 6; ++t) {
    for (Index layer = 0; layer < 2; ++layer)
      for (auto s : ids) pool.update(layer, s, step, step);
    kvcache::attend(q, pool, t % 2, ids, q_lens, out, workspace);
  }
  pool.crop(ids[1], 3);
  REQUIRE(allocation_count.load() - before == 0);
}

TEST_CASE("concurrent ragged attends over shared blocks give the serial bits", "[paged][threads]") {
  PagedConfig config;
  config.num_blocks = 256;
  config.block_size = 8;
  config.num_heads = 2;
  config.head_dim = 16;
  PagedKVCache<float, BSHD> pool(config);
  const auto root = pool.add_sequence();
  const Tensor4<float> prompt = random_tensor<float, BSHD>(1, 2, 300, 16, 7);
  pool.update(0, root, prompt, prompt);
  std::vector<std::int64_t> ids{root};
  for (int i = 0; i < 3; ++i) {
    ids.push_back(pool.fork(root));
    const Tensor4<float> own = random_tensor<float, BSHD>(1, 2, 5 + i, 16, 8 + static_cast<unsigned>(i));
    pool.update(0, ids.back(), own, own);
  }
  const std::vector<Index> q_lens{1, 2, 1, 3};
  const Tensor4<float> qq = random_tensor<float, BSHD>(1, 4, 7, 16, 10);
  Tensor4<float> serial(qq.dimensions());
  AttendWorkspace ws;
  kvcache::attend(qq, pool, 0, ids, q_lens, serial, ws);
  std::vector<std::thread> threads;
  std::vector<int> same(4, 0);
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      AttendWorkspace mine;
      Tensor4<float> out(qq.dimensions());
      bool all = true;
      for (int r = 0; r < 5; ++r) {
        kvcache::attend(qq, pool, 0, ids, q_lens, out, mine);
        all = all && equal(out, serial);
      }
      same[static_cast<std::size_t>(t)] = all ? 1 : 0;
    });
  for (auto& t : threads) t.join();
  for (int s : same) REQUIRE(s == 1);
}
