// SlidingWindowKVCache: the ring against the stream it was fed (keys()/values() bit-exact, sinks
// then the last window), attend() against full attention with a window mask (decode, chunks
// shorter and longer than the window, sinks, GQA, option windows, key_mask, non-causal), the
// "key no longer held" error, bounded memory, and every error path with the cache unchanged.
#include "support/catch.hpp"
#include "support/reference.hpp"
#include "support/snapshot.hpp"

#include <algorithm>
#include <initializer_list>
#include <vector>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::SlidingWindowKVCache;

namespace {

/// Positions [first, last) of x followed by positions [first2, last2), along the seq axis.
template <class L, class T>
Tensor4<T> two_runs(const Tensor4<T>& x, Index first, Index last, Index first2, Index last2) {
  const Index b = batch_of<L>(x), h = heads_of<L>(x), d = head_dim_of<L>(x);
  const Index n1 = std::max<Index>(0, last - first), n2 = std::max<Index>(0, last2 - first2);
  Tensor4<T> out(dims<L>(b, h, n1 + n2, d));
  for (Index bi = 0; bi < b; ++bi)
    for (Index hi = 0; hi < h; ++hi)
      for (Index s = 0; s < n1 + n2; ++s)
        for (Index c = 0; c < d; ++c)
          at<L>(out, bi, hi, s, c) = at<L>(x, bi, hi, s < n1 ? first + s : first2 + s - n1, c);
  return out;
}

/// A cache fed from one long random stream, and what it must hold and answer.
template <class T, class L>
struct Stream {
  Stream(Index batch, Index heads, Index head_dim, Index cache_window, Index num_sinks,
         Index total, unsigned seed)
      : window(cache_window), sinks(num_sinks),
        k(random_tensor<T, L>(batch, heads, total, head_dim, seed)),
        v(random_tensor<T, L>(batch, heads, total, head_dim, seed + 1)),
        cache(batch, cache_window, heads, head_dim, num_sinks) {}

  void append(Index n) {
    cache.update(slice_seq<L>(k, appended, n), slice_seq<L>(v, appended, n));
    appended += n;
  }

  /// Sinks, then the last window positions, of x as appended so far.
  Tensor4<T> expected(const Tensor4<T>& x) const {
    return two_runs<L>(x, 0, std::min(appended, sinks), std::max(sinks, appended - window),
                       appended);
  }

  void check_contents() const {
    REQUIRE(cache.position() == appended);
    REQUIRE(cache.size() == std::min(appended, sinks + window));
    REQUIRE(cache.capacity() == sinks + window);
    REQUIRE(equal(cache.keys(), expected(k)));
    REQUIRE(equal(cache.values(), expected(v)));
  }

  /// Worst difference between attend() over the cache and full attention with the cache's
  /// window mask (sinks exempt). The reference gets the sinks and every position from just
  /// before the first query row's window: the positions left out are masked for every row.
  double attend_error(Index q_batch, Index q_heads, Index q_len, const AttendOptions& options,
                      unsigned seed) const {
    const Tensor4<T> q =
        random_tensor<T, L>(q_batch, q_heads, q_len, head_dim_of<L>(k), seed);
    const Tensor4<T> got = kvcache::attend(q, cache, options);
    const Index first_sink_end = std::min(appended, sinks);
    const Index recent = std::max(sinks, appended - q_len - window);
    std::vector<Index> positions = iota_positions(first_sink_end);
    for (Index p = recent; p < appended; ++p) positions.push_back(p);
    ReferenceRules rules = rules_from(options);
    rules.cache_window = window;
    rules.num_sink_tokens = sinks;
    const auto want = reference_attention<L>(q, two_runs<L>(k, 0, first_sink_end, recent, appended),
                                             two_runs<L>(v, 0, first_sink_end, recent, appended),
                                             positions, appended - q_len, rules);
    return max_abs_diff(got, want);
  }

  Index window, sinks;
  Tensor4<T> k, v;
  SlidingWindowKVCache<T, L> cache;
  Index appended = 0;
};

}  // namespace

TEMPLATE_TEST_CASE("streaming one token at a time over many wraps", "[sliding_window]",
                   (Case<float, BHSD>), (Case<float, BSHD>), (Case<Eigen::half, BHSD>),
                   (Case<Eigen::bfloat16, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index window = GENERATE(1, 3, 8);
  const Index sinks = GENERATE(0, 1, 4);
  CAPTURE(window, sinks);
  const Index total = sinks + 7 * window + 3;
  Stream<T, L> stream(2, 2, 8, window, sinks, total, 11);
  for (Index step = 0; step < total; ++step) {
    CAPTURE(step);
    stream.append(1);
    stream.check_contents();
    // Decode: one query row; GQA 4 query heads over 2 KV heads; fewer query rows than batch.
    REQUIRE(stream.attend_error(2, 4, 1, {}, unsigned(100 + step)) < tolerance<T>());
    REQUIRE(stream.attend_error(1, 2, 1, {}, unsigned(200 + step)) < tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("chunks shorter, equal and longer than the window", "[sliding_window]", BHSD,
                   BSHD) {
  using L = TestType;
  const Index window = GENERATE(1, 4, 7);
  const Index sinks = GENERATE(0, 1, 4);
  CAPTURE(window, sinks);
  // Around the window: w - 1, w, w + 1, and longer than it; 1 and 2 in between.
  const std::vector<Index> chunks = {std::max<Index>(1, window - 1), 1, window, 2,
                                     window + 1, 3 * window + 2, 1, 1, window,
                                     2 * window, 1, window + 1};
  Index total = 0;
  for (Index n : chunks) total += n;
  Stream<float, L> stream(2, 2, 5, window, sinks, total, 21);
  unsigned seed = 300;
  for (Index n : chunks) {
    CAPTURE(stream.appended, n);
    stream.append(n);
    stream.check_contents();
    const AttendOptions plain;
    AttendOptions narrow;
    narrow.window = std::max<Index>(1, window / 2);  // tighter than the cache's window
    AttendOptions wide;
    wide.window = 2 * window + 1;  // looser: the cache's window wins
    AttendOptions bidirectional;
    bidirectional.causal = false;
    for (const AttendOptions* options :
         std::initializer_list<const AttendOptions*>{&plain, &narrow, &wide, &bidirectional}) {
      // The whole chunk, the last row only, and a part of the chunk.
      for (Index q_len : {n, Index(1), (n + 1) / 2}) {
        CAPTURE(q_len, options->window, options->causal);
        REQUIRE(stream.attend_error(2, 4, q_len, *options, seed++) < tolerance<float>());
      }
    }
  }
}

TEMPLATE_TEST_CASE("a 3 x window prefill then one attend is full attention with a window mask",
                   "[sliding_window]", BHSD, BSHD) {
  using L = TestType;
  const Index window = GENERATE(5, 70);  // 70: the chunk spans several of the kernel's blocks
  const Index sinks = GENERATE(0, 2);
  CAPTURE(window, sinks);
  const Index heads = 2, head_dim = 8, len = 3 * window;
  const Tensor4<float> k = random_tensor<float, L>(1, heads, len, head_dim, 31);
  const Tensor4<float> v = random_tensor<float, L>(1, heads, len, head_dim, 32);
  const Tensor4<float> q = random_tensor<float, L>(1, 2 * heads, len, head_dim, 33);
  SlidingWindowKVCache<float, L> cache(1, window, heads, head_dim, sinks);
  cache.update(k, v);
  REQUIRE(cache.size() == sinks + window);
  ReferenceRules rules;
  rules.cache_window = window;
  rules.num_sink_tokens = sinks;
  // Every key of the stream, at its absolute position: nothing left out of the reference.
  const auto want = reference_attention<L>(q, k, v, iota_positions(len), 0, rules);
  REQUIRE(max_abs_diff(kvcache::attend(q, cache), want) < tolerance<float>());
  // The same through the tensor overload with an explicit window (sinks 0 only: the option's
  // window has no sinks of its own).
  if (sinks == 0) {
    AttendOptions windowed;
    windowed.window = window;
    REQUIRE(equal(kvcache::attend<L>(q, k, v, windowed), kvcache::attend(q, cache)));
  }
}

TEMPLATE_TEST_CASE("a query that needs evicted keys throws", "[sliding_window]", BHSD, BSHD) {
  using L = TestType;
  Stream<float, L> stream(1, 1, 4, /*window=*/4, /*sinks=*/1, 40, 41);
  for (int i = 0; i < 10; ++i) stream.append(1);
  // The ring holds [6, 10) and sink 0. q_len 2 puts a row at 8, whose window starts at 5.
  const auto& cache = stream.cache;
  const Snapshot<decltype(stream.cache)> before(cache);
  const Tensor4<float> q2 = random_tensor<float, L>(1, 1, 2, 4, 42);
  REQUIRE_THROWS_AS(kvcache::attend(q2, cache), std::invalid_argument);
  const std::string what = message_of([&] { kvcache::attend(q2, cache); });
  CAPTURE(what);
  REQUIRE(contains(what, "q_len 2"));
  REQUIRE(contains(what, "[1, 6) are no longer held"));
  REQUIRE(contains(what, "expected q_len <= 1"));
  REQUIRE(Snapshot<decltype(stream.cache)>(cache) == before);
  REQUIRE(stream.attend_error(1, 1, 1, {}, 43) < tolerance<float>());
  // A tighter option window needs fewer old keys: rows 7..9 with window 2 start at 6.
  AttendOptions narrow;
  narrow.window = 2;
  REQUIRE(stream.attend_error(1, 1, 3, narrow, 44) < tolerance<float>());
  const Tensor4<float> q4 = random_tensor<float, L>(1, 1, 4, 4, 45);
  REQUIRE_THROWS_AS(kvcache::attend(q4, cache, narrow), std::invalid_argument);
  // Non-causal rows still need their window.
  AttendOptions bidirectional;
  bidirectional.causal = false;
  REQUIRE_THROWS_AS(kvcache::attend(q2, cache, bidirectional), std::invalid_argument);

  // After a long chunk the ring keeps it: later decode steps may still query back into it, as
  // far as the ring holds, and no further.
  stream.append(9);  // ring grows to 9 + 4 - 1 = 12 slots: holds [7, 19)
  stream.append(1);  // holds [8, 20)
  // 9 rows start at 11, whose window starts at 8; 10 rows would need 7.
  REQUIRE(stream.attend_error(1, 1, 9, {}, 46) < tolerance<float>());
  const Tensor4<float> q10 = random_tensor<float, L>(1, 1, 10, 4, 47);
  REQUIRE_THROWS_AS(kvcache::attend(q10, cache), std::invalid_argument);
  const std::string later = message_of([&] { kvcache::attend(q10, cache); });
  CAPTURE(later);
  REQUIRE(contains(later, "[1, 8) are no longer held"));
  REQUIRE(contains(later, "expected q_len <= 9"));
}

TEMPLATE_TEST_CASE("keys() are the sinks, then the last window, oldest first", "[sliding_window]",
                   BHSD, BSHD) {
  using L = TestType;
  const Index window = 3, sinks = 2, total = 10;
  Tensor4<float> k(dims<L>(1, 1, total, 1)), v(dims<L>(1, 1, total, 1));
  for (Index p = 0; p < total; ++p) {
    at<L>(k, 0, 0, p, 0) = float(p);
    at<L>(v, 0, 0, p, 0) = float(-p);
  }
  SlidingWindowKVCache<float, L> cache(1, window, 1, 1, sinks);
  auto positions_held = [&] {
    const Tensor4<float> held = cache.keys();
    const Tensor4<float> vals = cache.values();
    std::vector<Index> out;
    for (Index s = 0; s < seq_of<L>(held); ++s) {
      REQUIRE(at<L>(vals, 0, 0, s, 0) == -at<L>(held, 0, 0, s, 0));
      out.push_back(Index(at<L>(held, 0, 0, s, 0)));
    }
    return out;
  };
  REQUIRE(positions_held().empty());
  cache.update(slice_seq<L>(k, 0, 1), slice_seq<L>(v, 0, 1));
  REQUIRE(positions_held() == std::vector<Index>{0});
  cache.update(slice_seq<L>(k, 1, 3), slice_seq<L>(v, 1, 3));  // a chunk across the sinks' end
  REQUIRE(positions_held() == std::vector<Index>{0, 1, 2, 3});
  for (Index p = 4; p < total; ++p) cache.update(slice_seq<L>(k, p, 1), slice_seq<L>(v, p, 1));
  REQUIRE(positions_held() == std::vector<Index>{0, 1, 7, 8, 9});
  REQUIRE(cache.window() == window);
  REQUIRE(cache.num_sink_tokens() == sinks);

  // reset() forgets the sinks too; the ring, grown to 3 + 3 - 1 = 5 slots by the 3-token chunk,
  // returns to the window's 3; the cache refills from position 0.
  REQUIRE(cache.memory_bytes() == std::size_t(sinks + 5) * 2 * sizeof(float));
  cache.reset();
  REQUIRE(cache.size() == 0);
  REQUIRE(cache.position() == 0);
  REQUIRE(cache.memory_bytes() == std::size_t(sinks + window) * 2 * sizeof(float));
  cache.update(slice_seq<L>(k, 5, 5), slice_seq<L>(v, 5, 5));
  REQUIRE(positions_held() == std::vector<Index>{5, 6, 7, 8, 9});
}

TEMPLATE_TEST_CASE("memory stays bounded however long the stream", "[sliding_window]", BHSD,
                   BSHD) {
  using L = TestType;
  const Index window = 8, sinks = 2, heads = 2, head_dim = 4;
  const Index chunk = GENERATE(1, 3);
  CAPTURE(chunk);
  SlidingWindowKVCache<float, L> cache(1, window, heads, head_dim, sinks);
  const Tensor4<float> k = random_tensor<float, L>(1, heads, chunk, head_dim, 51);
  const std::size_t row_bytes = 2 * heads * head_dim * sizeof(float);
  REQUIRE(cache.memory_bytes() == std::size_t(sinks + window) * row_bytes);
  while (cache.position() < window) cache.update(k, k);
  const std::size_t after_first_window = cache.memory_bytes();
  // A chunk of c tokens needs the ring to hold c + window - 1 positions.
  REQUIRE(after_first_window == std::size_t(sinks + window + chunk - 1) * row_bytes);
  while (cache.position() < 100 * window) cache.update(k, k);
  REQUIRE(cache.memory_bytes() == after_first_window);
  REQUIRE(cache.size() == sinks + window);

  // A long chunk grows the ring once, to what it needs; the ring is then reused.
  const Tensor4<float> long_chunk = random_tensor<float, L>(1, heads, 5 * window, head_dim, 52);
  cache.update(long_chunk, long_chunk);
  const std::size_t after_long = cache.memory_bytes();
  REQUIRE(after_long == std::size_t(sinks + 5 * window + window - 1) * row_bytes);
  for (int i = 0; i < 50; ++i) cache.update(k, k);
  cache.update(long_chunk, long_chunk);
  REQUIRE(cache.memory_bytes() == after_long);
}

TEMPLATE_TEST_CASE("reset() releases a ring grown for a long chunk", "[sliding_window]", BHSD,
                   BSHD) {
  using L = TestType;
  const Index window = 4, sinks = 2, heads = 2, head_dim = 4;
  const std::size_t row_bytes = 2 * heads * head_dim * sizeof(float);
  const std::size_t base = std::size_t(sinks + window) * row_bytes;
  Stream<float, L> stream(1, heads, head_dim, window, sinks, 100, 53);
  auto& cache = stream.cache;
  REQUIRE(cache.memory_bytes() == base);
  stream.append(3);
  stream.append(30);  // the ring grows to 30 + 4 - 1 = 33 slots
  REQUIRE(cache.memory_bytes() == std::size_t(sinks + 33) * row_bytes);
  REQUIRE(stream.attend_error(1, 4, 30, {}, 54) < tolerance<float>());

  // A new sequence: back to the storage of a new cache.
  cache.reset();
  REQUIRE(cache.size() == 0);
  REQUIRE(cache.position() == 0);
  REQUIRE(cache.memory_bytes() == base);
  // It works like a new cache: the stream's tokens again, one at a time, over several wraps.
  stream.appended = 0;
  for (Index step = 0; step < 3 * window; ++step) {
    stream.append(1);
    stream.check_contents();
    REQUIRE(stream.attend_error(1, 4, 1, {}, unsigned(55 + step)) < tolerance<float>());
    REQUIRE(cache.memory_bytes() == base);
  }
  // A long chunk grows it again, to what that chunk needs.
  stream.append(10);
  stream.check_contents();
  REQUIRE(cache.memory_bytes() == std::size_t(sinks + 10 + window - 1) * row_bytes);
  REQUIRE(stream.attend_error(1, 4, 10, {}, 70) < tolerance<float>());

  // A ring that never grew keeps its storage across reset(): the same buffer is reused.
  cache.reset();
  stream.appended = 0;
  stream.append(1);
  const float* storage = cache.attention_view().segments[0].keys;
  cache.reset();
  stream.appended = 0;
  stream.append(1);
  REQUIRE(cache.attention_view().segments[0].keys == storage);
  REQUIRE(cache.memory_bytes() == base);
}

TEMPLATE_TEST_CASE("key_mask applies to sinks and window keys by absolute position",
                   "[sliding_window]", BHSD, BSHD) {
  using L = TestType;
  const Index window = 5, sinks = 2;
  const std::vector<Index> chunks = {3, 1, 6, 1, 1, 12, 2, 1};
  Index total = 0;
  for (Index n : chunks) total += n;
  Stream<float, L> stream(2, 2, 4, window, sinks, total, 61);
  unsigned seed = 600;
  for (Index n : chunks) {
    stream.append(n);
    Mask mask(3, stream.appended);  // more rows than the batch is fine
    for (Index b = 0; b < 3; ++b)
      for (Index p = 0; p < stream.appended; ++p) mask(b, p) = (b + 3 * p) % 4 != 0;
    mask(0, 0) = false;  // a masked sink
    AttendOptions options;
    options.key_mask = &mask;
    CAPTURE(stream.appended, n);
    REQUIRE(stream.attend_error(2, 4, n, options, seed++) < tolerance<float>());
    REQUIRE(stream.attend_error(1, 2, 1, options, seed++) < tolerance<float>());
    // The key mask spans position(), not size().
    if (stream.cache.size() != stream.appended) {
      Mask short_mask(2, stream.cache.size());
      short_mask.setConstant(true);
      AttendOptions wrong;
      wrong.key_mask = &short_mask;
      const Tensor4<float> q = random_tensor<float, L>(1, 2, 1, 4, seed++);
      REQUIRE_THROWS_AS(kvcache::attend(q, stream.cache, wrong), std::invalid_argument);
    }
  }
}

TEMPLATE_TEST_CASE("updates accept TensorMaps and fewer batch rows", "[sliding_window]", BHSD,
                   BSHD) {
  using L = TestType;
  SlidingWindowKVCache<float, L> cache(2, 3, 1, 2, 1);
  Tensor4<float> full = random_tensor<float, L>(2, 1, 4, 2, 71);
  Eigen::TensorMap<Tensor4<float>> map(full.data(), full.dimensions());
  Eigen::TensorMap<const Tensor4<float>> const_map(full.data(), full.dimensions());
  cache.update(map, const_map);
  REQUIRE(equal(cache.keys(), full));
  const Tensor4<float> one_row = random_tensor<float, L>(1, 1, 2, 2, 72);
  cache.update(one_row, one_row);  // positions 4, 5: row 1 is zero there
  const Tensor4<float> held = cache.keys();
  REQUIRE(seq_of<L>(held) == 4);  // sink 0, then positions 3, 4, 5
  for (Index c = 0; c < 2; ++c) {
    REQUIRE(at<L>(held, 0, 0, 0, c) == at<L>(full, 0, 0, 0, c));
    REQUIRE(at<L>(held, 1, 0, 1, c) == at<L>(full, 1, 0, 3, c));
    for (Index s = 2; s < 4; ++s) {
      REQUIRE(at<L>(held, 0, 0, s, c) == at<L>(one_row, 0, 0, s - 2, c));
      REQUIRE(at<L>(held, 1, 0, s, c) == 0.0f);
    }
  }
  // A zero-length update is a no-op.
  const Snapshot<decltype(cache)> before(cache);
  const Tensor4<float> empty(dims<L>(1, 1, 0, 2));
  cache.update(empty, empty);
  REQUIRE(Snapshot<decltype(cache)>(cache) == before);
}

TEMPLATE_TEST_CASE("sliding-window errors leave the cache unchanged", "[sliding_window][errors]",
                   BHSD, BSHD) {
  using L = TestType;
  // batch 2, heads 2, head_dim 4, window 3, one sink; fed past a ring growth (to 5 + 3 - 1 =
  // 7 slots) and a wrap: 9 positions appended, the ring holds [2, 9).
  SlidingWindowKVCache<float, L> cache(2, 3, 2, 4, 1);
  const Tensor4<float> chunk = random_tensor<float, L>(2, 2, 5, 4, 81);
  cache.update(chunk, chunk);
  const Tensor4<float> one = random_tensor<float, L>(2, 2, 1, 4, 82);
  for (int i = 0; i < 4; ++i) cache.update(one, one);
  const Snapshot<decltype(cache)> before(cache);
  auto tensor = [](Index b, Index h, Index s, Index d) {
    return random_tensor<float, L>(b, h, s, d, 83);
  };
  auto expect_invalid = [&](const Tensor4<float>& k, const Tensor4<float>& v,
                            const std::string& received) {
    require_invalid_update(cache, k, v, received);
  };
  const std::string layout = std::string(" (") + L::name + ")";
  expect_invalid(tensor(3, 2, 1, 4), tensor(3, 2, 1, 4), describe(dims<L>(3, 2, 1, 4)) + layout);
  expect_invalid(tensor(1, 3, 1, 4), tensor(1, 3, 1, 4), describe(dims<L>(1, 3, 1, 4)));
  expect_invalid(tensor(1, 2, 1, 5), tensor(1, 2, 1, 5), describe(dims<L>(1, 2, 1, 5)));
  expect_invalid(tensor(0, 2, 1, 4), tensor(0, 2, 1, 4), describe(dims<L>(0, 2, 1, 4)));
  expect_invalid(tensor(1, 2, 2, 4), tensor(1, 2, 1, 4), describe(dims<L>(1, 2, 1, 4)));
  // A wrong shape that a correct one would make the ring grow for: nothing grows.
  expect_invalid(tensor(1, 2, 50, 5), tensor(1, 2, 50, 5), describe(dims<L>(1, 2, 50, 5)));
  expect_invalid(tensor(1, 2, 0, 5), tensor(1, 2, 0, 5), describe(dims<L>(1, 2, 0, 5)));

  auto q = [](Index b, Index h, Index s, Index d) { return random_tensor<float, L>(b, h, s, d, 84); };
  auto expect_attend_invalid = [&](const Tensor4<float>& query, const AttendOptions& options,
                                   const std::string& part) {
    REQUIRE_THROWS_AS(kvcache::attend(query, cache, options), std::invalid_argument);
    const std::string what = message_of([&] { kvcache::attend(query, cache, options); });
    CAPTURE(what);
    REQUIRE(contains(what, part));
    REQUIRE(Snapshot<decltype(cache)>(cache) == before);
  };
  expect_attend_invalid(q(3, 2, 1, 4), {}, describe(dims<L>(3, 2, 1, 4)));
  expect_attend_invalid(q(1, 3, 1, 4), {}, "a multiple of 2");
  expect_attend_invalid(q(1, 2, 1, 8), {}, describe(dims<L>(1, 2, 1, 8)));
  expect_attend_invalid(q(1, 2, 10, 4), {}, "q_len 10 exceeds the 9 positions");
  // 6 rows start at 3, whose window reaches back to the evicted position 1.
  expect_attend_invalid(q(1, 2, 6, 4), {}, "[1, 2) are no longer held");
  AttendOptions negative_window;
  negative_window.window = -1;
  expect_attend_invalid(q(1, 2, 1, 4), negative_window, "got -1");
  Mask size_mask(2, cache.size());
  AttendOptions masked;
  masked.key_mask = &size_mask;
  expect_attend_invalid(q(2, 2, 1, 4), masked, "key_mask");
}

TEST_CASE("sliding-window constructor arguments", "[sliding_window][errors]") {
  REQUIRE_THROWS_AS(SlidingWindowKVCache<float>(0, 4, 1, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(SlidingWindowKVCache<float>(1, 0, 1, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(SlidingWindowKVCache<float>(1, -4, 1, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(SlidingWindowKVCache<float>(1, 4, 0, 1), std::invalid_argument);
  REQUIRE_THROWS_AS(SlidingWindowKVCache<float>(1, 4, 1, -1), std::invalid_argument);
  REQUIRE_THROWS_AS(SlidingWindowKVCache<float>(1, 4, 1, 1, -1), std::invalid_argument);
  REQUIRE(contains(message_of([] { SlidingWindowKVCache<float>(1, -3, 1, 1); }), "window"));
  REQUIRE(contains(message_of([] { SlidingWindowKVCache<float>(1, -3, 1, 1); }), "-3"));
  REQUIRE(contains(message_of([] { SlidingWindowKVCache<float>(1, 3, 1, 1, -2); }),
                   "num_sink_tokens"));
  const SlidingWindowKVCache<float> no_sinks(1, 4, 1, 1, 0);
  REQUIRE(no_sinks.capacity() == 4);
  const SlidingWindowKVCache<double, BSHD> with_sinks(2, 4, 3, 5, 4);
  REQUIRE(with_sinks.capacity() == 8);
  REQUIRE(with_sinks.batch_size() == 2);
  REQUIRE(with_sinks.num_heads() == 3);
  REQUIRE(with_sinks.head_dim() == 5);
  REQUIRE(with_sinks.size() == 0);
  REQUIRE(with_sinks.memory_bytes() == 2 * 2 * 3 * 5 * 8 * sizeof(double));
}

TEMPLATE_TEST_CASE("attend on a thread pool matches the serial result", "[sliding_window]",
                   BHSD, BSHD) {
  using L = TestType;
  Stream<float, L> stream(2, 2, 16, 40, 3, 200, 91);
  stream.append(130);
  stream.append(1);
  const Tensor4<float> q = random_tensor<float, L>(2, 8, 100, 16, 92);
  Eigen::ThreadPool pool(2);
  Eigen::ThreadPoolDevice device(&pool, 2);
  AttendOptions parallel;
  parallel.device = &device;
  const Tensor4<float> serial = kvcache::attend(q, stream.cache);
  REQUIRE(equal(kvcache::attend(q, stream.cache, parallel), serial));
  REQUIRE(stream.attend_error(2, 8, 100, {}, 92) < tolerance<float>());
}
