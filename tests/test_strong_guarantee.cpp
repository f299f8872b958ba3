// The strong exception guarantee of every cache kind, error path by error path. Each failing
// call must throw the type API.md names and leave size(), position(), capacity(),
// memory_bytes(), keys(), values() and the raw quantized bytes exactly as they were
// (tests/support/snapshot.hpp); and the cache must keep working: after every failure a valid
// update leaves it in the same state as a twin cache that never saw the failure, and attend()
// over it matches the naive double reference over the tokens it should hold.
//
// Kinds: StaticKVCache, DynamicKVCache, SlidingWindowKVCache (with sinks), Int8KVCache,
// Int4KVCache, PrefixKVCache, FrozenKVCache (attend only: it has no mutators) and
// ModelKVCache (one kind and mixed kinds per layer). Paths: every wrong shape of update (batch,
// heads, head_dim, k/v mismatch, the other layout, a shape error that would also overflow),
// appending past a fixed capacity, lengths beyond any buffer (including one whose sum with
// position() overflows Index), crop() outside [0, size()], every attend() error (query shape,
// heads not a multiple, q_len, key_mask shape, window/softcap/scale, evicted keys), and
// invalid constructor arguments. (A tensor of another rank or element type does not compile:
// a static_assert, not a runtime path.)
#include "support/catch.hpp"
#include "support/reference.hpp"
#include "support/snapshot.hpp"

#include <kvcache/kvcache.hpp>

#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <variant>
#include <vector>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::DynamicKVCache;
using kvcache::FrozenKVCache;
using kvcache::Int4KVCache;
using kvcache::Int8KVCache;
using kvcache::ModelKVCache;
using kvcache::PrefixKVCache;
using kvcache::QuantConfig;
using kvcache::QuantizedKVCache;
using kvcache::SlidingWindowKVCache;
using kvcache::StaticKVCache;

namespace {

// Every cache under test: batch 2, 2 KV heads of head_dim 8; queries have 4 heads (GQA 2:1).
constexpr Index kBatch = 2, kHeads = 2, kHeadDim = 8, kQueryHeads = 4;
constexpr Index kIndexMax = std::numeric_limits<Index>::max();

/// The layout other than L (a tensor shaped for it is a shape error for an L cache here).
template <class L>
using OtherLayout = std::conditional_t<std::is_same_v<L, BHSD>, BSHD, BHSD>;

/// A deterministic stream of tokens: position p of the stream is the token appended at
/// absolute position p (a crop rolls back and the same tokens are appended again).
template <class L>
struct TokenStream {
  TokenStream(Index total, unsigned seed)
      : k(random_tensor<float, L>(kBatch, kHeads, total, kHeadDim, seed)),
        v(random_tensor<float, L>(kBatch, kHeads, total, kHeadDim, seed + 1)) {}
  Tensor4<float> keys(Index first, Index n) const { return slice_seq<L>(k, first, n); }
  Tensor4<float> values(Index first, Index n) const { return slice_seq<L>(v, first, n); }
  Tensor4<float> k, v;
};

/// The tokens a cache that was fed stream positions [0, n) must attend over for a decode
/// query at position n - 1, and the rules of the reference.
template <class L>
struct Held {
  Tensor4<float> k, v;
  std::vector<Index> positions;
  ReferenceRules rules;
  bool exact = true;  ///< keys()/values() must equal k, v bit for bit
};

/// Static, dynamic and prefix caches: every position.
template <class Cache, class L>
Held<L> held_tokens(const Cache&, const TokenStream<L>& stream, Index n, Index) {
  return {stream.keys(0, n), stream.values(0, n), iota_positions(n), {}, true};
}

/// A sliding window: the sinks, then the last window positions, under the cache's window.
template <class L>
Held<L> held_tokens(const SlidingWindowKVCache<float, L>& cache, const TokenStream<L>& stream,
                    Index n, Index) {
  const Index sinks = std::min(n, cache.num_sink_tokens());
  const Index recent = std::max(cache.num_sink_tokens(), n - cache.window());
  Held<L> held;
  held.positions = iota_positions(sinks);
  for (Index p = recent; p < n; ++p) held.positions.push_back(p);
  held.k = Tensor4<float>(dims<L>(kBatch, kHeads, Index(held.positions.size()), kHeadDim));
  held.v = held.k;
  for (std::size_t j = 0; j < held.positions.size(); ++j)
    for (Index b = 0; b < kBatch; ++b)
      for (Index h = 0; h < kHeads; ++h)
        for (Index c = 0; c < kHeadDim; ++c) {
          at<L>(held.k, b, h, Index(j), c) = at<L>(stream.k, b, h, held.positions[j], c);
          at<L>(held.v, b, h, Index(j), c) = at<L>(stream.v, b, h, held.positions[j], c);
        }
  held.rules.cache_window = cache.window();
  held.rules.num_sink_tokens = cache.num_sink_tokens();
  return held;
}

/// A quantized cache: its own dequantized keys()/values() (the kernel is checked exactly on
/// them; the twin comparison checks the quantized state itself), whose unquantized tail must
/// be the stream's tokens bit for bit - from `exact_from` on: a crop into the quantized blocks
/// puts the dequantized survivors below it back into the tail.
template <int Bits, class L>
Held<L> held_tokens(const QuantizedKVCache<float, Bits, L>& cache, const TokenStream<L>& stream,
                    Index n, Index exact_from) {
  const Index first = std::max(cache.quantized_size(), exact_from);
  const Tensor4<float> keys = cache.keys(), values = cache.values();
  if (first < n) {
    REQUIRE(equal(slice_seq<L>(keys, first, n - first), stream.keys(first, n - first)));
    REQUIRE(equal(slice_seq<L>(values, first, n - first), stream.values(first, n - first)));
  }
  return {keys, values, iota_positions(n), {}, false};
}

/// A cache under test, a twin that gets only the valid calls, and the stream both are fed.
template <class Cache, class L>
struct Checked {
  Checked(Cache cache_under_test, Cache twin_cache, Index total, unsigned seed, Index already = 0)
      : cache(std::move(cache_under_test)), twin(std::move(twin_cache)), stream(total, seed),
        appended(already) {}

  /// Appends the next n stream tokens to both caches, then checks the cache.
  void append(Index n) {
    cache.update(stream.keys(appended, n), stream.values(appended, n));
    twin.update(stream.keys(appended, n), stream.values(appended, n));
    appended += n;
    check();
  }

  /// The cache equals its twin, holds what it should, and attend() matches the reference.
  void check() {
    REQUIRE(Snapshot<Cache>(cache) == Snapshot<Cache>(twin));
    REQUIRE(cache.position() == appended);
    const Held<L> held = held_tokens(cache, stream, appended, exact_from);
    if (held.exact) {
      REQUIRE(equal(cache.keys(), held.k));
      REQUIRE(equal(cache.values(), held.v));
    }
    const Tensor4<float> q = random_tensor<float, L>(kBatch, kQueryHeads, 1, kHeadDim, seed++);
    const auto want =
        reference_attention<L>(q, held.k, held.v, held.positions, appended - 1, held.rules);
    REQUIRE(max_abs_diff(kvcache::attend(q, cache), want) < tolerance<float>());
  }

  /// Requires that call(cache) throws Error with the cache unchanged; then that the cache
  /// still works (one more token, checked against the twin and the reference). Returns the
  /// exception's message.
  template <class Error, class Call>
  std::string fails(Call&& call) {
    const std::string what = require_throws_unchanged<Error>(cache, [&] { call(cache); });
    append(1);
    return what;
  }

  Cache cache, twin;
  TokenStream<L> stream;
  Index appended;
  Index exact_from = 0;  ///< positions below it may differ from the stream (a lossy crop)
  unsigned seed = 1000;
};

/// A tensor of the given (b, h, s, d) in Layout.
template <class Layout>
Tensor4<float> tensor(Index b, Index h, Index s, Index d) {
  return random_tensor<float, Layout>(b, h, s, d, 7);
}

/// k and v of new_len positions that no buffer could hold: a TensorMap with that extent over a
/// few floats. A cache must reject it before reading a single element (ASan would notice).
template <class L>
Eigen::TensorMap<const Tensor4<float>> absurd_input(const std::vector<float>& few, Index new_len) {
  return Eigen::TensorMap<const Tensor4<float>>(few.data(), dims<L>(1, kHeads, new_len, kHeadDim));
}

/// Every wrong update shape, each a std::invalid_argument that names the received shape.
template <class Cache, class L>
void check_update_shape_errors(Checked<Cache, L>& checked) {
  const std::string layout = std::string(" (") + L::name + ")";
  auto invalid = [&](const Tensor4<float>& k, const Tensor4<float>& v) {
    const std::string what = checked.template fails<std::invalid_argument>(
        [&](Cache& c) { c.update(k, v); });
    CAPTURE(what);
    REQUIRE(contains(what, "expected"));
    REQUIRE(contains(what, describe(v.dimensions()) + layout));
  };
  auto t = tensor<L>;
  invalid(t(kBatch + 1, kHeads, 1, kHeadDim), t(kBatch + 1, kHeads, 1, kHeadDim));  // batch
  invalid(t(0, kHeads, 1, kHeadDim), t(0, kHeads, 1, kHeadDim));                    // no rows
  invalid(t(1, kHeads + 1, 1, kHeadDim), t(1, kHeads + 1, 1, kHeadDim));            // heads
  invalid(t(1, kHeads - 1, 1, kHeadDim), t(1, kHeads - 1, 1, kHeadDim));            // heads
  invalid(t(1, kHeads, 1, kHeadDim + 1), t(1, kHeads, 1, kHeadDim + 1));            // head_dim
  invalid(t(1, kHeads, 1, kHeadDim / 2), t(1, kHeads, 1, kHeadDim / 2));            // head_dim
  invalid(t(1, kHeads, 2, kHeadDim), t(1, kHeads, 1, kHeadDim));      // k, v lengths differ
  invalid(t(1, kHeads, 1, kHeadDim), t(2, kHeads, 1, kHeadDim));      // k, v batches differ
  invalid(t(1, kHeads, 1, kHeadDim), t(1, kHeads + 1, 1, kHeadDim));  // k, v heads differ
  // A tensor in the other layout: its head and sequence axes are swapped, so L reads 3 heads.
  const Tensor4<float> other = random_tensor<float, OtherLayout<L>>(1, kHeads, 3, kHeadDim, 8);
  invalid(other, other);
  // Wrong shapes that a right one of the same length would grow or overflow the cache for:
  // the shape error wins, nothing is allocated.
  invalid(t(1, kHeads, 1000, kHeadDim + 1), t(1, kHeads, 1000, kHeadDim + 1));
  // Zero-length but wrong: still wrong.
  invalid(t(1, kHeads + 1, 0, kHeadDim), t(1, kHeads + 1, 0, kHeadDim));
  // A correct zero-length update is a no-op.
  const Snapshot<Cache> before(checked.cache);
  checked.cache.update(t(1, kHeads, 0, kHeadDim), t(1, kHeads, 0, kHeadDim));
  REQUIRE(Snapshot<Cache>(checked.cache) == before);
}

/// Lengths no cache can hold: 2^58 positions (a buffer beyond the address space) and the
/// largest Index (whose sum with position() overflows): std::length_error, nothing read.
template <class Cache, class L>
void check_absurd_lengths(Checked<Cache, L>& checked) {
  const std::vector<float> few(64, 1.0f);
  for (Index new_len : {Index(1) << 58, kIndexMax - 1, kIndexMax}) {
    CAPTURE(new_len);
    const auto k = absurd_input<L>(few, new_len);
    checked.template fails<std::length_error>([&](Cache& c) { c.update(k, k); });
  }
}

/// crop() outside [0, size()]: std::invalid_argument naming n; then a valid crop works.
template <class Cache, class L>
void check_crop_errors(Checked<Cache, L>& checked) {
  for (Index n : {checked.cache.size() + 1, Index(-1), kIndexMax, std::numeric_limits<Index>::min()}) {
    CAPTURE(n);
    const std::string what =
        checked.template fails<std::invalid_argument>([&](Cache& c) { c.crop(n); });
    REQUIRE(contains(what, "got " + std::to_string(n)));
  }
  // A valid crop, on both, then the rolled-back positions are appended again. (A quantized
  // cache cropped into a block keeps that block's survivors dequantized: lossy, so its held
  // positions below `keep` are no longer the stream's.)
  const Index keep = checked.cache.size() - 3;
  checked.cache.crop(keep);
  checked.twin.crop(keep);
  checked.appended = keep;
  checked.exact_from = keep;
  checked.check();
  checked.append(3);
}

/// Every attend() error: std::invalid_argument naming what was expected, nothing changed.
/// attend() is const, so this checks that validation never touches the cache.
template <class Cache, class L>
void check_attend_errors(const Cache& cache) {
  const Index position = cache.position();
  auto invalid = [&](const Tensor4<float>& q, const AttendOptions& options,
                     const std::string& part) {
    const std::string what = require_throws_unchanged<std::invalid_argument>(
        cache, [&] { (void)kvcache::attend(q, cache, options); });
    CAPTURE(what);
    REQUIRE(contains(what, part));
  };
  auto t = tensor<L>;
  const AttendOptions plain;
  invalid(t(kBatch + 1, kQueryHeads, 1, kHeadDim), plain,
          describe(dims<L>(kBatch + 1, kQueryHeads, 1, kHeadDim)));
  invalid(t(0, kQueryHeads, 1, kHeadDim), plain, describe(dims<L>(0, kQueryHeads, 1, kHeadDim)));
  invalid(t(1, 3, 1, kHeadDim), plain, "a multiple of 2");  // 3 query heads over 2
  invalid(t(1, 0, 1, kHeadDim), plain, "a multiple of 2");
  invalid(t(1, kQueryHeads, 1, kHeadDim + 1), plain, "expected q of shape");
  const Tensor4<float> other = random_tensor<float, OtherLayout<L>>(1, kQueryHeads, 3, kHeadDim, 9);
  invalid(other, plain, "expected q of shape");
  invalid(t(1, kQueryHeads, position + 1, kHeadDim), plain,
          "q_len " + std::to_string(position + 1) + " exceeds");
  AttendOptions windowed;
  windowed.causal = false;
  windowed.window = 2;
  invalid(t(1, kQueryHeads, position + 1, kHeadDim), windowed, "exceeds");
  AttendOptions negative_window;
  negative_window.window = -1;
  invalid(t(1, kQueryHeads, 1, kHeadDim), negative_window, "window must be >= 0");
  for (float softcap : {-1.0f, std::numeric_limits<float>::quiet_NaN(),
                        std::numeric_limits<float>::infinity()}) {
    AttendOptions bad;
    bad.softcap = softcap;
    invalid(t(1, kQueryHeads, 1, kHeadDim), bad, "softcap must be finite and >= 0");
  }
  for (float scale : {std::numeric_limits<float>::quiet_NaN(),
                      std::numeric_limits<float>::infinity(),
                      -std::numeric_limits<float>::infinity()}) {
    AttendOptions bad;
    bad.scale = scale;
    invalid(t(1, kQueryHeads, 1, kHeadDim), bad, "scale must be finite");
  }
  // Key masks span position() columns and at least q's batch rows.
  // (max: g++ cannot see position >= 1 here and warns of a negative size.)
  Mask few_rows(1, position), short_mask(kBatch, std::max<Index>(position - 1, 0)),
      long_mask(kBatch, position + 1);
  for (const Mask* mask : {&few_rows, &short_mask, &long_mask}) {
    AttendOptions masked;
    masked.key_mask = mask;
    invalid(t(kBatch, kQueryHeads, 1, kHeadDim), masked, "expected key_mask of shape");
  }
}

/// The tail of every scenario: attend errors, then the cache still answers correctly.
template <class Cache, class L>
void check_attend_errors_then_works(Checked<Cache, L>& checked) {
  check_attend_errors<Cache, L>(checked.cache);
  checked.check();
  checked.append(2);
}

QuantConfig small_groups() {
  QuantConfig config;
  config.group_size = 4;       // divides kHeadDim, even for int4
  config.residual_length = 2;  // the tail holds 1 to 3 positions: blocks form every 4 tokens
  return config;
}

/// A cache kind's scenario: the cache, its twin, how much to feed first.
template <class Cache, class L>
Checked<Cache, L> start(Cache cache, Cache twin, Index first_chunk, unsigned seed) {
  Checked<Cache, L> checked(std::move(cache), std::move(twin), 400, seed);
  checked.append(first_chunk);
  return checked;
}

}  // namespace

TEMPLATE_TEST_CASE("StaticKVCache: every failing call leaves it unchanged and working",
                   "[strong_guarantee]", BHSD, BSHD) {
  using L = TestType;
  using Cache = StaticKVCache<float, L>;
  auto checked = start<Cache, L>(Cache(kBatch, 64, kHeads, kHeadDim),
                                 Cache(kBatch, 64, kHeads, kHeadDim), 5, 10);
  check_update_shape_errors(checked);
  check_absurd_lengths(checked);
  check_crop_errors(checked);
  check_attend_errors_then_works(checked);

  // Past max_seq_len: std::length_error naming the capacity, at every distance from it.
  const std::size_t bytes = checked.cache.memory_bytes();
  checked.append(checked.cache.capacity() - checked.cache.size() - 3);
  for (Index n : {Index(4), Index(100)}) {  // 3, then 2 positions left
    const std::string what = checked.template fails<std::length_error>(
        [&](Cache& c) { c.update(checked.stream.keys(0, n), checked.stream.values(0, n)); });
    REQUIRE(contains(what, "capacity of 64"));
  }
  checked.append(1);  // exactly full
  REQUIRE(checked.cache.size() == 64);
  require_throws_unchanged<std::length_error>(checked.cache, [&] {
    checked.cache.update(checked.stream.keys(0, 1), checked.stream.values(0, 1));
  });
  checked.check();  // the full cache still answers
  // After reset() it is an empty cache that works like a new one.
  checked.cache.reset();
  checked.twin.reset();
  checked.appended = 0;
  REQUIRE(checked.cache.memory_bytes() == bytes);
  checked.append(4);
}

TEMPLATE_TEST_CASE("DynamicKVCache: every failing call leaves it unchanged and working",
                   "[strong_guarantee]", BHSD, BSHD) {
  using L = TestType;
  using Cache = DynamicKVCache<float, L>;
  // 15 positions in a buffer of 16: the appends below move it to 32, then 64 positions.
  auto checked = start<Cache, L>(Cache(kBatch, kHeads, kHeadDim), Cache(kBatch, kHeads, kHeadDim),
                                 15, 20);
  check_update_shape_errors(checked);
  check_absurd_lengths(checked);  // growth that could not be addressed: nothing reallocated
  check_crop_errors(checked);
  check_attend_errors_then_works(checked);
  // reserve() beyond the address space.
  checked.template fails<std::length_error>([](Cache& c) { c.reserve(Index(1) << 60); });
}

TEMPLATE_TEST_CASE("SlidingWindowKVCache: every failing call leaves it unchanged and working",
                   "[strong_guarantee]", BHSD, BSHD) {
  using L = TestType;
  using Cache = SlidingWindowKVCache<float, L>;
  // Window 5 with 2 sinks; a first chunk of 9 grows the ring to 9 + 5 - 1 = 13 slots, and the
  // one-token appends of the error paths wrap it several times.
  auto checked = start<Cache, L>(Cache(kBatch, 5, kHeads, kHeadDim, 2),
                                 Cache(kBatch, 5, kHeads, kHeadDim, 2), 9, 30);
  check_update_shape_errors(checked);
  check_absurd_lengths(checked);  // a ring that could not be addressed: nothing grows
  check_attend_errors_then_works(checked);

  // Queries that need evicted keys: 26 positions appended, the ring of 13 slots holds
  // [13, 26), and the first query row's window reaches 4 positions back: 9 rows at most.
  const Cache& cache = checked.cache;
  REQUIRE(cache.position() == 26);
  const Tensor4<float> q10 = tensor<L>(1, kQueryHeads, 10, kHeadDim);
  const std::string what = require_throws_unchanged<std::invalid_argument>(
      cache, [&] { (void)kvcache::attend(q10, cache); });
  REQUIRE(contains(what, "[2, 13)"));
  REQUIRE(contains(what, "are no longer held"));
  REQUIRE(contains(what, "expected q_len <= 9"));
  // A key mask must span position(), not size().
  Mask size_columns(kBatch, cache.size());
  size_columns.setConstant(true);
  AttendOptions masked;
  masked.key_mask = &size_columns;
  require_throws_unchanged<std::invalid_argument>(cache, [&] {
    (void)kvcache::attend(tensor<L>(1, kQueryHeads, 1, kHeadDim), cache, masked);
  });
  checked.append(1);
  // A chunk longer than the ring grows it (strong guarantee for growth is checked by the
  // absurd lengths above); the grown cache still answers.
  checked.append(20);
  checked.append(1);
}

TEMPLATE_TEST_CASE("QuantizedKVCache: every failing call leaves it unchanged and working",
                   "[strong_guarantee]", (QuantizedKVCache<float, 8, BHSD>),
                   (QuantizedKVCache<float, 4, BSHD>)) {
  using Cache = TestType;
  using L = typename Cache::layout_type;
  auto checked = start<Cache, L>(Cache(kBatch, 64, kHeads, kHeadDim, small_groups()),
                                 Cache(kBatch, 64, kHeads, kHeadDim, small_groups()), 10, 40);
  REQUIRE(checked.cache.quantized_size() > 0);
  check_update_shape_errors(checked);
  check_absurd_lengths(checked);
  check_crop_errors(checked);
  // A crop into the quantized blocks (lossy by design, the same on the twin), then errors.
  const Index keep = checked.cache.quantized_size() - 2;
  checked.cache.crop(keep);
  checked.twin.crop(keep);
  checked.appended = keep;
  checked.exact_from = keep;
  // The survivors were dequantized into the tail: the stream no longer describes them, but
  // the twin does, and attend() is checked over the cache's own keys()/values().
  REQUIRE(Snapshot<Cache>(checked.cache) == Snapshot<Cache>(checked.twin));
  checked.template fails<std::invalid_argument>([&](Cache& c) { c.crop(keep + 1); });
  check_attend_errors<Cache, L>(checked.cache);

  // Past max_seq_len: std::length_error, nothing quantized.
  const Index room = checked.cache.capacity() - checked.cache.size();
  for (Index n : {room + 1, room + 50}) {
    const std::string what = require_throws_unchanged<std::length_error>(checked.cache, [&] {
      checked.cache.update(checked.stream.keys(0, n), checked.stream.values(0, n));
    });
    REQUIRE(contains(what, "capacity of 64"));
  }
  // Exactly full works and matches the twin; one more fails.
  checked.cache.update(checked.stream.keys(0, room), checked.stream.values(0, room));
  checked.twin.update(checked.stream.keys(0, room), checked.stream.values(0, room));
  REQUIRE(checked.cache.size() == 64);
  REQUIRE(Snapshot<Cache>(checked.cache) == Snapshot<Cache>(checked.twin));
  require_throws_unchanged<std::length_error>(checked.cache, [&] {
    checked.cache.update(checked.stream.keys(0, 1), checked.stream.values(0, 1));
  });
  // reset(): a new sequence from the stream's start, checked against the reference again.
  checked.cache.reset();
  checked.twin.reset();
  checked.appended = 0;
  checked.exact_from = 0;
  checked.append(13);
  checked.append(1);
}

TEMPLATE_TEST_CASE("PrefixKVCache: every failing call leaves it unchanged and working",
                   "[strong_guarantee]", BHSD, BSHD) {
  using L = TestType;
  using Cache = PrefixKVCache<float, L>;
  const Index prefix_len = 6, max_new = 48;
  const TokenStream<L> stream(400, 50);  // the same stream Checked builds from seed 50
  StaticKVCache<float, L> prompt(kBatch, prefix_len, kHeads, kHeadDim);
  prompt.update(stream.keys(0, prefix_len), stream.values(0, prefix_len));
  const auto frozen = prompt.freeze();
  const Snapshot<FrozenKVCache<float, L>> frozen_before(*frozen);
  Checked<Cache, L> checked(Cache(frozen, max_new), Cache(frozen, max_new), 400, 50, prefix_len);
  checked.check();
  checked.append(3);
  check_update_shape_errors(checked);
  check_absurd_lengths(checked);
  check_crop_errors(checked);
  check_attend_errors_then_works(checked);

  // Past max_new_tokens: std::length_error naming both parts of the capacity.
  const Index room = checked.cache.capacity() - checked.cache.size();
  for (Index n : {room + 1, room + 100}) {
    const std::string what = require_throws_unchanged<std::length_error>(checked.cache, [&] {
      checked.cache.update(checked.stream.keys(0, n), checked.stream.values(0, n));
    });
    REQUIRE(contains(what, std::to_string(prefix_len) + " prefix + 48 max_new_tokens"));
  }
  checked.append(room);
  require_throws_unchanged<std::length_error>(checked.cache, [&] {
    checked.cache.update(checked.stream.keys(0, 1), checked.stream.values(0, 1));
  });

  // A crop into the prefix, then errors: still the same snapshot, still working.
  checked.cache.crop(4);
  checked.twin.crop(4);
  checked.appended = 4;
  checked.check();
  checked.template fails<std::invalid_argument>([](Cache& c) { c.crop(6); });
  check_update_shape_errors(checked);
  // The shared prefix itself never changed.
  REQUIRE(Snapshot<FrozenKVCache<float, L>>(*frozen) == frozen_before);
  // reset() returns to the whole prefix.
  checked.cache.reset();
  checked.twin.reset();
  checked.appended = prefix_len;
  checked.check();
  checked.append(2);
}

TEMPLATE_TEST_CASE("FrozenKVCache: attend errors leave it unchanged and working",
                   "[strong_guarantee]", BHSD, BSHD) {
  using L = TestType;
  const TokenStream<L> stream(12, 60);
  DynamicKVCache<float, L> source(kBatch, kHeads, kHeadDim);
  source.update(stream.keys(0, 12), stream.values(0, 12));
  const std::shared_ptr<const FrozenKVCache<float, L>> frozen = source.freeze();
  check_attend_errors<FrozenKVCache<float, L>, L>(*frozen);
  const Tensor4<float> q = tensor<L>(kBatch, kQueryHeads, 3, kHeadDim);
  const auto want = reference_attention<L>(q, stream.k, stream.v, iota_positions(12), 9, {});
  REQUIRE(max_abs_diff(kvcache::attend(q, *frozen), want) < tolerance<float>());
}

TEMPLATE_TEST_CASE("ModelKVCache: a failing call leaves every layer unchanged and working",
                   "[strong_guarantee]", BHSD, BSHD) {
  using L = TestType;
  using Full = StaticKVCache<float, L>;
  using Sliding = SlidingWindowKVCache<float, L>;
  using Layer = std::variant<Full, Sliding>;
  using Model = ModelKVCache<Layer>;
  const Index num_layers = 3, capacity = 40, window = 4, sinks = 1;
  auto make = [&](Index layer) -> Layer {
    if (layer == 1) return Sliding(kBatch, window, kHeads, kHeadDim, sinks);
    return Full(kBatch, capacity, kHeads, kHeadDim);
  };
  Model model(num_layers, make), twin(num_layers, make);
  std::vector<TokenStream<L>> streams;
  for (Index l = 0; l < num_layers; ++l) streams.emplace_back(capacity, unsigned(70 + 2 * l));
  Index appended = 0;
  unsigned seed = 2000;

  // Appends the next n tokens of every layer to both models and checks every layer.
  auto append = [&](Index n) {
    for (Index l = 0; l < num_layers; ++l) {
      const TokenStream<L>& s = streams[std::size_t(l)];
      model.update(l, s.keys(appended, n), s.values(appended, n));
      twin.update(l, s.keys(appended, n), s.values(appended, n));
    }
    appended += n;
    REQUIRE(Snapshot<Model>(model) == Snapshot<Model>(twin));
    const Tensor4<float> q = random_tensor<float, L>(kBatch, kQueryHeads, 1, kHeadDim, seed++);
    for (Index l = 0; l < num_layers; ++l) {
      const Held<L> held =
          l == 1 ? held_tokens(std::get<Sliding>(model[l]), streams[1], appended, 0)
                 : held_tokens(std::get<Full>(model[l]), streams[std::size_t(l)], appended, 0);
      const auto want =
          reference_attention<L>(q, held.k, held.v, held.positions, appended - 1, held.rules);
      REQUIRE(max_abs_diff(kvcache::attend(q, model[l]), want) < tolerance<float>());
    }
  };
  append(6);

  const Tensor4<float> k = streams[0].keys(0, 1);
  // A layer index out of range: std::out_of_range naming it, no layer touched.
  for (Index bad : {Index(-1), num_layers, kIndexMax}) {
    const std::string what = require_throws_unchanged<std::out_of_range>(
        model, [&] { model.update(bad, k, k); });
    REQUIRE(contains(what, "layer " + std::to_string(bad)));
    require_throws_unchanged<std::out_of_range>(model, [&] { (void)model[bad]; });
    const Model& read_only = model;
    require_throws_unchanged<std::out_of_range>(model, [&] { (void)read_only[bad]; });
    append(1);
  }
  // A wrong shape for one layer: that layer's std::invalid_argument; no layer touched.
  for (Index l = 0; l < num_layers; ++l) {
    const Tensor4<float> wrong = tensor<L>(1, kHeads + 1, 1, kHeadDim);
    require_throws_unchanged<std::invalid_argument>(model, [&] { model.update(l, wrong, wrong); });
    append(1);
  }
  // One layer's capacity: std::length_error from the full layers; the sliding layer never
  // fills. Layers keep their own state (an update is per layer, not all or nothing).
  const Index room = capacity - appended;
  const Tensor4<float> too_long = tensor<L>(kBatch, kHeads, room + 1, kHeadDim);
  require_throws_unchanged<std::length_error>(model, [&] { model.update(0, too_long, too_long); });
  model.update(1, too_long, too_long);
  twin.update(1, too_long, too_long);
  REQUIRE(Snapshot<Model>(model) == Snapshot<Model>(twin));
  // reset() all layers; then the layers work from position 0 again.
  model.reset();
  twin.reset();
  appended = 0;
  append(5);
  check_attend_errors<Full, L>(std::get<Full>(model[0]));
  append(1);
}

TEST_CASE("invalid constructor arguments name the argument and the value", "[strong_guarantee]") {
  auto says = [](auto&& construct, const std::string& argument, const std::string& value) {
    const std::string what = message_of(construct);
    CAPTURE(what);
    REQUIRE_THROWS_AS(construct(), std::invalid_argument);
    REQUIRE(contains(what, argument));
    REQUIRE(contains(what, value));
  };
  for (Index bad : {Index(0), Index(-3)}) {
    const std::string value = "got " + std::to_string(bad);
    CAPTURE(bad);
    says([&] { StaticKVCache<float> c(bad, 4, 1, 1); }, "batch_size", value);
    says([&] { StaticKVCache<float> c(1, bad, 1, 1); }, "max_seq_len", value);
    says([&] { StaticKVCache<float> c(1, 4, bad, 1); }, "num_heads", value);
    says([&] { StaticKVCache<float> c(1, 4, 1, bad); }, "head_dim", value);
    says([&] { DynamicKVCache<float> c(bad, 1, 1); }, "batch_size", value);
    says([&] { DynamicKVCache<float> c(1, bad, 1); }, "num_heads", value);
    says([&] { DynamicKVCache<float> c(1, 1, bad); }, "head_dim", value);
    says([&] { SlidingWindowKVCache<float> c(bad, 4, 1, 1); }, "batch_size", value);
    says([&] { SlidingWindowKVCache<float> c(1, bad, 1, 1); }, "window", value);
    says([&] { SlidingWindowKVCache<float> c(1, 4, bad, 1); }, "num_heads", value);
    says([&] { SlidingWindowKVCache<float> c(1, 4, 1, bad); }, "head_dim", value);
    says([&] { Int8KVCache<float> c(bad, 8, 1, 8); }, "batch_size", value);
    says([&] { Int8KVCache<float> c(1, bad, 1, 8); }, "max_seq_len", value);
    says([&] { Int4KVCache<float> c(1, 8, bad, 8); }, "num_heads", value);
    says([&] { Int4KVCache<float> c(1, 8, 1, bad); }, "head_dim", value);
    QuantConfig config;
    config.group_size = bad;
    says([&] { Int8KVCache<float> c(1, 8, 1, 8, config); }, "group_size", value);
    says([&] { ModelKVCache<StaticKVCache<float>> m(bad, 1, 4, 1, 1); }, "num_layers", value);
    says([&] { ModelKVCache<StaticKVCache<float>> m(2, 1, bad, 1, 1); }, "max_seq_len", value);
  }
  says([] { DynamicKVCache<float> c(1, 1, 1, -1); }, "capacity", "got -1");
  says([] { SlidingWindowKVCache<float> c(1, 4, 1, 1, -1); }, "num_sink_tokens", "got -1");
  QuantConfig residual;
  residual.group_size = 4;
  residual.residual_length = 65;
  says([&] { Int8KVCache<float> c(1, 8, 1, 8, residual); }, "residual_length", "got 65");
  QuantConfig not_dividing;
  not_dividing.group_size = 3;
  says([&] { Int8KVCache<float> c(1, 8, 1, 8, not_dividing); }, "divisor of 8", "got 3");

  StaticKVCache<float> prompt(1, 4, 1, 2);
  prompt.update(tensor<BHSD>(1, 1, 2, 2), tensor<BHSD>(1, 1, 2, 2));
  says([] { PrefixKVCache<float> c(nullptr, 4); }, "prefix", "null");
  says([&] { PrefixKVCache<float> c(prompt.freeze(), 0); }, "max_new_tokens", "got 0");
  says([&] { PrefixKVCache<float> c(prompt.freeze(), -2); }, "max_new_tokens", "got -2");
  says([] { FrozenKVCache<float> c(Tensor4<float>(1, 1, 2, 2), Tensor4<float>(1, 1, 3, 2)); },
       "expected values of shape [1, 1, 2, 2]", "got [1, 1, 3, 2]");
  says([] { FrozenKVCache<float> c(Tensor4<float>(0, 1, 2, 2), Tensor4<float>(0, 1, 2, 2)); },
       "expected keys and values of shape", "got [0, 1, 2, 2]");
  says([] { FrozenKVCache<float> c(Tensor4<float>(1, 1, 2, 0), Tensor4<float>(1, 1, 2, 0)); },
       "expected keys and values of shape", "got [1, 1, 2, 0]");

  // A layer factory that throws: the exception comes through, the layers built so far are
  // released (ASan checks the leak).
  auto failing_factory = [](Index layer) -> StaticKVCache<float> {
    if (layer == 2) throw std::invalid_argument("layer 2 cannot be built");
    return StaticKVCache<float>(1, 4, 1, 2);
  };
  REQUIRE_THROWS_AS((ModelKVCache<StaticKVCache<float>>(4, failing_factory)),
                    std::invalid_argument);
}
