// libFuzzer target: load() of every cache kind (docs/persistence_format.md).
//
// The first input byte picks the type asked for (kTypes below: StaticKVCache<float>,
// StaticKVCache<Eigen::half, BSHD>, DynamicKVCache<float>, SlidingWindowKVCache<float>,
// Int8KVCache<float>, Int4KVCache<float>, FrozenKVCache<float>,
// ModelKVCache<SlidingWindowKVCache<float, BSHD>>, Int8KVCache<Eigen::bfloat16, BSHD>, and a
// ModelKVCache of std::variant<StaticKVCache<float>, SlidingWindowKVCache<float>,
// Int4KVCache<float, BSHD>> layers, PagedKVCache<float> and PagedKVCache<Eigen::half, BSHD>)
// and the mode:
//  0 raw      the rest of the input is the stream;
//  1 mutated  a few input bytes build a small valid cache of that type (updates, crops, ring
//             growth, NaN/infinite payloads), whose save() is then edited as the input says
//             (XOR a byte, flip a bit, truncate, set a header field, append, insert or delete a
//             byte): the checksums make any real change detectable, so load() must throw
//             FormatError unless the edits left the record itself unchanged (appended bytes
//             after a record are not part of it);
//  2 semantic as 1, then the header CRC and the record checksum of every record are
//             recomputed, so the edits reach load()'s consistency checks (sizes, ring state,
//             quantization state).
// In every mode load() (with LoadLimits of 8 MiB) must return or throw kvcache::FormatError:
// another exception, a sanitizer report or a crash is a finding. When it returns:
//  * save() of the loaded cache gives exactly the bytes load() consumed, and load() stopped
//    right after them (a record accepted is canonical: save(load(x)) == x);
//  * load(save()) of it gives the same keys(), values(), size(), position(), capacity(),
//    memory_bytes() and quantized bytes, and the same bytes again;
//  * attend() of a one-token query does not throw, is finite when the payload is (|x| <= 1e6),
//    and matches the naive double reference over keys()/values() when the payload is moderate;
//  * after a one-token update (where there is room) the same holds.
// Run with --write-seeds=DIR to write the seed corpus; with KVFUZZ_DUMP_RECORD=FILE to write
// the stream an input gives load() (a reproducer for C::load without the fuzzer).
#include "fuzz_common.hpp"
#include "support/reference.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace {

using namespace kvfuzz;
using kvcache::AttendOptions;
using kvcache::BHSD;
using kvcache::BSHD;
using kvcache::LoadLimits;
using kvcache::QuantConfig;

constexpr std::uint64_t kLoadLimitBytes = std::uint64_t{8} << 20;

// --- which kind a type is -------------------------------------------------------------------------

template <class C>
struct is_model : std::false_type {};
template <class C>
struct is_model<kvcache::ModelKVCache<C>> : std::true_type {};

template <class C>
struct is_sliding : std::false_type {};
template <class T, class L>
struct is_sliding<kvcache::SlidingWindowKVCache<T, L>> : std::true_type {};

template <class C>
struct is_quantized : std::false_type {};
template <class T, int Bits, class L>
struct is_quantized<kvcache::QuantizedKVCache<T, Bits, L>> : std::true_type {};

template <class C>
struct is_frozen : std::false_type {};
template <class T, class L>
struct is_frozen<kvcache::FrozenKVCache<T, L>> : std::true_type {};

template <class C>
struct is_static : std::false_type {};
template <class T, class L>
struct is_static<kvcache::StaticKVCache<T, L>> : std::true_type {};

template <class C>
struct is_dynamic : std::false_type {};
template <class T, class L>
struct is_dynamic<kvcache::DynamicKVCache<T, L>> : std::true_type {};

template <class C>
struct is_paged : std::false_type {};
template <class T, class L>
struct is_paged<kvcache::PagedKVCache<T, L>> : std::true_type {};

template <class C>
struct is_variant : std::false_type {};
template <class... Alternatives>
struct is_variant<std::variant<Alternatives...>> : std::true_type {};

/// Calls f on a layer: the cache itself, or the active alternative of a variant.
using kvcache::detail::visit_layer;

template <class C>
constexpr bool has_crop_v = is_static<C>::value || is_dynamic<C>::value || is_quantized<C>::value;

// --- building a small valid cache from a few bytes ---------------------------------------------------

template <class T, class L>
Tensor4<T> make_tensor(Index b, Index h, Index n, Index d, std::uint16_t seed, int mode) {
  Tensor4<T> x(kvtest::dims<L>(b, h, n, d));
  Numbers numbers(seed * 0x9E3779B1ull + 7);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(numbers.element(mode));
  return x;
}

/// A few updates (and crops, for the kinds that have them) of random chunk lengths.
template <class C>
void fill(C& cache, ByteReader& in, Index max_length) {
  using T = typename C::element_type;
  using L = typename C::layout_type;
  const Index updates = in.range(0, 4);
  for (Index u = 0; u < updates; ++u) {
    Index n = in.range(0, 6);
    if constexpr (!is_sliding<C>::value && !is_dynamic<C>::value)
      n = std::min(n, max_length - cache.position());
    const Index b = in.range(1, cache.batch_size());
    const int mode = in.chance(32) ? 3 : static_cast<int>(in.range(0, 2));
    const std::uint16_t seed = in.u16();
    Tensor4<T> k = make_tensor<T, L>(b, cache.num_heads(), n, cache.head_dim(), seed, mode);
    Tensor4<T> v = make_tensor<T, L>(b, cache.num_heads(), n, cache.head_dim(), seed + 1, mode);
    if constexpr (is_quantized<C>::value) {  // they refuse NaN and infinities
      for (Tensor4<T>* x : {&k, &v})
        for (Index i = 0; i < x->size(); ++i)
          if (!std::isfinite(static_cast<float>(x->data()[i]))) x->data()[i] = T(0);
    }
    cache.update(k, v);
    if constexpr (has_crop_v<C>) {
      if (in.chance(40)) cache.crop(in.range(0, cache.size()));
    }
  }
}

template <class C>
C build_one(ByteReader& in) {
  using T = typename C::element_type;
  using L = typename C::layout_type;
  const Index b = in.range(1, 2), h = in.range(1, 2);
  if constexpr (is_quantized<C>::value) {
    const int bits = C::bits;
    const Index d = bits == 4 ? 2 * in.range(1, 4) : in.range(1, 8);
    std::vector<Index> divisors;
    for (Index g = 1; g <= d; ++g)
      if (d % g == 0 && (bits == 8 || g % 2 == 0)) divisors.push_back(g);
    QuantConfig config;
    config.group_size = divisors[static_cast<std::size_t>(in.range(0, Index(divisors.size()) - 1))];
    config.residual_length = in.range(0, 6);
    const Index capacity = in.range(1, 24);
    C cache(b, capacity, h, d, config);
    fill(cache, in, capacity);
    return cache;
  } else if constexpr (is_sliding<C>::value) {
    C cache(b, in.range(1, 4), h, in.range(1, 4), in.range(0, 2));
    fill(cache, in, 0);
    return cache;
  } else if constexpr (is_dynamic<C>::value) {
    C cache(b, h, in.range(1, 4), in.range(0, 3));
    fill(cache, in, 0);
    return cache;
  } else if constexpr (is_static<C>::value) {
    const Index capacity = in.range(1, 12);
    C cache(b, capacity, h, in.range(1, 4));
    fill(cache, in, capacity);
    return cache;
  } else {
    static_assert(is_frozen<C>::value);
    const Index capacity = in.range(1, 12);
    kvcache::StaticKVCache<T, L> cache(b, capacity, h, in.range(1, 4));
    fill(cache, in, capacity);
    return *cache.freeze();
  }
}

/// A layer of a model: one kind, or an alternative of a variant that the input picks.
template <class Layer, std::size_t I = 0>
Layer build_layer(ByteReader& in, std::size_t pick) {
  if constexpr (is_variant<Layer>::value) {
    if constexpr (I + 1 < std::variant_size_v<Layer>) {
      if (pick % std::variant_size_v<Layer> != I) return build_layer<Layer, I + 1>(in, pick);
    }
    return Layer(std::in_place_index<I>, build_one<std::variant_alternative_t<I, Layer>>(in));
  } else {
    (void)pick;
    return build_one<Layer>(in);
  }
}

/// A small pool after a few operations: sequences appended to (any values: a pool stores
/// NaN and infinities as they are), forked, published, cropped and removed.
template <class C>
C build_paged(ByteReader& in) {
  using T = typename C::element_type;
  using L = typename C::layout_type;
  kvcache::PagedConfig config;
  config.num_layers = in.range(1, 2);
  config.num_blocks = in.range(1, 12);
  config.block_size = in.range(1, 4);
  config.num_heads = in.range(1, 2);
  config.head_dim = in.range(1, 4);
  C pool(config);
  std::vector<std::int32_t> tokens;
  for (Index i = 0; i < 12; ++i) tokens.push_back(static_cast<std::int32_t>(in.range(0, 3)));
  const Index operations = in.range(0, 8);
  for (Index op = 0; op < operations; ++op) {
    const std::vector<typename C::SequenceId> live = pool.sequences();
    const Index what = live.empty() ? 0 : in.range(0, 5);
    const auto s = live.empty() ? 0 : live[static_cast<std::size_t>(in.range(0, Index(live.size()) - 1))];
    if (what == 0) {
      pool.add_sequence(std::vector<std::int32_t>(tokens.begin(), tokens.begin() + in.range(0, 12)));
    } else if (what == 1) {
      const Index n = in.range(1, 5);
      const int mode = in.chance(32) ? 3 : static_cast<int>(in.range(0, 2));
      const std::uint16_t seed = in.u16();
      for (Index layer = 0; layer < config.num_layers; ++layer) {
        const Tensor4<T> k = make_tensor<T, L>(1, config.num_heads, n, config.head_dim, seed, mode);
        try {
          pool.update(layer, s, k, k);
        } catch (const kvcache::OutOfBlocks&) {
          break;  // a full pool: the layers stay as they are
        }
      }
    } else if (what == 2) {
      pool.fork(s);
    } else if (what == 3) {
      Index smallest = pool.size(s, 0);
      for (Index layer = 1; layer < config.num_layers; ++layer) smallest = std::min(smallest, pool.size(s, layer));
      pool.cache_prefix(s, std::vector<std::int32_t>(tokens.begin(), tokens.begin() + std::min<Index>(smallest, 12)));
    } else if (what == 4) {
      Index smallest = pool.size(s, 0);
      for (Index layer = 1; layer < config.num_layers; ++layer) smallest = std::min(smallest, pool.size(s, layer));
      pool.crop(s, in.range(0, smallest));
    } else {
      pool.remove_sequence(s);
    }
  }
  return pool;
}

template <class C>
C build(ByteReader& in) {
  if constexpr (is_paged<C>::value) {
    return build_paged<C>(in);
  } else if constexpr (is_model<C>::value) {
    using Layer = typename C::cache_type;
    return C(in.range(1, 3), [&](Index) { return build_layer<Layer>(in, in.u8()); });
  } else {
    return build_one<C>(in);
  }
}

template <class C>
std::string saved(const C& cache) {
  std::ostringstream out;
  std::string what;
  const Outcome got = outcome_of([&] { cache.save(out); }, &what);
  FUZZ_CHECK(got == Outcome::ok, "save() threw ", name(got), ": ", what);
  return out.str();
}

/// Where each record of a saved C lies in its bytes: one record, or a model's header (33 bytes,
/// no trailing checksum) and its layers.
struct Record {
  std::size_t start, length;
  bool trailing_checksum;
  bool outer_crc32 = false;  ///< a mixed model's CRC-32 (IEEE) over [start, start + length - 4)
};

template <class C>
std::vector<Record> records_of(const C& cache, const std::string& bytes) {
  if constexpr (is_model<C>::value) {
    // A mixed model (std::variant layers) has a layer-type table after its header and an outer
    // CRC-32 at the end, fixed last (it covers the layers).
    constexpr bool mixed = is_variant<typename C::cache_type>::value;
    std::vector<Record> records = {{0, 33, false}};
    std::size_t at = 33 + (mixed ? 5 * static_cast<std::size_t>(cache.num_layers()) : 0);
    for (const auto& layer : cache) {
      const std::size_t length = visit_layer(layer, [](const auto& c) { return saved(c).size(); });
      records.push_back({at, length, true});
      at += length;
    }
    if (mixed) records.push_back({0, bytes.size(), false, true});
    return records;
  } else {
    return {{0, bytes.size(), true}};
  }
}

// --- edits -------------------------------------------------------------------------------------------

std::uint64_t read_u64(const std::string& s, std::size_t at) {
  std::uint64_t x = 0;
  for (int i = 7; i >= 0; --i) x = (x << 8) | static_cast<std::uint8_t>(s[at + static_cast<std::size_t>(i)]);
  return x;
}
void write_u64(std::string& s, std::size_t at, std::uint64_t x) {
  for (int i = 0; i < 8; ++i) s[at + static_cast<std::size_t>(i)] = static_cast<char>((x >> (8 * i)) & 0xFF);
}
void write_u32(std::string& s, std::size_t at, std::uint32_t x) {
  for (int i = 0; i < 4; ++i) s[at + static_cast<std::size_t>(i)] = static_cast<char>((x >> (8 * i)) & 0xFF);
}
std::uint32_t read_u32(const std::string& s, std::size_t at) {
  std::uint32_t x = 0;
  for (int i = 3; i >= 0; --i) x = (x << 8) | static_cast<std::uint8_t>(s[at + static_cast<std::size_t>(i)]);
  return x;
}

void apply_edits(std::string& s, ByteReader& in, const std::vector<Record>& records) {
  const Index edits = in.range(1, 4);
  for (Index e = 0; e < edits; ++e) {
    const std::size_t size = s.size();
    switch (in.range(0, 7)) {
      case 0: case 1:
        if (size > 0) s[in.u16() % size] ^= static_cast<char>(in.u8());
        break;
      case 2:
        if (size > 0) s[in.u16() % size] ^= static_cast<char>(1u << (in.u8() % 8));
        break;
      case 3:
        s.resize(in.u16() % (size + 1));
        break;
      case 4: {  // set a u64 header field
        const Record& r = records[static_cast<std::size_t>(in.range(0, Index(records.size()) - 1))];
        if (r.start + 16 > size) break;
        // The record's fields: (header_size - 25) / 8 of them (1, 5 or 9 for intact headers).
        const std::size_t fields = std::clamp<std::size_t>((read_u32(s, r.start + 12) - 25) / 8, 1, 9);
        const std::size_t at = r.start + 21 + 8 * static_cast<std::size_t>(in.range(0, Index(fields) - 1));
        if (at + 8 > size) break;
        const std::uint64_t old = read_u64(s, at);
        std::uint64_t value;
        switch (in.range(0, 9)) {
          case 0: value = in.range(0, 70); break;
          case 1: value = old + static_cast<std::uint64_t>(in.range(1, 3)); break;
          case 2: value = old - static_cast<std::uint64_t>(in.range(1, 3)); break;
          case 3: value = std::uint64_t{1} << 63; break;
          case 4: value = (std::uint64_t{1} << 63) - 1; break;
          case 5: value = ~std::uint64_t{0}; break;
          case 6: value = std::uint64_t{1} << (in.u8() % 64); break;
          case 7: value = in.u32(); break;
          default: value = old * static_cast<std::uint64_t>(in.range(2, 4)); break;
        }
        write_u64(s, at, value);
        break;
      }
      case 5: {
        const Index n = in.range(1, 8);
        for (Index i = 0; i < n; ++i) s.push_back(static_cast<char>(in.u8()));
        break;
      }
      case 6:
        s.insert(s.begin() + static_cast<std::ptrdiff_t>(in.u16() % (size + 1)), static_cast<char>(in.u8()));
        break;
      default:
        if (size > 0) s.erase(in.u16() % size, 1);
        break;
    }
  }
}

/// Recomputes the header CRC and the trailing checksum of every record where it lies in the
/// original layout (so that edits reach the checks behind them).
void fix_checksums(std::string& s, const std::vector<Record>& records) {
  auto crc = [&](std::size_t from, std::size_t to) {
    return kvcache::detail::crc32c(reinterpret_cast<const std::uint8_t*>(s.data()) + from, to - from);
  };
  for (const Record& r : records) {
    if (r.outer_crc32) {
      const std::size_t end = std::min(r.start + r.length, s.size());
      if (end >= r.start + 4)
        write_u32(s, end - 4, kvcache::detail::crc32_ieee_update(
                                  0, reinterpret_cast<const std::uint8_t*>(s.data()) + r.start,
                                  end - 4 - r.start));
      continue;
    }
    if (r.start + 16 > s.size()) return;
    const std::uint32_t header = read_u32(s, r.start + 12);
    if (header < 33 || header > 256 || r.start + header > s.size()) continue;
    write_u32(s, r.start + header - 4, crc(r.start, r.start + header - 4));
    if (!r.trailing_checksum) continue;
    const std::size_t end = std::min(r.start + r.length, s.size());
    if (end >= r.start + header + 4) write_u32(s, end - 4, crc(r.start, end - 4));
  }
}

// --- checks on a loaded cache -----------------------------------------------------------------------

template <class C>
C load(std::istream& in) {
  LoadLimits limits;
  limits.max_memory_bytes = kLoadLimitBytes;
  return C::load(in, limits);
}

/// |zero| and |scale| over every quantized block of a cache (0 for the other kinds).
template <class C>
double max_quantization_number(const C& c) {
  if constexpr (is_quantized<C>::value) {
    const auto view = c.attention_view();
    const kvcache::detail::QuantSegment& s = view.quantized;
    const kvcache::detail::QuantBlockFormat<C::bits> format{c.config().group_size, c.head_dim()};
    double m = 0;
    for (Index b = 0; b < view.batch_size; ++b)
      for (Index h = 0; h < view.num_heads; ++h)
        for (Index i = 0; i < s.num_blocks; ++i) {
          const std::uint8_t* block = s.blocks + b * s.batch_stride + h * s.head_stride + i * s.bytes_per_block;
          for (const Index offset : {format.key_zeros_offset(), format.value_zeros_offset()})
            for (Index j = 0; j < 2 * c.head_dim(); ++j) {
              Eigen::bfloat16 x;
              std::memcpy(&x, block + offset + 2 * j, sizeof x);
              const float f = static_cast<float>(x);
              if (!std::isfinite(f)) return std::numeric_limits<double>::infinity();
              m = std::max(m, std::abs(double(f)));
            }
        }
    return m;
  } else {
    (void)c;
    return 0;
  }
}

template <class T>
double max_abs(const Tensor4<T>& x) {
  double m = 0;
  for (Index i = 0; i < x.size(); ++i) {
    const double v = static_cast<double>(static_cast<float>(x.data()[i]));
    if (!std::isfinite(v)) return std::numeric_limits<double>::infinity();
    m = std::max(m, std::abs(v));
  }
  return m;
}

/// attend() of a one-token query over c: no exception; finite for a finite, bounded payload;
/// the reference's answer for a moderate one.
template <class C>
void probe(const C& c, const char* when) {
  using T = typename C::element_type;
  using L = typename C::layout_type;
  const Index position = c.position();
  if (position == 0) return;
  const Index hq = c.num_heads() * (1 + position % 2);
  const Tensor4<T> q = make_tensor<T, L>(1, hq, 1, c.head_dim(), static_cast<std::uint16_t>(position), 0);
  Tensor4<T> out;
  std::string what;
  const Outcome got = outcome_of([&] { out = kvcache::attend(q, c); }, &what);
  FUZZ_CHECK(got == Outcome::ok, when, ": attend() of a one-token query threw ", name(got), ": ", what);

  const Tensor4<T> keys = c.keys(), values = c.values();
  const double mq = max_abs(q), mk = max_abs(keys), mv = max_abs(values);
  const double mz = max_quantization_number(c);  // zeros and scales
  if (mk > 1e6 || mv > 1e6 || mz > 1e6) return;  // not finite, or big enough to overflow
  const double out_max = max_abs(out);
  FUZZ_CHECK(std::isfinite(out_max), when, ": attend() output is not finite over a finite payload (|k| <= ",
             mk, ", |v| <= ", mv, ", |zero|, |scale| <= ", mz, ")");

  // The positions keys() holds: a sliding window's sinks and last window, else 0 .. size - 1.
  std::vector<Index> positions;
  kvtest::ReferenceRules rules;
  if constexpr (is_sliding<C>::value) {
    for (Index i = 0; i < std::min(position, c.num_sink_tokens()); ++i) positions.push_back(i);
    for (Index i = std::max(c.num_sink_tokens(), position - c.window()); i < position; ++i)
      positions.push_back(i);
    rules.cache_window = c.window();
    rules.num_sink_tokens = c.num_sink_tokens();
  } else {
    positions = kvtest::iota_positions(c.size());
  }
  FUZZ_CHECK(Index(positions.size()) == kvtest::seq_of<L>(keys), when, ": keys() holds ",
             kvtest::seq_of<L>(keys), " positions, expected ", positions.size());
  const auto want = kvtest::reference_attention<L>(q, keys, values, positions, position - 1, rules);
  const double levels = is_quantized<C>::value ? 255.0 : 0.0;
  const double mk_fold = std::max(mk, mz * (1 + levels)), mv_fold = std::max(mv, mz * (1 + levels));
  const double score_bound = double(c.head_dim()) * mq * mk_fold / std::sqrt(double(c.head_dim()));
  const double tol = kvtest::tolerance<T>() * std::max(1.0, score_bound) * std::max(1.0, mv_fold);
  const double err = kvtest::max_abs_diff(out, want);
  FUZZ_CHECK(err <= tol, when, ": attend() differs from the reference over keys()/values() by ",
             err, " (tolerance ", tol, ")");
}

/// One more token (where there is room), then probe again: the loaded state must go on working.
template <class C>
void continue_with(const C& loaded) {
  using T = typename C::element_type;
  using L = typename C::layout_type;
  if constexpr (!is_frozen<C>::value) {
    if constexpr (is_static<C>::value || is_quantized<C>::value) {
      if (loaded.position() >= loaded.capacity()) return;
    }
    // A cache at max_position is full for good (the next token throws length_error, as for a
    // cache that reached it by updates).
    if (loaded.position() >= kvcache::max_position) return;
    // A dynamic cache of capacity 0 owns no storage, so its record may declare any shape
    // (as its constructor accepts): then the storage of one token for every batch row and head
    // would not fit in memory (in a sanitizer build the allocation aborts instead of throwing).
    const double token_elements = static_cast<double>(loaded.batch_size()) *
                                  static_cast<double>(loaded.num_heads()) *
                                  static_cast<double>(loaded.head_dim());
    if (token_elements > double(Index(1) << 20)) return;
    C copy = loaded;
    const Tensor4<T> k = make_tensor<T, L>(1, copy.num_heads(), 1, copy.head_dim(), 1, 0);
    const Tensor4<T> v = make_tensor<T, L>(1, copy.num_heads(), 1, copy.head_dim(), 2, 0);
    std::string what;
    const Outcome got = outcome_of([&] { copy.update(k, v); }, &what);
    FUZZ_CHECK(got == Outcome::ok, "update() of one token after load() threw ", name(got), ": ", what);
    FUZZ_CHECK(copy.position() == loaded.position() + 1, "update() after load(): position ",
               copy.position());
    probe(copy, "after load() and one update()");
  } else {
    (void)loaded;
  }
}

template <class C>
void compare(const C& a, const C& b) {
  if constexpr (is_model<C>::value) {
    FUZZ_CHECK(a.num_layers() == b.num_layers(), "load(save()) has ", b.num_layers(), " layers, not ",
               a.num_layers());
    for (Index l = 0; l < a.num_layers(); ++l) {
      if constexpr (is_variant<typename C::cache_type>::value) {
        FUZZ_CHECK(a[l].index() == b[l].index(), "load(save()) changed the kind of layer ", l);
        std::visit([&](const auto& x) { compare(x, std::get<std::decay_t<decltype(x)>>(b[l])); },
                   a[l]);
      } else {
        compare(a[l], b[l]);
      }
    }
  } else {
    const std::string diff = Snapshot<C>(a).diff(Snapshot<C>(b));
    FUZZ_CHECK(diff.empty(), "load(save(loaded)) differs from loaded: ", diff);
    if constexpr (is_quantized<C>::value) {
      FUZZ_CHECK(a.quantized_size() == b.quantized_size(), "quantized_size() differs");
    }
  }
}

/// A loaded pool: a ragged attend of one row per sequence (every layer) does not throw and
/// matches the double reference when its numbers are moderate; then a one-token update of
/// every sequence (or OutOfBlocks, with the pool unchanged) and a fork.
template <class C>
void probe_paged(const C& loaded) {
  using T = typename C::element_type;
  using L = typename C::layout_type;
  C pool = loaded;
  std::vector<typename C::SequenceId> ids = pool.sequences();
  for (int round = 0; round < 2; ++round) {
    for (Index layer = 0; layer < pool.num_layers(); ++layer) {
      std::vector<Index> q_lens;
      for (auto s : ids) q_lens.push_back(std::min<Index>(1, pool.size(s, layer)));
      Index total = 0;
      for (Index n : q_lens) total += n;
      const Tensor4<T> q = make_tensor<T, L>(1, pool.num_heads(), total, pool.head_dim(), 5, 0);
      Tensor4<T> out(q.dimensions());
      kvcache::AttendWorkspace workspace;
      std::string what;
      const Outcome got = outcome_of([&] { kvcache::attend(q, pool, layer, ids, q_lens, out, workspace); }, &what);
      FUZZ_CHECK(got == Outcome::ok, "the ragged attend of a loaded pool threw ", name(got), ": ", what);
      Index offset = 0;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        const Tensor4<T> k = pool.keys(layer, ids[i]), v = pool.values(layer, ids[i]);
        const Index size = pool.size(ids[i], layer);
        if (max_abs(k) <= 1e3 && max_abs(v) <= 1e3 && q_lens[i] > 0) {
          const auto want = kvtest::reference_attention<L>(
              kvtest::slice_seq<L>(q, offset, q_lens[i]), k, v, kvtest::iota_positions(size),
              size - q_lens[i], kvtest::ReferenceRules{});
          FUZZ_CHECK(kvtest::max_abs_diff(kvtest::slice_seq<L>(out, offset, q_lens[i]), want) <=
                         1e-3 * std::max(1.0, max_abs(v)),
                     "the ragged attend of a loaded pool differs from the reference");
        }
        offset += q_lens[i];
      }
    }
    if (round == 1 || ids.empty()) break;
    for (auto s : ids)
      for (Index layer = 0; layer < pool.num_layers(); ++layer) {
        const Tensor4<T> k = make_tensor<T, L>(1, pool.num_heads(), 1, pool.head_dim(), 9, 0);
        const std::string before = saved(pool);
        try {
          pool.update(layer, s, k, k);
        } catch (const kvcache::OutOfBlocks&) {
          FUZZ_CHECK(saved(pool) == before, "OutOfBlocks changed a loaded pool");
        }
      }
    ids.push_back(pool.fork(ids.front()));
  }
}

/// Whether `bytes` hold a record header of an older format version than save() writes (the
/// magic, then a version below persistence_format_version): the record itself, or a model's
/// layer.
bool holds_older_header(const std::string& bytes) {
  const std::string magic("\x89KVC\r\n\x1a\n", 8);
  for (std::size_t at = bytes.find(magic); at != std::string::npos; at = bytes.find(magic, at + 1)) {
    if (at + 12 > bytes.size()) break;
    std::uint32_t version = 0;
    for (int i = 3; i >= 0; --i)
      version = version << 8 | static_cast<std::uint8_t>(bytes[at + 8 + static_cast<std::size_t>(i)]);
    if (version < kvcache::persistence_format_version) return true;
  }
  return false;
}

template <class C>
void check_loaded(const C& loaded, const std::string& input, std::streamoff consumed) {
  const std::string first = saved(loaded);
  // A record of an older version loads as today's cache and saves as today's version
  // (docs/persistence_format.md, "Compatibility"): its bytes need not come back, the rest of
  // the checks hold for it too.
  if (!holds_older_header(input.substr(0, static_cast<std::size_t>(consumed)))) {
    FUZZ_CHECK(consumed == static_cast<std::streamoff>(first.size()), "load() consumed ", consumed,
               " bytes, but save() of what it loaded writes ", first.size());
    FUZZ_CHECK(input.compare(0, first.size(), first) == 0,
               "load() accepted a record that save() does not write back identically (",
               first.size(), " bytes)");
  }
  std::istringstream again_in(first);
  std::optional<C> again;
  std::string what;
  const Outcome got = outcome_of([&] { again.emplace(load<C>(again_in)); }, &what);
  FUZZ_CHECK(got == Outcome::ok, "load(save(loaded)) threw ", name(got), ": ", what);
  if constexpr (!is_paged<C>::value) compare(loaded, *again);
  FUZZ_CHECK(saved(*again) == first, "save(load(save(loaded))) differs from save(loaded)");
  if constexpr (is_paged<C>::value) {
    probe_paged(loaded);
  } else if constexpr (is_model<C>::value) {
    for (Index l = 0; l < loaded.num_layers(); ++l)
      visit_layer(loaded[l], [](const auto& layer) {
        probe(layer, "a loaded layer");
        continue_with(layer);
      });
  } else {
    probe(loaded, "the loaded cache");
    continue_with(loaded);
  }
}

// --- the target ---------------------------------------------------------------------------------------

template <class C>
void run(int mode, ByteReader& in, const std::uint8_t* rest, std::size_t rest_size) {
  std::string input;
  std::string base;  // mode 1: the valid record before the edits
  if (mode == 0) {
    input.assign(reinterpret_cast<const char*>(rest), rest_size);
  } else {
    const C cache = build<C>(in);
    base = saved(cache);
    input = base;
    const std::vector<Record> records = records_of(cache, base);
    apply_edits(input, in, records);
    if (mode == 2) fix_checksums(input, records);
  }

  // KVFUZZ_DUMP_RECORD=path: write the stream load() is given (to reproduce a finding without
  // the fuzzer: a record file for C::load).
  if (const char* dump = std::getenv("KVFUZZ_DUMP_RECORD"))
    write_file(dump, std::vector<std::uint8_t>(input.begin(), input.end()));

  std::istringstream stream(input);
  std::optional<C> loaded;
  std::string what;
  const Outcome got = outcome_of([&] { loaded.emplace(load<C>(stream)); }, &what);
  if (counting()) {
    // "... ::load: <check>: ..." -> the check that rejected it.
    std::string check = what.substr(std::min(what.size(), what.find("::load: ") + 8));
    check = check.substr(0, std::min({check.find(':'), check.find(" ("), std::size_t{48}}));
    count(text(kvcache::detail::describe(kvcache::detail::record_type_of<C>()), " mode ", mode, ": ",
               name(got), got == Outcome::ok ? "" : " - ", check));
  }
  FUZZ_CHECK(got == Outcome::ok || got == Outcome::format_error,
             "load() threw ", name(got), " (only kvcache::FormatError is allowed): ", what);
  if (mode == 1) {
    // The edits changed the record (not just what follows it) exactly when it fails.
    const bool unchanged = input.compare(0, base.size(), base) == 0;
    FUZZ_CHECK((got == Outcome::ok) == unchanged,
               unchanged ? "load() rejected an intact record: " : "load() accepted a corrupted record",
               what);
  }
  if (got != Outcome::ok) return;
  check_loaded(*loaded, input, static_cast<std::streamoff>(stream.tellg()));
}

/// A model of mixed layers (record kind 7: a layer-type table and an outer CRC-32).
using MixedModel = kvcache::ModelKVCache<
    std::variant<kvcache::StaticKVCache<float>, kvcache::SlidingWindowKVCache<float>,
                 kvcache::Int4KVCache<float, BSHD>>>;

using Run = void (*)(int, ByteReader&, const std::uint8_t*, std::size_t);
constexpr Run kTypes[] = {
    &run<kvcache::StaticKVCache<float>>,
    &run<kvcache::StaticKVCache<Eigen::half, BSHD>>,
    &run<kvcache::DynamicKVCache<float>>,
    &run<kvcache::SlidingWindowKVCache<float>>,
    &run<kvcache::Int8KVCache<float>>,
    &run<kvcache::Int4KVCache<float>>,
    &run<kvcache::FrozenKVCache<float>>,
    &run<kvcache::ModelKVCache<kvcache::SlidingWindowKVCache<float, BSHD>>>,
    &run<kvcache::Int8KVCache<Eigen::bfloat16, BSHD>>,
    &run<MixedModel>,
    &run<kvcache::PagedKVCache<float>>,
    &run<kvcache::PagedKVCache<Eigen::half, BSHD>>,
};
constexpr int kNumTypes = static_cast<int>(sizeof kTypes / sizeof kTypes[0]);

template <class C>
std::vector<std::uint8_t> valid_record(const std::vector<std::uint8_t>& params) {
  ByteReader in(params.data(), params.size());
  const std::string bytes = saved(build<C>(in));
  return {bytes.begin(), bytes.end()};
}

using MakeRecord = std::vector<std::uint8_t> (*)(const std::vector<std::uint8_t>&);
constexpr MakeRecord kValidRecords[] = {
    &valid_record<kvcache::StaticKVCache<float>>,
    &valid_record<kvcache::StaticKVCache<Eigen::half, BSHD>>,
    &valid_record<kvcache::DynamicKVCache<float>>,
    &valid_record<kvcache::SlidingWindowKVCache<float>>,
    &valid_record<kvcache::Int8KVCache<float>>,
    &valid_record<kvcache::Int4KVCache<float>>,
    &valid_record<kvcache::FrozenKVCache<float>>,
    &valid_record<kvcache::ModelKVCache<kvcache::SlidingWindowKVCache<float, BSHD>>>,
    &valid_record<kvcache::Int8KVCache<Eigen::bfloat16, BSHD>>,
    &valid_record<MixedModel>,
    &valid_record<kvcache::PagedKVCache<float>>,
    &valid_record<kvcache::PagedKVCache<Eigen::half, BSHD>>,
};
static_assert(sizeof kValidRecords == sizeof kTypes);

void write_seeds(const std::string& dir) {
  // Per type: a valid record to load as is (mode 0), and build parameters plus a few edits for
  // modes 1 and 2; parameters and edits are bytes of a fixed generator, chosen so that every
  // record holds a few positions (small: the corpus stays a few KB).
  Numbers numbers(7);
  int written = 0;
  for (int type = 0; type < kNumTypes; ++type) {
    std::vector<std::uint8_t> params;
    for (int attempt = 0; attempt < 64; ++attempt) {
      params.clear();
      for (int i = 0; i < 40; ++i) params.push_back(static_cast<std::uint8_t>(numbers.next()));
      const std::vector<std::uint8_t> record = kValidRecords[type](params);
      if (record.size() > 120 && record.size() < 400) break;  // a few positions held
    }
    std::vector<std::uint8_t> raw = {static_cast<std::uint8_t>(type)};
    const std::vector<std::uint8_t> record = kValidRecords[type](params);
    raw.insert(raw.end(), record.begin(), record.end());
    write_file(text(dir, "/type", type, "_raw"), raw);
    for (int mode = 1; mode <= 2; ++mode) {
      std::vector<std::uint8_t> edited = {static_cast<std::uint8_t>(type + kNumTypes * mode)};
      edited.insert(edited.end(), params.begin(), params.end());
      for (int i = 0; i < 12; ++i) edited.push_back(static_cast<std::uint8_t>(numbers.next()));
      write_file(text(dir, "/type", type, "_mode", mode), edited);
    }
    written += 3;
  }
  std::printf("fuzz_load: wrote %d seeds to %s\n", written, dir.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  const std::string dir = write_seeds_dir(*argc, *argv);
  if (!dir.empty()) {
    write_seeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const int type = data[0] % kNumTypes;
  const int mode = (data[0] / kNumTypes) % 3;
  ByteReader in(data + 1, size - 1);
  kTypes[type](mode, in, data + 1, size - 1);
  return 0;
}
