// PagedKVCache: random operation sequences (tests/support/paged_model.hpp: add, add by tokens,
// fork, append, crop, remove, publish, exhaustion, invalid calls) checked against a model in
// which a position's keys and values are a function of the token ids up to it (as in a real
// model); the ragged attend against the double reference and, bit for bit, against a
// DynamicKVCache holding the same positions; the strong guarantee on every error; LRU eviction;
// no allocation on the update and attend path; concurrent attends over shared blocks.
#include "support/catch.hpp"
#include "support/reference.hpp"

#include "support/counting_allocator.hpp"
#include "support/paged_model.hpp"

#include <map>
#include <random>
#include <set>
#include <sstream>
#include <thread>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::AttendWorkspace;
using kvcache::OutOfBlocks;
using kvcache::PagedConfig;
using kvcache::PagedKVCache;

namespace {

using namespace kvtest::paged;

/// A pool's configuration in one expression.
PagedConfig pool_config(Index num_blocks, Index block_size, Index num_heads, Index head_dim,
                        Index num_layers = 1) {
  PagedConfig config;
  config.num_layers = num_layers;
  config.num_blocks = num_blocks;
  config.block_size = block_size;
  config.num_heads = num_heads;
  config.head_dim = head_dim;
  return config;
}

/// run_operations with choices from a seeded generator, every check a Catch2 REQUIRE.
template <class T, class L>
RunStats random_operations(const PagedConfig& config, Index q_heads, unsigned seed, int steps,
                           bool exact) {
  std::mt19937 rng(seed);
  Eigen::ThreadPool threads(2);
  Eigen::ThreadPoolDevice device(&threads, 2);
  return run_operations<T, L>(
      config, q_heads, steps, exact,
      [&](Index low, Index high) { return std::uniform_int_distribution<Index>(low, high)(rng); },
      [] { return false; },
      [](bool ok, const std::string& what) {
        INFO(what);
        REQUIRE(ok);
      },
      &device);
}

/// The Catch2 form of an expectation of check_ragged_attend.
void require(bool ok, const std::string& what) {
  INFO(what);
  REQUIRE(ok);
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
    const RunStats stats = random_operations<T, L>(config, 4, 11, 500, true);
    CHECK(stats.matched_positions > 0);
    CHECK(stats.attends > 5);
    CHECK(stats.rejected > 5);
  }
  SECTION("a small pool: eviction and exhaustion, odd head_dim, block_size 3") {
    config.num_blocks = 24;
    config.block_size = 3;
    config.head_dim = 5;
    const RunStats stats = random_operations<T, L>(config, 2, 12, 800, false);
    CHECK(stats.out_of_blocks > 0);
    CHECK(stats.reloads > 5);
  }
  SECTION("block_size 1 and one head") {
    config.num_blocks = 200;
    config.block_size = 1;
    config.num_heads = 1;
    config.head_dim = 3;
    const RunStats stats = random_operations<T, L>(config, 3, 13, 300, true);
    CHECK(stats.matched_positions > 0);
  }
}

TEST_CASE("a long ragged batch splits and still matches a DynamicKVCache bit for bit",
          "[paged]") {
  const PagedConfig config = pool_config(2 * 5000 / 16 + 8, 16, 2, 16);
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
  check_ragged_attend<float, BHSD>(pool, model, live, ids, {1, 5}, 0, 4, options, 3, require);
  Eigen::ThreadPool threads(2);
  Eigen::ThreadPoolDevice device(&threads, 2);
  options.device = &device;
  check_ragged_attend<float, BHSD>(pool, model, live, ids, {3, 0}, 0, 4, options, 4, require);
}

TEST_CASE("fork shares blocks and copies a shared block only on write", "[paged]") {
  const PagedConfig config = pool_config(6, 4, 1, 2);
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
  const PagedConfig config = pool_config(4, 2, 1, 2);
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
  const PagedConfig config = pool_config(8, 4, 2, 4, 2);
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
  const PagedConfig config = pool_config(64, 4, 2, 8, 2);
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
  const PagedConfig config = pool_config(256, 8, 2, 16);
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

namespace {

/// A pool with forks, shared and copied blocks, free blocks in a used order, and two published
/// prefixes that no sequence holds: {1, 2, 3} used last, {4, 5, 6} least recently.
PagedKVCache<float, BSHD> busy_pool() {
  const PagedConfig config = pool_config(12, 3, 2, 5, 2);
  PagedKVCache<float, BSHD> pool(config);
  const Tensor4<float> seven = random_tensor<float, BSHD>(1, 2, 7, 5, 21);
  const Tensor4<float> two = random_tensor<float, BSHD>(1, 2, 2, 5, 22);
  const Tensor4<float> three = random_tensor<float, BSHD>(1, 2, 3, 5, 24);
  const auto a = pool.add_sequence();
  for (Index layer = 0; layer < 2; ++layer) pool.update(layer, a, seven, seven);
  const auto b = pool.fork(a);
  pool.update(0, b, two, two);  // copies the shared last block in layer 0 only
  // {1, 2, 3} gets the lower block id: the recency must decide, not the id.
  for (const std::vector<std::int32_t>& tokens : {std::vector<std::int32_t>{1, 2, 3},
                                                  std::vector<std::int32_t>{4, 5, 6}}) {
    const auto s = pool.add_sequence();
    for (Index layer = 0; layer < 2; ++layer) pool.update(layer, s, three, three);
    pool.cache_prefix(s, tokens);
    pool.remove_sequence(s);
  }
  const auto c = pool.add_sequence(std::vector<std::int32_t>{4, 5, 6, 1}).sequence;
  pool.remove_sequence(c);
  const auto d = pool.add_sequence(std::vector<std::int32_t>{1, 2, 3}).sequence;  // most recent
  pool.remove_sequence(d);
  pool.remove_sequence(a);  // frees blocks in table order
  pool.crop(b, 4);
  return pool;
}

}  // namespace

TEST_CASE("a saved pool loads into one that holds and behaves the same", "[paged][persistence]") {
  PagedKVCache<float, BSHD> pool = busy_pool();
  std::stringstream bytes;
  pool.save(bytes);
  PagedKVCache<float, BSHD> loaded = PagedKVCache<float, BSHD>::load(bytes);
  REQUIRE(PoolSnapshot<float>(loaded) == PoolSnapshot<float>(pool));
  REQUIRE(loaded.wasted_positions(0) == pool.wasted_positions(0));
  REQUIRE(bytes.peek() == std::char_traits<char>::eof());
  // The same operations from here take the same blocks, evict the same prefixes, match the same.
  auto same_future = [](PagedKVCache<float, BSHD>& p) {
    // Takes every free block and one more: the least recently used prefix, {4, 5, 6}, goes.
    const Index free = p.free_blocks();
    REQUIRE(p.evictable_blocks() == 2);
    const Tensor4<float> rows = random_tensor<float, BSHD>(1, 2, 3 * (free + 1), 5, 23);
    const auto e = p.add_sequence();
    for (Index layer = 0; layer < 2; ++layer) p.update(layer, e, rows, rows);
    REQUIRE(p.published_blocks() == 1);
    return std::make_pair(p.add_sequence(std::vector<std::int32_t>{1, 2, 3}).cached,
                          p.add_sequence(std::vector<std::int32_t>{4, 5, 6}).cached);
  };
  const auto want = same_future(pool);
  REQUIRE(want == std::make_pair(Index(3), Index(0)));
  REQUIRE(same_future(loaded) == want);
  REQUIRE(PoolSnapshot<float>(loaded) == PoolSnapshot<float>(pool));
  // The wrong type is refused by name.
  std::stringstream again;
  pool.save(again);
  CHECK(contains(message_of([&] { PagedKVCache<float, BHSD>::load(again); }),
                 "expected a PagedKVCache<float, BHSD>, got a PagedKVCache<float, BSHD>"));
}

TEST_CASE("a damaged pool record throws FormatError and nothing else", "[paged][persistence]") {
  std::stringstream out;
  busy_pool().save(out);
  const std::string record = out.str();
  // Every truncation, and every single-byte change, is a FormatError (checksums, then the
  // consistency checks behind them).
  for (std::size_t n = 0; n < record.size(); n += 7) {
    std::stringstream in(record.substr(0, n));
    REQUIRE_THROWS_AS((PagedKVCache<float, BSHD>::load(in)), kvcache::FormatError);
  }
  for (std::size_t i = 0; i < record.size(); i += 3) {
    std::string damaged = record;
    damaged[i] = static_cast<char>(damaged[i] ^ 0x24);
    std::stringstream in(damaged);
    REQUIRE_THROWS_AS((PagedKVCache<float, BSHD>::load(in)), kvcache::FormatError);
  }
  kvcache::LoadLimits small;
  small.max_memory_bytes = 100;
  std::stringstream in(record);
  CHECK(contains(message_of([&] { PagedKVCache<float, BSHD>::load(in, small); }),
                 "LoadLimits::max_memory_bytes"));
}

TEST_CASE("a pool record of tiny blocks is bounded by its bookkeeping, not only its K/V bytes",
          "[paged][persistence]") {
  // 1000 blocks of one position of one head of one float: 8 KB of K/V, but reference counts,
  // free stacks and index nodes of over 100 KB. A limit between the two refuses the record.
  const PagedConfig config = pool_config(1000, 1, 1, 1);
  std::stringstream bytes;
  PagedKVCache<float>(config).save(bytes);
  const std::string record = bytes.str();
  kvcache::LoadLimits limits;
  limits.max_memory_bytes = 20000;
  std::stringstream in(record);
  REQUIRE_THROWS_AS((PagedKVCache<float>::load(in, limits)), kvcache::FormatError);
  limits.max_memory_bytes = 200000;
  std::stringstream again(record);
  REQUIRE(PagedKVCache<float>::load(again, limits).num_blocks() == 1000);
}
