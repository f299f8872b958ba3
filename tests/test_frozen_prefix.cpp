// FrozenKVCache (freeze() of static and dynamic caches) and PrefixKVCache (sequences sharing
// one frozen prefix): snapshots are exact and independent of their source, attention over
// prefix + own tokens equals the reference over the concatenation, reset/crop bookkeeping,
// errors with the strong guarantee, and concurrent readers of one prefix.
#include "support/catch.hpp"
#include "support/reference.hpp"
#include "support/snapshot.hpp"

#include <kvcache/frozen_cache.hpp>
#include <kvcache/prefix_cache.hpp>

#include <memory>
#include <thread>
#include <vector>

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::DynamicKVCache;
using kvcache::FrozenKVCache;
using kvcache::PrefixKVCache;
using kvcache::StaticKVCache;

namespace {

/// a followed by b along the sequence axis (same batch, heads, head_dim).
template <class Layout, class T>
Tensor4<T> concat_seq(const Tensor4<T>& a, const Tensor4<T>& b) {
  const Index batch = batch_of<Layout>(a), heads = heads_of<Layout>(a), d = head_dim_of<Layout>(a);
  const Index la = seq_of<Layout>(a), lb = seq_of<Layout>(b);
  Tensor4<T> out(dims<Layout>(batch, heads, la + lb, d));
  for (Index bi = 0; bi < batch; ++bi)
    for (Index h = 0; h < heads; ++h)
      for (Index c = 0; c < d; ++c) {
        for (Index s = 0; s < la; ++s) at<Layout>(out, bi, h, s, c) = at<Layout>(a, bi, h, s, c);
        for (Index s = 0; s < lb; ++s)
          at<Layout>(out, bi, h, la + s, c) = at<Layout>(b, bi, h, s, c);
      }
  return out;
}

/// A key mask of `columns` positions with every 5th position of row 1 masked out.
Mask sparse_mask(Index rows, Index columns) {
  Mask mask(rows, columns);
  mask.setConstant(true);
  for (Index p = 0; p < columns; ++p)
    if (rows > 1 && p % 5 == 2) mask(1, p) = false;
  return mask;
}

}  // namespace

TEMPLATE_TEST_CASE("freeze() copies the valid positions of static and dynamic caches exactly",
                   "[frozen]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::half, BHSD>), (Case<double, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index batch = 2, heads = 3, head_dim = 5, length = 37;
  const Tensor4<T> k = random_tensor<T, L>(batch, heads, length, head_dim, 1);
  const Tensor4<T> v = random_tensor<T, L>(batch, heads, length, head_dim, 2);

  StaticKVCache<T, L> fixed(batch, 64, heads, head_dim);
  DynamicKVCache<T, L> growing(batch, heads, head_dim);
  fixed.update(k, v);
  growing.update(slice_seq<L>(k, 0, 20), slice_seq<L>(v, 0, 20));
  growing.update(slice_seq<L>(k, 20, length - 20), slice_seq<L>(v, 20, length - 20));

  for (const auto& frozen : {fixed.freeze(), growing.freeze()}) {
    static_assert(std::is_same_v<decltype(frozen),
                                 const std::shared_ptr<const FrozenKVCache<T, L>>&>);
    REQUIRE(frozen->size() == length);
    REQUIRE(frozen->position() == length);
    REQUIRE(frozen->capacity() == length);
    REQUIRE(frozen->batch_size() == batch);
    REQUIRE(frozen->num_heads() == heads);
    REQUIRE(frozen->head_dim() == head_dim);
    REQUIRE(equal(frozen->keys(), k));
    REQUIRE(equal(frozen->values(), v));
    // Exactly size() positions, not the source's capacity.
    REQUIRE(frozen->memory_bytes() == 2 * std::size_t(batch * heads * length * head_dim) * sizeof(T));
    // attend over the snapshot is attend over the source, bit for bit.
    const Tensor4<T> q = random_tensor<T, L>(batch, 2 * heads, 4, head_dim, 3);
    REQUIRE(equal(kvcache::attend(q, *frozen), kvcache::attend(q, fixed)));
  }
}

TEMPLATE_TEST_CASE("a snapshot does not change when its source does", "[frozen]", BHSD, BSHD) {
  using L = TestType;
  const Tensor4<float> k = random_tensor<float, L>(1, 2, 10, 8, 10);
  const Tensor4<float> v = random_tensor<float, L>(1, 2, 10, 8, 11);
  const Tensor4<float> other = random_tensor<float, L>(1, 2, 10, 8, 12);
  StaticKVCache<float, L> fixed(1, 40, 2, 8);
  DynamicKVCache<float, L> growing(1, 2, 8);
  fixed.update(k, v);
  growing.update(k, v);
  const auto from_fixed = fixed.freeze();
  const auto from_growing = growing.freeze();

  // Overwrite the frozen positions in place, append more, grow, reset.
  fixed.crop(2);
  fixed.update(other, other);
  growing.crop(0);
  growing.update(other, other);
  for (int i = 0; i < 5; ++i) growing.update(other, other);  // reallocates
  fixed.reset();
  growing.reset();
  fixed.update(other, other);

  for (const auto& frozen : {from_fixed, from_growing}) {
    REQUIRE(frozen->size() == 10);
    REQUIRE(equal(frozen->keys(), k));
    REQUIRE(equal(frozen->values(), v));
  }
  // The snapshot outlives its source.
  std::shared_ptr<const FrozenKVCache<float, L>> survivor;
  {
    DynamicKVCache<float, L> temporary(1, 2, 8);
    temporary.update(k, v);
    survivor = temporary.freeze();
  }
  REQUIRE(equal(survivor->keys(), k));
}

TEMPLATE_TEST_CASE("sequences sharing a prefix each attend over prefix + own tokens",
                   "[prefix]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::half, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  const Index rep = GENERATE(1, 4);
  const Index prefix_len = GENERATE(1, 63, 64, 100);
  const bool masked = GENERATE(false, true);
  CAPTURE(rep, prefix_len, masked);
  const Index batch = 2, heads = 2, head_dim = 16, prefill = 13, decode_steps = 6;
  const Index own_len = prefill + decode_steps;

  StaticKVCache<T, L> prompt(batch, 128, heads, head_dim);
  const Tensor4<T> prefix_k = random_tensor<T, L>(batch, heads, prefix_len, head_dim, 20);
  const Tensor4<T> prefix_v = random_tensor<T, L>(batch, heads, prefix_len, head_dim, 21);
  prompt.update(prefix_k, prefix_v);
  const auto frozen = prompt.freeze();

  PrefixKVCache<T, L> a(frozen, 32), b(frozen, own_len);
  REQUIRE(a.size() == prefix_len);
  REQUIRE(a.position() == prefix_len);
  REQUIRE(a.capacity() == prefix_len + 32);
  REQUIRE(b.capacity() == prefix_len + own_len);
  REQUIRE(a.prefix() == frozen);

  // Different continuations of the same prefix.
  std::vector<PrefixKVCache<T, L>*> sequences{&a, &b};
  std::vector<Tensor4<T>> full_k, full_v;
  for (unsigned s = 0; s < 2; ++s) {
    full_k.push_back(concat_seq<L>(
        prefix_k, random_tensor<T, L>(batch, heads, own_len, head_dim, 30 + 10 * s)));
    full_v.push_back(concat_seq<L>(
        prefix_v, random_tensor<T, L>(batch, heads, own_len, head_dim, 31 + 10 * s)));
  }

  auto check = [&](std::size_t s, Index q_len, unsigned seed) {
    PrefixKVCache<T, L>& cache = *sequences[s];
    const Index kv_len = cache.position();
    const Mask mask = sparse_mask(batch, kv_len);
    AttendOptions options;
    if (masked) options.key_mask = &mask;
    const Tensor4<T> q = random_tensor<T, L>(batch, heads * rep, q_len, head_dim, seed);
    const Tensor4<T> k = slice_seq<L>(full_k[s], 0, kv_len);
    const Tensor4<T> v = slice_seq<L>(full_v[s], 0, kv_len);
    REQUIRE(equal(cache.keys(), k));
    REQUIRE(equal(cache.values(), v));
    const auto want = reference_attention<L>(q, k, v, iota_positions(kv_len), kv_len - q_len,
                                             rules_from(options));
    REQUIRE(max_abs_diff(kvcache::attend(q, cache, options), want) < tolerance<T>());
  };

  // The prefix alone, a prefill chunk, then decode steps, alternating between the sequences.
  check(0, 1, 50);
  for (std::size_t s = 0; s < 2; ++s) {
    sequences[s]->update(slice_seq<L>(full_k[s], prefix_len, prefill),
                         slice_seq<L>(full_v[s], prefix_len, prefill));
    check(s, prefill, unsigned(60 + s));
  }
  for (Index step = 0; step < decode_steps; ++step)
    for (std::size_t s = 0; s < 2; ++s) {
      const Index at = prefix_len + prefill + step;
      sequences[s]->update(slice_seq<L>(full_k[s], at, 1), slice_seq<L>(full_v[s], at, 1));
      REQUIRE(sequences[s]->size() == at + 1);
      check(s, 1, unsigned(70 + 2 * step + Index(s)));
    }
  // b is full now; the prefix was never written.
  REQUIRE_THROWS_AS(b.update(slice_seq<L>(full_k[1], 0, 1), slice_seq<L>(full_v[1], 0, 1)),
                    std::length_error);
  REQUIRE(equal(frozen->keys(), prefix_k));
  REQUIRE(equal(frozen->values(), prefix_v));
}

TEST_CASE("a prefix cache's memory does not depend on the prefix length", "[prefix]") {
  const Index batch = 2, heads = 4, head_dim = 8, max_new_tokens = 20;
  std::size_t first = 0;
  for (Index prefix_len : {Index(1), Index(50), Index(500)}) {
    DynamicKVCache<float> prompt(batch, heads, head_dim);
    prompt.update(random_tensor<float, BHSD>(batch, heads, prefix_len, head_dim, 1),
                  random_tensor<float, BHSD>(batch, heads, prefix_len, head_dim, 2));
    PrefixKVCache<float> sequence(prompt.freeze(), max_new_tokens);
    sequence.update(random_tensor<float, BHSD>(batch, heads, 3, head_dim, 3),
                    random_tensor<float, BHSD>(batch, heads, 3, head_dim, 4));
    REQUIRE(sequence.memory_bytes() ==
            2 * std::size_t(batch * heads * max_new_tokens * head_dim) * sizeof(float));
    if (first == 0) first = sequence.memory_bytes();
    REQUIRE(sequence.memory_bytes() == first);
    REQUIRE(sequence.prefix()->memory_bytes() ==
            2 * std::size_t(batch * heads * prefix_len * head_dim) * sizeof(float));
  }
}

TEMPLATE_TEST_CASE("reset() returns a sequence to its prefix", "[prefix]", BHSD, BSHD) {
  using L = TestType;
  StaticKVCache<float, L> prompt(1, 30, 2, 8);
  prompt.update(random_tensor<float, L>(1, 2, 30, 8, 1), random_tensor<float, L>(1, 2, 30, 8, 2));
  const auto frozen = prompt.freeze();
  PrefixKVCache<float, L> sequence(frozen, 10);
  const Tensor4<float> q = random_tensor<float, L>(1, 4, 1, 8, 3);
  const Tensor4<float> prefix_only = kvcache::attend(q, sequence);
  REQUIRE(equal(prefix_only, kvcache::attend(q, *frozen)));

  sequence.update(random_tensor<float, L>(1, 2, 10, 8, 4), random_tensor<float, L>(1, 2, 10, 8, 5));
  REQUIRE(sequence.size() == 40);
  sequence.reset();
  REQUIRE(sequence.size() == 30);
  REQUIRE(sequence.position() == 30);
  REQUIRE(sequence.capacity() == 40);
  REQUIRE(equal(sequence.keys(), frozen->keys()));
  REQUIRE(equal(sequence.values(), frozen->values()));
  REQUIRE(equal(kvcache::attend(q, sequence), prefix_only));
  // The own storage is kept and usable again in full.
  sequence.update(random_tensor<float, L>(1, 2, 10, 8, 6), random_tensor<float, L>(1, 2, 10, 8, 7));
  REQUIRE(sequence.size() == 40);
}

TEST_CASE("copying a sequence forks it: own tokens copied, prefix shared", "[prefix]") {
  StaticKVCache<float> prompt(1, 8, 1, 4);
  prompt.update(random_tensor<float, BHSD>(1, 1, 8, 4, 1), random_tensor<float, BHSD>(1, 1, 8, 4, 2));
  PrefixKVCache<float> parent(prompt.freeze(), 4);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 1, 2, 4, 3);
  parent.update(k, k);
  PrefixKVCache<float> child = parent;
  REQUIRE(child.prefix() == parent.prefix());
  REQUIRE(equal(child.keys(), parent.keys()));
  const Tensor4<float> parent_keys = parent.keys();
  child.update(random_tensor<float, BHSD>(1, 1, 2, 4, 4), random_tensor<float, BHSD>(1, 1, 2, 4, 5));
  REQUIRE(child.size() == 12);
  REQUIRE(parent.size() == 10);
  REQUIRE(equal(parent.keys(), parent_keys));
}

TEMPLATE_TEST_CASE("crop() above and below the prefix, then appending again", "[prefix]", BHSD,
                   BSHD) {
  using L = TestType;
  const Index prefix_len = 70, max_new = 40, heads = 2, head_dim = 8;
  const Tensor4<float> prefix_k = random_tensor<float, L>(2, heads, prefix_len, head_dim, 1);
  const Tensor4<float> prefix_v = random_tensor<float, L>(2, heads, prefix_len, head_dim, 2);
  const Tensor4<float> own_k = random_tensor<float, L>(2, heads, max_new, head_dim, 3);
  const Tensor4<float> own_v = random_tensor<float, L>(2, heads, max_new, head_dim, 4);
  DynamicKVCache<float, L> prompt(2, heads, head_dim);
  prompt.update(prefix_k, prefix_v);
  const auto frozen = prompt.freeze();

  // Attends with q_len queries and checks keys()/values() against the expected contents.
  auto check = [&](const PrefixKVCache<float, L>& cache, const Tensor4<float>& k,
                   const Tensor4<float>& v, Index q_len, unsigned seed) {
    REQUIRE(cache.size() == seq_of<L>(k));
    REQUIRE(equal(cache.keys(), k));
    REQUIRE(equal(cache.values(), v));
    const Mask mask = sparse_mask(2, cache.position());
    AttendOptions options;
    options.key_mask = &mask;
    const Tensor4<float> q = random_tensor<float, L>(2, 2 * heads, q_len, head_dim, seed);
    const auto want = reference_attention<L>(q, k, v, iota_positions(cache.size()),
                                             cache.size() - q_len, rules_from(options));
    REQUIRE(max_abs_diff(kvcache::attend(q, cache, options), want) < tolerance<float>());
  };

  PrefixKVCache<float, L> sequence(frozen, max_new);
  sequence.update(slice_seq<L>(own_k, 0, 25), slice_seq<L>(own_v, 0, 25));

  SECTION("above the prefix: keeps own tokens up to n") {
    sequence.crop(prefix_len + 10);
    REQUIRE(sequence.capacity() == prefix_len + max_new);
    const Tensor4<float> fresh_k = random_tensor<float, L>(2, heads, 30, head_dim, 9);
    const Tensor4<float> fresh_v = random_tensor<float, L>(2, heads, 30, head_dim, 10);
    sequence.update(fresh_k, fresh_v);  // exactly fills max_new again
    check(sequence,
          concat_seq<L>(concat_seq<L>(prefix_k, slice_seq<L>(own_k, 0, 10)), fresh_k),
          concat_seq<L>(concat_seq<L>(prefix_v, slice_seq<L>(own_v, 0, 10)), fresh_v), 7, 11);
    REQUIRE_THROWS_AS(sequence.update(slice_seq<L>(own_k, 0, 1), slice_seq<L>(own_v, 0, 1)),
                      std::length_error);
  }
  SECTION("exactly at the prefix length: only the prefix") {
    sequence.crop(prefix_len);
    REQUIRE(sequence.prefix_length() == prefix_len);
    check(sequence, prefix_k, prefix_v, 1, 12);
  }
  SECTION("below the prefix: keeps n prefix positions, new tokens continue at n") {
    const Index n = GENERATE(Index(0), Index(1), Index(64), Index(69));
    CAPTURE(n);
    sequence.crop(n);
    REQUIRE(sequence.size() == n);
    REQUIRE(sequence.prefix_length() == n);
    REQUIRE(sequence.capacity() == n + max_new);
    if (n > 0) check(sequence, slice_seq<L>(prefix_k, 0, n), slice_seq<L>(prefix_v, 0, n), 1, 13);
    sequence.update(slice_seq<L>(own_k, 0, 3), slice_seq<L>(own_v, 0, 3));
    sequence.update(slice_seq<L>(own_k, 3, max_new - 3), slice_seq<L>(own_v, 3, max_new - 3));
    REQUIRE(sequence.size() == n + max_new);
    check(sequence, concat_seq<L>(slice_seq<L>(prefix_k, 0, n), own_k),
          concat_seq<L>(slice_seq<L>(prefix_v, 0, n), own_v), 5, 14);
    REQUIRE_THROWS_AS(sequence.update(slice_seq<L>(own_k, 0, 1), slice_seq<L>(own_v, 0, 1)),
                      std::length_error);
    // The snapshot is untouched, and reset() brings back all of it.
    REQUIRE(equal(frozen->keys(), prefix_k));
    sequence.reset();
    check(sequence, prefix_k, prefix_v, 2, 15);
    REQUIRE(sequence.capacity() == prefix_len + max_new);
  }
}

TEMPLATE_TEST_CASE("updates with fewer batch rows zero the other rows of the own tokens",
                   "[prefix]", BHSD, BSHD) {
  using L = TestType;
  StaticKVCache<float, L> prompt(3, 4, 1, 2);
  prompt.update(random_tensor<float, L>(3, 1, 4, 2, 1), random_tensor<float, L>(3, 1, 4, 2, 2));
  PrefixKVCache<float, L> sequence(prompt.freeze(), 4);
  const Tensor4<float> k = random_tensor<float, L>(1, 1, 2, 2, 3);
  sequence.update(k, k);
  const Tensor4<float> keys = sequence.keys();
  for (Index s = 0; s < 2; ++s)
    for (Index c = 0; c < 2; ++c) {
      REQUIRE(at<L>(keys, 0, 0, 4 + s, c) == at<L>(k, 0, 0, s, c));
      REQUIRE(at<L>(keys, 1, 0, 4 + s, c) == 0.0f);
      REQUIRE(at<L>(keys, 2, 0, 4 + s, c) == 0.0f);
    }
}

TEST_CASE("edge cases: empty prefix, no own room, TensorMap input", "[prefix]") {
  DynamicKVCache<float> empty_prompt(1, 2, 4);
  const auto empty = empty_prompt.freeze();
  REQUIRE(empty->size() == 0);
  REQUIRE(empty->memory_bytes() == 0);
  PrefixKVCache<float> from_scratch(empty, 6);
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 2, 6, 4, 1);
  const Tensor4<float> v = random_tensor<float, BHSD>(1, 2, 6, 4, 2);
  Eigen::TensorMap<const Tensor4<float>> k_map(k.data(), k.dimensions());
  Eigen::TensorMap<const Tensor4<float>> v_map(v.data(), v.dimensions());
  from_scratch.update(k_map, v_map);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 2, 3, 4, 3);
  REQUIRE(max_abs_diff(kvcache::attend(q, from_scratch),
                       reference_attention<BHSD>(q, k, v, iota_positions(6), 3, {})) <
          tolerance<float>());

  StaticKVCache<float> prompt(1, 8, 2, 4);
  prompt.update(k, v);
  // Zero own positions is a zero constructor argument: an error (API.md); attend over the
  // frozen prefix itself instead.
  REQUIRE_THROWS_AS(PrefixKVCache<float>(prompt.freeze(), 0), std::invalid_argument);
  PrefixKVCache<float> one_more(prompt.freeze(), 1);
  REQUIRE(one_more.capacity() == 7);
  REQUIRE(equal(kvcache::attend(q, one_more), kvcache::attend(q, *prompt.freeze())));
}

TEMPLATE_TEST_CASE("prefix cache errors leave it unchanged", "[prefix][errors]", BHSD, BSHD) {
  using L = TestType;
  using Cache = PrefixKVCache<float, L>;
  StaticKVCache<float, L> prompt(2, 8, 2, 4);
  prompt.update(random_tensor<float, L>(2, 2, 3, 4, 1), random_tensor<float, L>(2, 2, 3, 4, 2));
  const auto frozen = prompt.freeze();

  REQUIRE_THROWS_AS(Cache(nullptr, 4), std::invalid_argument);
  REQUIRE(contains(message_of([] { (void)Cache(nullptr, 4); }), "null"));
  REQUIRE_THROWS_AS(Cache(frozen, -1), std::invalid_argument);
  REQUIRE(contains(message_of([&] { (void)Cache(frozen, -1); }), "-1"));

  Cache cache(frozen, 5);
  cache.update(random_tensor<float, L>(2, 2, 2, 4, 3), random_tensor<float, L>(2, 2, 2, 4, 4));
  const Snapshot<Cache> before(cache);
  auto tensor = [](Index b, Index h, Index s, Index d) {
    return random_tensor<float, L>(b, h, s, d, 5);
  };
  auto expect_invalid = [&](const Tensor4<float>& k, const Tensor4<float>& v) {
    REQUIRE_THROWS_AS(cache.update(k, v), std::invalid_argument);
    const std::string what = message_of([&] { cache.update(k, v); });
    CAPTURE(what);
    REQUIRE(contains(what, "expected"));
    REQUIRE(contains(what, describe(v.dimensions())));
    REQUIRE(Snapshot<Cache>(cache) == before);
  };
  expect_invalid(tensor(3, 2, 1, 4), tensor(3, 2, 1, 4));  // batch too large
  expect_invalid(tensor(1, 3, 1, 4), tensor(1, 3, 1, 4));  // heads
  expect_invalid(tensor(1, 2, 1, 5), tensor(1, 2, 1, 5));  // head_dim
  expect_invalid(tensor(1, 2, 2, 4), tensor(1, 2, 1, 4));  // k != v
  expect_invalid(tensor(1, 2, 100, 5), tensor(1, 2, 100, 5));  // shape error wins over capacity

  REQUIRE_THROWS_AS(cache.update(tensor(2, 2, 4, 4), tensor(2, 2, 4, 4)), std::length_error);
  const std::string overflow =
      message_of([&] { cache.update(tensor(2, 2, 4, 4), tensor(2, 2, 4, 4)); });
  CAPTURE(overflow);
  REQUIRE(contains(overflow, "capacity of 8"));
  REQUIRE(Snapshot<Cache>(cache) == before);

  REQUIRE_THROWS_AS(cache.crop(6), std::invalid_argument);
  REQUIRE_THROWS_AS(cache.crop(-1), std::invalid_argument);
  REQUIRE(contains(message_of([&] { cache.crop(6); }), "got 6"));
  REQUIRE(Snapshot<Cache>(cache) == before);

  // attend errors name the shapes too.
  const Tensor4<float> bad_q = tensor(1, 3, 1, 4);
  REQUIRE_THROWS_AS(kvcache::attend(bad_q, cache), std::invalid_argument);
  REQUIRE_THROWS_AS(kvcache::attend(bad_q, *frozen), std::invalid_argument);
  REQUIRE(Snapshot<Cache>(cache) == before);
}

TEST_CASE("a frozen cache built from tensors checks their shapes", "[frozen][errors]") {
  const Tensor4<float> k = random_tensor<float, BHSD>(1, 2, 3, 4, 1);
  const Tensor4<float> wrong = random_tensor<float, BHSD>(1, 2, 2, 4, 2);
  REQUIRE_THROWS_AS(FrozenKVCache<float>(k, wrong), std::invalid_argument);
  REQUIRE(contains(message_of([&] { (void)FrozenKVCache<float>(k, wrong); }), describe(wrong.dimensions())));
  REQUIRE_THROWS_AS(FrozenKVCache<float>(Tensor4<float>(1, 0, 3, 4), Tensor4<float>(1, 0, 3, 4)),
                    std::invalid_argument);
  const FrozenKVCache<float> direct(k, k);
  REQUIRE(direct.size() == 3);
  REQUIRE(equal(direct.keys(), k));
}

TEST_CASE("many threads read one frozen prefix at once", "[prefix][threads]") {
  const Index heads = 2, head_dim = 16, prefix_len = 300, own_len = 9;
  StaticKVCache<float> prompt(1, prefix_len, heads, head_dim);
  prompt.update(random_tensor<float, BHSD>(1, heads, prefix_len, head_dim, 1),
                random_tensor<float, BHSD>(1, heads, prefix_len, head_dim, 2));
  const std::shared_ptr<const FrozenKVCache<float>> frozen = prompt.freeze();
  const Tensor4<float> own_k = random_tensor<float, BHSD>(1, heads, own_len, head_dim, 3);
  const Tensor4<float> own_v = random_tensor<float, BHSD>(1, heads, own_len, head_dim, 4);
  const Tensor4<float> q = random_tensor<float, BHSD>(1, 4 * heads, 3, head_dim, 5);

  PrefixKVCache<float> serial(frozen, own_len);
  serial.update(own_k, own_v);
  const Tensor4<float> expected_sequence = kvcache::attend(q, serial);
  const Tensor4<float> expected_frozen = kvcache::attend(q, *frozen);
  REQUIRE(max_abs_diff(expected_sequence,
                       reference_attention<BHSD>(q, serial.keys(), serial.values(),
                                                 iota_positions(prefix_len + own_len),
                                                 prefix_len + own_len - 3, {})) <
          tolerance<float>());

  std::vector<std::thread> readers;
  std::vector<int> ok(6, 0);
  for (std::size_t i = 0; i < ok.size(); ++i)
    readers.emplace_back([&, i] {
      int good = 1;
      for (int round = 0; round < 10; ++round) {
        PrefixKVCache<float> own(frozen, own_len);  // each thread its own sequence
        own.update(slice_seq<BHSD>(own_k, 0, 4), slice_seq<BHSD>(own_v, 0, 4));
        own.update(slice_seq<BHSD>(own_k, 4, own_len - 4), slice_seq<BHSD>(own_v, 4, own_len - 4));
        good &= equal(kvcache::attend(q, own), expected_sequence);
        good &= equal(kvcache::attend(q, *frozen), expected_frozen);
      }
      ok[i] = good;
    });
  for (auto& t : readers) t.join();
  for (int good : ok) REQUIRE(good == 1);
  REQUIRE(frozen.use_count() == 2);  // `frozen` and `serial`: the threads' sequences are gone
}
