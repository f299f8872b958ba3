// Test support: random operation sequences on a PagedKVCache checked against a model, shared by
// tests/test_paged_cache.cpp (choices from a seeded generator) and the operations fuzzer
// (choices from the input bytes).
//
// The model: the keys and values of position p in a layer are a function of the token ids
// [0, p] (a hash chain) and nothing else, as in a real model, so a sequence that reuses a
// published prefix must read exactly the numbers its own prefill would have written. After
// every operation each live sequence's size and keys/values (bit for bit) equal the model's;
// every error is the predicted exception type and leaves the pool exactly as it was (every
// observable: ids, sizes, contents, free, published and evictable counts); the ragged attend
// matches the double reference (naive, tests/support/reference.hpp) and, bit for bit, a
// DynamicKVCache attend per sequence over the model's positions, serial or on a thread pool.
#ifndef KVCACHE_TESTS_SUPPORT_PAGED_MODEL_HPP
#define KVCACHE_TESTS_SUPPORT_PAGED_MODEL_HPP

#include "support/reference.hpp"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace kvtest {
namespace paged {

using kvcache::AttendOptions;
using kvcache::AttendWorkspace;
using kvcache::OutOfBlocks;
using kvcache::PagedConfig;
using kvcache::PagedKVCache;
using SequenceId = std::int64_t;

/// A number in [-1, 1) from a 64-bit key (splitmix64).
inline double unit_from(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<double>(x >> 11) / static_cast<double>(1ull << 52) - 1.0;
}

/// Keys and values as a function of the token ids up to each position.
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
      for (Index h = 0; h < num_heads; ++h) {
        T* to = row<L>(x, 0, h, p - begin);
        for (Index c = 0; c < head_dim; ++c) {
          const std::uint64_t key = chain ^ (static_cast<std::uint64_t>(layer) << 56) ^
                                    (static_cast<std::uint64_t>(h) << 40) ^
                                    (static_cast<std::uint64_t>(c) << 20) ^ (values ? 7u : 3u);
          to[c] = static_cast<T>(static_cast<float>(unit_from(key)));
        }
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
  std::vector<SequenceId> ids;
  std::vector<Index> sizes;
  std::vector<std::int32_t> tables;  ///< the pool blocks of each sequence and layer, in order
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
        const auto table = pool.attention_view(layer, s).paged;
        for (Index i = 0; i * pool.block_size() < table.length; ++i) tables.push_back(table.ids[i]);
        tensors.push_back(pool.keys(layer, s));
        tensors.push_back(pool.values(layer, s));
      }
  }
  bool operator==(const PoolSnapshot& o) const {
    if (ids != o.ids || sizes != o.sizes || tables != o.tables || free_blocks != o.free_blocks ||
        published != o.published || evictable != o.evictable)
      return false;
    for (std::size_t i = 0; i < tensors.size(); ++i)
      if (!equal(tensors[i], o.tensors[i])) return false;
    return true;
  }
};

/// One row of a key mask: the row of sequence i, for the reference (batch row 0).
inline Mask mask_row(const Mask& m, Index row, Index columns) {
  Mask r(1, columns);
  for (Index p = 0; p < columns; ++p) r(0, p) = m(row, p);
  return r;
}

/// "what (context)": the message of a failed expectation.
template <class... Parts>
std::string describe_failure(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// The ragged attend over `ids` against the double reference and, bit for bit, against a
/// DynamicKVCache per sequence holding the model's positions. expect(ok, message) reports.
template <class T, class L, class Pool, class Expect>
void check_ragged_attend(const Pool& pool, const Model<T, L>& model,
                         const std::map<SequenceId, ModelSequence>& live,
                         const std::vector<SequenceId>& ids, const std::vector<Index>& q_lens,
                         Index layer, Index q_heads, const AttendOptions& options,
                         unsigned seed, Expect&& expect) {
  Index total = 0;
  for (Index n : q_lens) total += n;
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
    const std::string where = describe_failure(" (sequence ", ids[i], " of size ", size,
                                               ", q_len ", q_lens[i], ", layer ", layer, ")");
    expect(max_abs_diff(got, want) <= tolerance<T>(), "ragged attend vs the reference" + where);
    kvcache::DynamicKVCache<T, L> dynamic(1, model.num_heads, model.head_dim);
    dynamic.update(k, v);
    one.device = nullptr;
    expect(equal(got, kvcache::attend(qi, dynamic, one)),
           "ragged attend vs a DynamicKVCache, bit for bit" + where);
    offset += q_lens[i];
  }
}

/// A tag naming the exception type an operation may throw.
template <class E>
struct Expected {
  using type = E;
};

/// What a run of random operations did, for the caller's own checks.
struct RunStats {
  int out_of_blocks = 0;      ///< updates refused with OutOfBlocks
  int rejected = 0;           ///< invalid calls refused with the expected exception
  Index matched_positions = 0;
  int attends = 0;
  int reloads = 0;            ///< save + load round trips
};

/// Random operations on a pool of `config` (q_heads query heads for the attends).
/// choose(low, high) gives an integer in [low, high]; steps bounds the operations (a chooser
/// may also end the run by returning true from done()). Until the pool first evicts,
/// add_sequence(tokens) must find exactly the longest published prefix; exact: the pool must
/// never evict (it is large enough).
/// expect(ok, message) reports every check; device (may be null) is used for some attends.
template <class T, class L, class Choose, class Done, class Expect>
RunStats run_operations(const PagedConfig& config, Index q_heads, int steps, bool exact,
                        Choose&& choose, Done&& done, Expect&& expect,
                        const Eigen::ThreadPoolDevice* device = nullptr) {
  PagedKVCache<T, L> pool(config);
  const Model<T, L> model{config.num_layers, config.num_heads, config.head_dim};
  const Index bs = config.block_size;
  std::map<SequenceId, ModelSequence> live;
  std::set<std::vector<std::int32_t>> published;  // block-aligned token prefixes
  // A few shared prompts, so that prefixes repeat.
  std::vector<std::vector<std::int32_t>> prompts(3);
  for (auto& p : prompts)
    for (Index i = 0; i < 3 * bs + 1; ++i) p.push_back(static_cast<std::int32_t>(choose(0, 50)));
  RunStats stats;
  bool nothing_evicted = true;  // then the index holds exactly `published`
  const std::vector<Index> no_sizes(static_cast<std::size_t>(config.num_layers), 0);

  // Runs op; if it throws, the exception must be of type E and the pool unchanged.
  auto unchanged_unless = [&](auto type_tag, auto&& op, const char* what) {
    using E = typename decltype(type_tag)::type;
    const PoolSnapshot<T> before(pool);
    try {
      op();
    } catch (const E&) {
      expect(PoolSnapshot<T>(pool) == before, describe_failure(what, ": a throw changed the pool"));
      return true;
    } catch (const std::exception& e) {
      expect(false, describe_failure(what, ": unexpected exception: ", e.what()));
    }
    return false;
  };
  auto random_live = [&]() {
    auto it = live.begin();
    std::advance(it, choose(0, static_cast<Index>(live.size()) - 1));
    return it->first;
  };

  for (int step = 0; step < steps && !done(); ++step) {
    const Index op = live.empty() ? choose(0, 1) : choose(0, 11);
    const std::string at = describe_failure("step ", step, " op ", op);
    if (op == 0) {
      const auto id = pool.add_sequence();
      live[id] = ModelSequence{{}, no_sizes, prompts[static_cast<std::size_t>(choose(0, 2))]};
    } else if (op == 1) {
      std::vector<std::int32_t> tokens = prompts[static_cast<std::size_t>(choose(0, 2))];
      tokens.resize(static_cast<std::size_t>(choose(0, static_cast<Index>(tokens.size()))));
      for (Index extra = choose(0, bs); extra > 0; --extra)
        tokens.push_back(static_cast<std::int32_t>(choose(0, 50)));
      const auto match = pool.add_sequence(tokens);
      expect(match.cached % bs == 0 && match.cached <= static_cast<Index>(tokens.size()),
             describe_failure(at, ": add_sequence(tokens) cached ", match.cached));
      if (nothing_evicted) {
        Index want = 0;
        while (want + bs <= static_cast<Index>(tokens.size()) &&
               published.count(std::vector<std::int32_t>(tokens.begin(), tokens.begin() + want + bs)))
          want += bs;
        expect(match.cached == want,
               describe_failure(at, ": add_sequence(tokens) cached ", match.cached, ", expected ", want));
      }
      stats.matched_positions += match.cached;
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
      const Index target = m.largest() + choose(1, 2 * bs + 1);
      while (static_cast<Index>(m.tokens.size()) < target) {
        const std::size_t next = m.tokens.size();
        const bool as_planned = next < m.planned.size() &&
                                std::equal(m.tokens.begin(), m.tokens.end(), m.planned.begin());
        m.tokens.push_back(as_planned ? m.planned[next] : static_cast<std::int32_t>(choose(0, 50)));
      }
      for (Index layer = 0; layer < config.num_layers; ++layer) {
        Index& size = m.sizes[static_cast<std::size_t>(layer)];
        const Tensor4<T> k = model.rows(m.tokens, size, target, layer, false);
        const Tensor4<T> v = model.rows(m.tokens, size, target, layer, true);
        if (unchanged_unless(Expected<OutOfBlocks>{}, [&] { pool.update(layer, s, k, v); },
                             "update")) {
          ++stats.out_of_blocks;
          break;
        }
        size = target;
      }
      m.tokens.resize(static_cast<std::size_t>(m.largest()));
    } else if (op == 6) {
      const auto s = random_live();
      ModelSequence& m = live[s];
      const Index n = choose(0, m.smallest());
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
                                             m.tokens.begin() + choose(0, m.smallest()));
      pool.cache_prefix(s, tokens);
      for (Index n = bs; n <= static_cast<Index>(tokens.size()); n += bs)
        published.insert(std::vector<std::int32_t>(tokens.begin(), tokens.begin() + n));
    } else if (op == 9) {  // a ragged attend over some sequences of one layer
      std::vector<SequenceId> ids;
      std::vector<Index> q_lens;
      const Index layer = choose(0, config.num_layers - 1);
      for (Index n = choose(1, 4); n > 0; --n) {
        const auto s = random_live();
        ids.push_back(s);
        const Index size = live[s].sizes[static_cast<std::size_t>(layer)];
        q_lens.push_back(choose(0, std::min<Index>(size, 2 * bs + 1)));
      }
      AttendOptions options;
      options.causal = choose(0, 3) != 0;
      if (choose(0, 2) == 0) options.window = choose(1, 3 * bs);
      if (choose(0, 3) == 0) options.softcap = 5.0f;
      if (choose(0, 3) == 0) options.scale = 0.3f;
      if (choose(0, 2) == 0) options.device = device;
      Index longest = 0;
      for (auto s : ids) longest = std::max(longest, live[s].sizes[static_cast<std::size_t>(layer)]);
      Mask mask(static_cast<Index>(ids.size()), longest + 3);
      for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = choose(0, 4) != 0;
      if (choose(0, 2) == 0) options.key_mask = &mask;
      check_ragged_attend<T, L>(pool, model, live, ids, q_lens, layer, q_heads, options,
                                static_cast<unsigned>(step), [&](bool ok, const std::string& what) {
                                  expect(ok, at + ": " + what);
                                });
      ++stats.attends;
    } else if (op == 11) {  // save and load: the loaded pool holds the same and carries on
      std::stringstream bytes;
      pool.save(bytes);
      PagedKVCache<T, L> loaded = PagedKVCache<T, L>::load(bytes);
      expect(PoolSnapshot<T>(loaded) == PoolSnapshot<T>(pool), at + ": a loaded pool differs");
      std::stringstream again;
      loaded.save(again);
      expect(again.str() == bytes.str(), at + ": save(load(record)) is not the record");
      pool = std::move(loaded);
      ++stats.reloads;
    } else {  // an invalid call: the predicted exception, the pool unchanged
      const auto s = random_live();
      const ModelSequence& m = live[s];
      const SequenceId unknown = pool.sequences().back() + 1 + choose(0, 3);
      const Index kind = choose(0, 6);
      bool threw = false;
      if (kind == 0) {
        Tensor4<T> wrong(dims<L>(1, config.num_heads + 1, 1, config.head_dim));
        wrong.setZero();
        threw = unchanged_unless(Expected<std::invalid_argument>{},
                                 [&] { pool.update(0, s, wrong, wrong); }, "update, wrong heads");
      } else if (kind == 1) {
        Tensor4<T> one(dims<L>(1, config.num_heads, 1, config.head_dim));
        one.setZero();
        threw = unchanged_unless(Expected<std::out_of_range>{},
                                 [&] { pool.update(config.num_layers, s, one, one); }, "update, layer");
      } else if (kind == 2) {
        threw = unchanged_unless(Expected<std::invalid_argument>{}, [&] { pool.fork(unknown); },
                                 "fork, unknown");
      } else if (kind == 3) {
        threw = unchanged_unless(Expected<std::invalid_argument>{},
                                 [&] { pool.crop(s, m.smallest() + 1 + choose(0, 3)); }, "crop past size");
      } else if (kind == 4) {
        const std::vector<std::int32_t> too_many(static_cast<std::size_t>(m.smallest() + 1), 1);
        threw = unchanged_unless(Expected<std::invalid_argument>{},
                                 [&] { pool.cache_prefix(s, too_many); }, "cache_prefix, too many");
      } else if (kind == 5) {
        threw = unchanged_unless(Expected<std::invalid_argument>{},
                                 [&] { pool.remove_sequence(unknown); }, "remove, unknown");
      } else {
        const Index size = m.sizes[0];
        Tensor4<T> q(dims<L>(1, q_heads, size + 1, config.head_dim)), out(q.dimensions());
        q.setZero();
        AttendWorkspace ws;
        threw = unchanged_unless(Expected<std::invalid_argument>{},
                                 [&] {
                                   kvcache::attend(q, pool, 0, std::vector<SequenceId>{s},
                                                   std::vector<Index>{size + 1}, out, ws);
                                 },
                                 "attend, q_len past size");
      }
      expect(threw, describe_failure(at, ": invalid call ", kind, " was accepted"));
      ++stats.rejected;
    }
    // Every live sequence holds the model's numbers; the counts add up.
    expect(pool.sequences().size() == live.size(), at + ": sequences()");
    for (const auto& [id, m] : live)
      for (Index layer = 0; layer < config.num_layers; ++layer) {
        const Index size = m.sizes[static_cast<std::size_t>(layer)];
        const std::string which = describe_failure(at, ": sequence ", id, " layer ", layer);
        expect(pool.size(id, layer) == size, which + ": size");
        expect(equal(pool.keys(layer, id), model.rows(m.tokens, 0, size, layer, false)),
               which + ": keys");
        expect(equal(pool.values(layer, id), model.rows(m.tokens, 0, size, layer, true)),
               which + ": values");
        expect(pool.wasted_positions(layer) <= static_cast<Index>(live.size()) * (bs - 1),
               which + ": wasted_positions");
      }
    if (nothing_evicted && pool.published_blocks() != static_cast<Index>(published.size())) {
      // Only an update evicts, and only fewer blocks can remain published.
      expect(!exact && op >= 3 && op <= 5 &&
                 pool.published_blocks() < static_cast<Index>(published.size()),
             describe_failure(at, ": published_blocks() ", pool.published_blocks(), ", expected ",
                              published.size()));
      nothing_evicted = false;
    }
    expect(pool.free_blocks() >= 0 && pool.free_blocks() + pool.evictable_blocks() <= pool.num_blocks(),
           at + ": free + evictable <= num_blocks");
  }
  return stats;
}

}  // namespace paged
}  // namespace kvtest

#endif  // KVCACHE_TESTS_SUPPORT_PAGED_MODEL_HPP
