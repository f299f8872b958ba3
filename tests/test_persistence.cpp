// Persistence: save()/load() of every cache kind but PrefixKVCache (docs/persistence_format.md).
// Round trips are checked bit for bit (keys(), values(), size, position, capacity, memory) and by
// continuing the original and the loaded cache with the same updates, comparing keys(), values()
// and attend() outputs bit for bit after each; every kind is saved empty, partly filled and full,
// the sliding window after ring wraps with sinks and after a long chunk grew its ring, the
// quantized caches with full blocks and a partial tail and after a crop into the blocks. load()
// must throw kvcache::FormatError, never crash or succeed, for every truncation and every
// flipped bit of a small record of each kind, for another kind/element type/layout (naming
// both), for crafted headers with valid checksums that are inconsistent or declare absurd sizes
// (without allocating them), and for failing streams; save() throws std::ios_base::failure on a
// failing stream. Also: CRC-32C against its standard check values, and the byte layout of a tiny
// record against the format document.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <ios>
#include <iterator>
#include <limits>
#include <new>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <vector>

#include "support/catch.hpp"
#include "support/counting_allocator.hpp"
#include "support/reference.hpp"

using namespace kvtest;
using kvcache::AttendOptions;
using kvcache::DynamicKVCache;
using kvcache::FormatError;
using kvcache::FrozenKVCache;
using kvcache::Int4KVCache;
using kvcache::Int8KVCache;
using kvcache::LoadLimits;
using kvcache::ModelKVCache;
using kvcache::QuantConfig;
using kvcache::QuantizedKVCache;
using kvcache::SlidingWindowKVCache;
using kvcache::StaticKVCache;
namespace kd = kvcache::detail;

// --- the largest single allocation (operator new) while tracking is on ---------------------------
// The absurd-size tests check that load() never asks for more than about what the stream held.
// (Eigen's tensors allocate with malloc and are not seen here, but load() makes none before the
// whole record has been read and checked; the staging of the payload uses std::vector.)
using kvtest::largest_allocation;
using kvtest::tracking_allocations;

namespace {

static_assert(std::is_base_of_v<std::runtime_error, FormatError>);

// --- helpers -----------------------------------------------------------------------------------

template <class Cache>
std::string saved(const Cache& cache) {
  std::ostringstream out(std::ios::binary);
  cache.save(out);
  return out.str();
}

/// Loads a Cache from `bytes`, requiring that load() consumed exactly the record.
template <class Cache>
Cache loaded(const std::string& bytes) {
  std::istringstream in(bytes, std::ios::binary);
  Cache cache = Cache::load(in);
  REQUIRE(static_cast<std::size_t>(in.tellg()) == bytes.size());
  return cache;
}

/// The message of the FormatError that loading `bytes` as a Cache throws; fails the test when
/// load() succeeds or throws anything else.
template <class Cache>
std::string load_error(const std::string& bytes, const LoadLimits& limits = {}) {
  std::istringstream in(bytes, std::ios::binary);
  try {
    (void)Cache::load(in, limits);
  } catch (const FormatError& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("load threw something other than FormatError: " << e.what());
  }
  FAIL("load accepted the record");
  return "";
}

template <class T>
bool same_bits(const Tensor4<T>& a, const Tensor4<T>& b) {
  return a.dimensions() == b.dimensions() &&
         (a.size() == 0 ||  // data() may be null
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(T)) == 0);
}

/// Everything observable of two caches is the same, bit for bit.
template <class Cache>
void require_same_state(const Cache& a, const Cache& b) {
  REQUIRE(a.size() == b.size());
  REQUIRE(a.position() == b.position());
  REQUIRE(a.capacity() == b.capacity());
  REQUIRE(a.batch_size() == b.batch_size());
  REQUIRE(a.num_heads() == b.num_heads());
  REQUIRE(a.head_dim() == b.head_dim());
  REQUIRE(a.memory_bytes() == b.memory_bytes());
  REQUIRE(same_bits(a.keys(), b.keys()));
  REQUIRE(same_bits(a.values(), b.values()));
}

/// attend() of the same queries (q_len rows, twice the KV heads) over both: the same bits.
template <class Cache>
void require_same_attention(const Cache& a, const Cache& b, Index q_len, unsigned seed) {
  using T = typename Cache::element_type;
  using L = typename Cache::layout_type;
  if (q_len == 0 || a.position() == 0) return;
  const Tensor4<T> q = random_tensor<T, L>(a.batch_size(), 2 * a.num_heads(), q_len,
                                           a.head_dim(), seed);
  const Tensor4<T> out_a = kvcache::attend(q, a);
  const Tensor4<T> out_b = kvcache::attend(q, b);
  REQUIRE(same_bits(out_a, out_b));
}

/// Appends `length` random positions (to `rows` batch rows) to a cache.
template <class Cache>
void append(Cache& cache, Index rows, Index length, unsigned seed) {
  using T = typename Cache::element_type;
  using L = typename Cache::layout_type;
  const Tensor4<T> k = random_tensor<T, L>(rows, cache.num_heads(), length, cache.head_dim(), seed);
  const Tensor4<T> v =
      random_tensor<T, L>(rows, cache.num_heads(), length, cache.head_dim(), seed + 7919);
  cache.update(k, v);
}

/// Appends the same positions to both caches and compares them, attention included.
template <class Cache>
void append_to_both(Cache& a, Cache& b, Index rows, Index length, unsigned seed) {
  append(a, rows, length, seed);
  append(b, rows, length, seed);
  require_same_state(a, b);
  require_same_attention(a, b, length, seed + 1);
}

/// Saves, loads, compares, and requires that saving the loaded cache gives the same bytes.
template <class Cache>
Cache round_trip(const Cache& original) {
  const std::string bytes = saved(original);
  Cache copy = loaded<Cache>(bytes);
  require_same_state(original, copy);
  REQUIRE(saved(copy) == bytes);
  return copy;
}

/// Every proper prefix and every single flipped bit (and every byte inverted) of a record must
/// make load() throw FormatError - nothing else, and never succeed.
template <class Cache>
void require_every_damage_rejected(const std::string& bytes) {
  std::vector<std::string> failures;
  const auto check = [&](const std::string& damaged, const std::string& what) {
    std::istringstream in(damaged, std::ios::binary);
    try {
      (void)Cache::load(in);
      failures.push_back(what + ": loaded");
    } catch (const FormatError& e) {
      if (!contains(e.what(), "kvcache: ")) failures.push_back(what + ": " + e.what());
    } catch (const std::exception& e) {
      failures.push_back(what + ": not a FormatError: " + e.what());
    }
  };
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    check(bytes.substr(0, n), "truncated to " + std::to_string(n));
  }
  for (std::size_t i = 0; i < bytes.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string damaged = bytes;
      damaged[i] = static_cast<char>(damaged[i] ^ (1 << bit));
      check(damaged, "bit " + std::to_string(bit) + " of byte " + std::to_string(i));
    }
    std::string inverted = bytes;
    inverted[i] = static_cast<char>(~inverted[i]);
    check(inverted, "byte " + std::to_string(i) + " inverted");
  }
  CAPTURE(bytes.size());
  INFO((failures.empty() ? std::string() : failures.front()));
  REQUIRE(failures.empty());
}

QuantConfig quant_config(Index group_size, Index residual_length) {
  QuantConfig c;
  c.group_size = group_size;
  c.residual_length = residual_length;
  return c;
}

// --- records written by hand, from docs/persistence_format.md ----------------------------------

void put_u32(std::string& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}
void put_u64(std::string& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out += static_cast<char>((v >> (8 * i)) & 0xFF);
}
std::uint32_t crc_of(const std::string& bytes) {
  return kd::crc32c(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
}

/// The type bytes 16-20 of a record.
struct TypeBytes {
  std::uint8_t kind, element, layout, bits, layer_kind;
};
constexpr std::uint8_t kStatic = 1, kDynamic = 2, kSliding = 3, kQuantized = 4, kFrozen = 5,
                       kModel = 6;
constexpr std::uint8_t kFloat32 = 1, kFloat64 = 2, kFloat16 = 3, kBfloat16 = 4;
constexpr std::uint8_t kBHSD = 1, kBSHD = 2;

/// A header: magic, version, header_size, type, the uint64 fields, the header CRC.
std::string header_bytes(const TypeBytes& type, const std::vector<std::uint64_t>& fields,
                         std::uint32_t version = kvcache::persistence_format_version) {
  std::string out = "\x89KVC\r\n\x1a\n";
  put_u32(out, version);
  put_u32(out, static_cast<std::uint32_t>(21 + 8 * fields.size() + 4));
  for (std::uint8_t b : {type.kind, type.element, type.layout, type.bits, type.layer_kind})
    out += static_cast<char>(b);
  for (std::uint64_t f : fields) put_u64(out, f);
  put_u32(out, crc_of(out));
  return out;
}

/// A whole record: header, payload, CRC over both.
std::string record_bytes(const TypeBytes& type, const std::vector<std::uint64_t>& fields,
                         const std::string& payload) {
  std::string out = header_bytes(type, fields) + payload;
  put_u32(out, crc_of(out));
  return out;
}

/// Recomputes both checksums of a single-cache record after its bytes were edited (so that
/// the edit itself is what load() sees).
std::string resealed(std::string bytes) {
  const std::uint32_t header_size = static_cast<std::uint8_t>(bytes[12]) |
                                    static_cast<std::uint8_t>(bytes[13]) << 8;
  std::string header = bytes.substr(0, header_size - 4);
  put_u32(header, crc_of(header));
  std::string body = header + bytes.substr(header_size, bytes.size() - header_size - 4);
  put_u32(body, crc_of(body));
  return body;
}

/// Overwrites the uint64 header field number `index` (0 = batch_size) of a record.
std::string with_field(std::string bytes, std::size_t index, std::uint64_t value) {
  std::string field;
  put_u64(field, value);
  bytes.replace(21 + 8 * index, 8, field);
  return resealed(bytes);
}

std::string float_bytes(const std::vector<float>& values) {
  std::string out;
  for (float f : values) {
    std::uint32_t bits;
    std::memcpy(&bits, &f, 4);
    put_u32(out, bits);
  }
  return out;
}

/// A stream buffer that accepts `room` bytes and then fails (a full disk).
class FullDevice : public std::streambuf {
 public:
  explicit FullDevice(std::size_t room) : room_(room) {}

 protected:
  int_type overflow(int_type ch) override {
    if (traits_type::eq_int_type(ch, traits_type::eof())) return traits_type::not_eof(ch);
    if (room_ == 0) return traits_type::eof();
    --room_;
    return ch;
  }
  std::streamsize xsputn(const char*, std::streamsize n) override {
    const std::streamsize accepted = std::min<std::streamsize>(n, static_cast<std::streamsize>(room_));
    room_ -= static_cast<std::size_t>(accepted);
    return accepted;
  }

 private:
  std::size_t room_;
};

/// A stream buffer that serves `bytes` up to `fail_at` and then throws (a failing device).
class FailingSource : public std::streambuf {
 public:
  FailingSource(std::string bytes, std::size_t fail_at)
      : bytes_(std::move(bytes)), fail_at_(fail_at) {}

 protected:
  int_type underflow() override {
    if (at_ >= fail_at_) throw std::runtime_error("device error");
    if (at_ >= bytes_.size()) return traits_type::eof();
    return traits_type::to_int_type(bytes_[at_]);
  }
  int_type uflow() override {
    const int_type ch = underflow();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) ++at_;
    return ch;
  }

 private:
  std::string bytes_;
  std::size_t fail_at_;
  std::size_t at_ = 0;
};

template <class T, int B, class L>
struct QCase {
  using element = T;
  using layout = L;
  static constexpr int bits = B;
};

}  // namespace

// --- CRC-32C ---------------------------------------------------------------------------------------

TEST_CASE("crc32c: standard check values and incremental updates", "[persistence][crc32c]") {
  const auto crc = [](const std::string& s) { return crc_of(s); };
  REQUIRE(crc("123456789") == 0xE3069283u);  // the CRC catalogue's check value
  REQUIRE(crc("") == 0u);
  // CRC-32 (IEEE 802.3, zlib), the outer checksum of mixed models: its catalogue check value,
  // split anywhere.
  const std::string nine = "123456789";
  const auto* bytes = reinterpret_cast<const std::uint8_t*>(nine.data());
  REQUIRE(kvcache::detail::crc32_ieee_update(0, bytes, 9) == 0xCBF43926u);
  REQUIRE(kvcache::detail::crc32_ieee_update(kvcache::detail::crc32_ieee_update(0, bytes, 4),
                                             bytes + 4, 5) == 0xCBF43926u);
  // RFC 3720 (iSCSI), appendix B.4
  REQUIRE(crc(std::string(32, '\0')) == 0x8A9136AAu);
  REQUIRE(crc(std::string(32, '\xFF')) == 0x62A8AB43u);
  std::string ascending, descending;
  for (int i = 0; i < 32; ++i) {
    ascending += static_cast<char>(i);
    descending += static_cast<char>(31 - i);
  }
  REQUIRE(crc(ascending) == 0x46DD794Eu);
  REQUIRE(crc(descending) == 0x113FDB5Cu);

  // Against a bit-at-a-time implementation, every length up to 200 (the 8-byte loop and the
  // byte tail), and split at every point (crc32c_update continues a checksum).
  std::string data;
  std::uint32_t state = 12345;
  for (int i = 0; i < 200; ++i) {
    state = state * 1103515245u + 12345u;
    data += static_cast<char>(state >> 24);
  }
  for (std::size_t n = 0; n <= data.size(); ++n) {
    std::uint32_t slow = 0xFFFFFFFFu;
    for (std::size_t i = 0; i < n; ++i) {
      slow ^= static_cast<std::uint8_t>(data[i]);
      for (int bit = 0; bit < 8; ++bit) slow = (slow & 1u) ? (slow >> 1) ^ 0x82F63B78u : slow >> 1;
    }
    slow = ~slow;
    const auto* bytes = reinterpret_cast<const std::uint8_t*>(data.data());
    REQUIRE(kd::crc32c(bytes, n) == slow);
    const std::size_t split = n / 3;
    REQUIRE(kd::crc32c_update(kd::crc32c(bytes, split), bytes + split, n - split) == slow);
  }
}

// --- the byte layout -------------------------------------------------------------------------------

TEST_CASE("persistence: a tiny StaticKVCache record has the documented bytes",
          "[persistence][format]") {
  StaticKVCache<float> cache(1, 2, 1, 1);
  Tensor4<float> k(1, 1, 1, 1), v(1, 1, 1, 1);
  k.setConstant(1.0f);
  v.setConstant(-2.0f);
  cache.update(k, v);
  const std::string bytes = saved(cache);
  // batch 1, heads 1, head_dim 1, capacity 2, position 1; keys {1.0f}, values {-2.0f}
  const std::string expected = record_bytes({kStatic, kFloat32, kBHSD, 0, 0}, {1, 1, 1, 2, 1},
                                            float_bytes({1.0f, -2.0f}));
  REQUIRE(bytes == expected);
  REQUIRE(bytes.size() == 65 + 8 + 4);
  // Spelled out: the magic, version 2, header_size 65, the type bytes, the first field.
  const std::string start("\x89KVC\r\n\x1a\n\x02\0\0\0\x41\0\0\0\x01\x01\x01\0\0\x01\0\0\0\0\0\0\0",
                          29);
  REQUIRE(bytes.substr(0, 29) == start);
  REQUIRE(bytes.substr(65, 8) == std::string("\0\0\x80\x3f\0\0\0\xc0", 8));  // 1.0f, -2.0f
  REQUIRE(kvcache::persistence_format_version == 2u);
}

// --- round trips, kind by kind ---------------------------------------------------------------------

TEMPLATE_TEST_CASE("StaticKVCache: save/load is bit-exact and the copy continues identically",
                   "[persistence][static]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::half, BSHD>), (Case<Eigen::bfloat16, BHSD>),
                   (Case<double, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  struct Dims {
    Index batch, heads, head_dim, capacity;
  };
  for (const Dims d : {Dims{1, 1, 1, 1}, Dims{2, 3, 1, 7}, Dims{1, 2, 5, 9}, Dims{3, 1, 7, 12}}) {
    for (const Index fill : {Index(0), Index(1), d.capacity / 2, d.capacity}) {
      CAPTURE(d.batch, d.heads, d.head_dim, d.capacity, fill);
      StaticKVCache<T, L> original(d.batch, d.capacity, d.heads, d.head_dim);
      unsigned seed = 1;
      for (Index at = 0; at < fill;) {  // chunks of 1, 2, 3; every other one for fewer rows
        const Index length = std::min<Index>(1 + at % 3, fill - at);
        append(original, at % 2 == 0 ? d.batch : 1, length, seed += 10);
        at += length;
      }
      StaticKVCache<T, L> copy = round_trip(original);
      require_same_attention(original, copy, std::min<Index>(fill, 2), 99);
      while (original.position() < d.capacity) {
        const Index length = std::min<Index>(2, d.capacity - original.position());
        append_to_both(original, copy, d.batch, length, seed += 10);
      }
      Tensor4<T> one = random_tensor<T, L>(1, d.heads, 1, d.head_dim, 5);
      REQUIRE_THROWS_AS(copy.update(one, one), std::length_error);
      copy.crop(d.capacity / 2);
      original.crop(d.capacity / 2);
      require_same_state(original, round_trip(copy));
    }
  }
}

TEMPLATE_TEST_CASE("DynamicKVCache: save/load keeps contents and capacity; growth continues "
                   "identically",
                   "[persistence][dynamic]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::bfloat16, BSHD>), (Case<double, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  SECTION("fresh, capacity 0") {
    DynamicKVCache<T, L> original(2, 3, 1);
    DynamicKVCache<T, L> copy = round_trip(original);
    REQUIRE(copy.capacity() == 0);
    for (unsigned step = 0; step < 40; ++step) append_to_both(original, copy, 2, 1, step * 3);
  }
  SECTION("after growth and a crop") {
    DynamicKVCache<T, L> original(1, 2, 5);
    append(original, 1, 17, 3);  // capacity 17
    append(original, 1, 2, 4);   // capacity 34
    original.crop(15);
    DynamicKVCache<T, L> copy = round_trip(original);
    REQUIRE(copy.capacity() == 34);
    append_to_both(original, copy, 1, 20, 8);  // grows again, to 68
    REQUIRE(copy.capacity() == original.capacity());
  }
  SECTION("an initial capacity and reserve()") {
    DynamicKVCache<T, L> original(3, 1, 7, 5);
    append(original, 2, 3, 11);
    original.reserve(100);
    DynamicKVCache<T, L> copy = round_trip(original);
    REQUIRE(copy.capacity() == 100);
    append_to_both(original, copy, 3, 97, 12);
    append_to_both(original, copy, 1, 1, 13);
    REQUIRE(copy.capacity() == original.capacity());
  }
}

TEMPLATE_TEST_CASE("SlidingWindowKVCache: save/load keeps the ring and its offset; the copy "
                   "continues identically",
                   "[persistence][sliding]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::half, BHSD>), (Case<double, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  struct Config {
    Index window, sinks, head_dim;
  };
  for (const Config c : {Config{1, 0, 1}, Config{3, 1, 2}, Config{4, 3, 5}, Config{5, 2, 1}}) {
    // Save points: empty, inside the sinks, at the sinks, within the first window, after
    // several wraps, right after a chunk of 3 x window (the ring grew), and after decoding on.
    const std::vector<Index> chunks = {1, 1, 1, 2, 1, 3 * c.window, 1, 2, 1, 1, 1, 1, 1};
    for (std::size_t saved_after = 0; saved_after <= chunks.size(); ++saved_after) {
      CAPTURE(c.window, c.sinks, c.head_dim, saved_after);
      SlidingWindowKVCache<T, L> original(2, c.window, 2, c.head_dim, c.sinks);
      for (std::size_t i = 0; i < saved_after; ++i)
        append(original, i % 3 == 2 ? 1 : 2, chunks[i], static_cast<unsigned>(100 + i));
      SlidingWindowKVCache<T, L> copy = round_trip(original);
      REQUIRE(copy.window() == c.window);
      REQUIRE(copy.num_sink_tokens() == c.sinks);
      if (saved_after > 0) require_same_attention(original, copy, chunks[saved_after - 1], 7);
      // Continue past several more wraps, with a chunk longer than the grown ring too.
      unsigned seed = 500;
      for (const Index length : {Index(1), Index(2), c.window + 1, Index(1), 4 * c.window, Index(1),
                                 Index(1), Index(3)})
        append_to_both(original, copy, 2, length, seed += 10);
    }
  }
}

TEMPLATE_TEST_CASE("QuantizedKVCache: save/load keeps blocks, tail and config; the copy "
                   "continues identically",
                   "[persistence][quantized]", (QCase<float, 8, BHSD>), (QCase<float, 4, BSHD>),
                   (QCase<Eigen::half, 4, BHSD>), (QCase<Eigen::bfloat16, 8, BSHD>),
                   (QCase<double, 8, BHSD>), (QCase<double, 4, BSHD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  constexpr int Bits = TestType::bits;
  struct Config {
    Index head_dim, group_size, residual_length, max_seq_len;
  };
  // int8 allows odd groups (G = 3, D = 9 pads each block's codes to an even byte count) and
  // head_dim 1; int4 needs even groups.
  const std::vector<Config> configs =
      Bits == 8 ? std::vector<Config>{{9, 3, 5, 20}, {1, 1, 0, 6}, {8, 4, 4, 19}}
                : std::vector<Config>{{6, 2, 1, 13}, {4, 4, 0, 16}, {8, 2, 3, 21}};
  for (const Config c : configs) {
    const QuantConfig config = quant_config(c.group_size, c.residual_length);
    // Fills: empty, a partial tail only, blocks and a partial tail, full (max_seq_len).
    for (const Index fill : {Index(0), Index(2), c.max_seq_len - 3, c.max_seq_len}) {
      for (const bool crop_into_blocks : {false, true}) {
        CAPTURE(c.head_dim, c.group_size, c.residual_length, c.max_seq_len, fill,
                crop_into_blocks);
        QuantizedKVCache<T, Bits, L> original(2, c.max_seq_len, 3, c.head_dim, config);
        unsigned seed = 1;
        for (Index at = 0; at < fill;) {
          const Index length = std::min<Index>(1 + at % 4, fill - at);
          append(original, at % 2 == 0 ? 2 : 1, length, seed += 10);
          at += length;
        }
        if (crop_into_blocks) {
          if (original.quantized_size() == 0) continue;
          original.crop(original.quantized_size() - 1);  // the cut block returns to the tail
        }
        REQUIRE((fill < c.max_seq_len - 3 || crop_into_blocks || original.quantized_size() > 0));
        QuantizedKVCache<T, Bits, L> copy = round_trip(original);
        REQUIRE(copy.quantized_size() == original.quantized_size());
        REQUIRE(copy.config().group_size == c.group_size);
        REQUIRE(copy.config().residual_length == c.residual_length);
        require_same_attention(original, copy, std::min<Index>(original.position(), 2), 3);
        while (original.position() < c.max_seq_len) {
          const Index length = std::min<Index>(1 + original.position() % 3,
                                               c.max_seq_len - original.position());
          append_to_both(original, copy, 2, length, seed += 10);
        }
        original.crop(c.max_seq_len / 2);
        copy.crop(c.max_seq_len / 2);
        require_same_state(original, copy);
        append_to_both(original, copy, 1, 3, seed + 1);
      }
    }
  }
}

namespace {

/// The files of tests/data/format_v1: QuantizedKVCache records written by the library in format
/// version 1 (at e789731, the last commit writing it, by write_format_v1.cpp.txt there), of
/// batch 1, 2 heads, residual 3, positions of fixture_data (key phase 0, value phase 1).
std::string format_v1_file(const std::string& name) {
  std::string dir = __FILE__;
  dir = dir.substr(0, dir.find_last_of("/\\") + 1);
  std::ifstream in(dir + "data/format_v1/" + name, std::ios::binary);
  REQUIRE(in.good());
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// t[i] = 2 sin(0.37 i + phase) over the row-major elements: what the version 1 files hold.
Tensor4<float> fixture_data(Index heads, Index seq, Index dim, double phase) {
  Tensor4<float> t(1, heads, seq, dim);
  for (Index i = 0; i < t.size(); ++i)
    t.data()[i] = static_cast<float>(2.0 * std::sin(0.37 * double(i) + phase));
  return t;
}

}  // namespace

TEMPLATE_TEST_CASE("QuantizedKVCache: a format version 1 record loads as the cache it was",
                   "[persistence][quantized][compatibility]", (std::integral_constant<int, 8>),
                   (std::integral_constant<int, 4>)) {
  constexpr int Bits = TestType::value;
  struct File {
    const char* name;
    Index head_dim, group_size, positions, capacity;
  };
  // int8 with head_dim 10 (channel quads padded to 12) and an odd group; int4 with groups of 2
  // and of 32 (the vector paths of the integer scores).
  const std::vector<File> files = Bits == 8 ? std::vector<File>{{"int8_d10_g5.kvc", 10, 5, 23, 40}}
                                            : std::vector<File>{{"int4_d10_g2.kvc", 10, 2, 23, 40},
                                                                {"int4_d64_g32.kvc", 64, 32, 70, 80}};
  for (const File& file : files) {
    CAPTURE(file.name);
    const std::string bytes = format_v1_file(file.name);
    REQUIRE(bytes.substr(8, 4) == std::string("\x01\0\0\0", 4));  // version 1
    QuantizedKVCache<float, Bits, BHSD> want(1, file.capacity, 2, file.head_dim,
                                             quant_config(file.group_size, 3));
    want.update(fixture_data(2, file.positions, file.head_dim, 0.0),
                fixture_data(2, file.positions, file.head_dim, 1.0));
    auto got = loaded<QuantizedKVCache<float, Bits, BHSD>>(bytes);
    REQUIRE(got.quantized_size() == want.quantized_size());
    REQUIRE(got.quantized_size() > 0);
    require_same_state(want, got);
    require_same_attention(want, got, 2, 5);
    // Saved again, it is today's record of the same cache.
    REQUIRE(saved(got) == saved(want));
    // A version 1 record whose blocks are cut short is still refused.
    REQUIRE(contains(load_error<QuantizedKVCache<float, Bits, BHSD>>(bytes.substr(0, bytes.size() / 2)),
                     "truncated"));
  }
}

TEMPLATE_TEST_CASE("FrozenKVCache: save/load is bit-exact and attends identically",
                   "[persistence][frozen]", (Case<float, BHSD>), (Case<float, BSHD>),
                   (Case<Eigen::bfloat16, BSHD>), (Case<double, BHSD>)) {
  using T = typename TestType::element;
  using L = typename TestType::layout;
  SECTION("freeze() of a static cache, empty and filled") {
    for (const Index fill : {Index(0), Index(1), Index(6)}) {
      StaticKVCache<T, L> cache(2, 8, 3, 5);
      if (fill > 0) append(cache, 2, fill, 17);
      const auto frozen = cache.freeze();
      const FrozenKVCache<T, L> copy = round_trip(*frozen);
      require_same_attention(*frozen, copy, std::min<Index>(fill, 3), 4);
    }
  }
  SECTION("from tensors, head_dim 1") {
    const Tensor4<T> k = random_tensor<T, L>(3, 1, 4, 1, 8);
    const Tensor4<T> v = random_tensor<T, L>(3, 1, 4, 1, 9);
    const FrozenKVCache<T, L> frozen(k, v);
    const FrozenKVCache<T, L> copy = round_trip(frozen);
    require_same_attention(frozen, copy, 4, 5);
  }
}

TEST_CASE("ModelKVCache: save/load of every layer", "[persistence][model]") {
  SECTION("static layers") {
    ModelKVCache<StaticKVCache<float, BSHD>> original(3, 1, 8, 2, 3);
    for (Index layer = 0; layer < 3; ++layer)
      append(original[layer], 1, 2 + layer, static_cast<unsigned>(layer));
    const std::string bytes = saved(original);
    const auto copy = loaded<ModelKVCache<StaticKVCache<float, BSHD>>>(bytes);
    REQUIRE(copy.num_layers() == 3);
    for (Index layer = 0; layer < 3; ++layer) require_same_state(original[layer], copy[layer]);
    REQUIRE(saved(copy) == bytes);
    require_every_damage_rejected<ModelKVCache<StaticKVCache<float, BSHD>>>(bytes);
  }
  SECTION("int4 layers") {
    using Layer = Int4KVCache<Eigen::half>;
    ModelKVCache<Layer> original(2, 1, 12, 2, 4, quant_config(2, 1));
    append(original[0], 1, 7, 1);
    append(original[1], 1, 3, 2);
    const auto copy = loaded<ModelKVCache<Layer>>(saved(original));
    for (Index layer = 0; layer < 2; ++layer) require_same_state(original[layer], copy[layer]);
  }
  SECTION("sliding-window and dynamic layers") {
    ModelKVCache<SlidingWindowKVCache<double>> window(2, 1, 3, 1, 2, 1);
    append(window[0], 1, 9, 3);
    append(window[1], 1, 2, 4);
    const auto window_copy = loaded<ModelKVCache<SlidingWindowKVCache<double>>>(saved(window));
    for (Index layer = 0; layer < 2; ++layer) require_same_state(window[layer], window_copy[layer]);
    ModelKVCache<DynamicKVCache<Eigen::bfloat16>> dynamic(1, 2, 1, 3);
    append(dynamic[0], 2, 18, 5);
    const auto dynamic_copy =
        loaded<ModelKVCache<DynamicKVCache<Eigen::bfloat16>>>(saved(dynamic));
    require_same_state(dynamic[0], dynamic_copy[0]);
  }
  SECTION("errors name the layer and both types") {
    ModelKVCache<StaticKVCache<float>> original(2, 1, 4, 1, 2);
    append(original[1], 1, 2, 6);
    const std::string bytes = saved(original);
    const std::string wrong = load_error<ModelKVCache<StaticKVCache<float, BSHD>>>(bytes);
    REQUIRE(contains(wrong, "expected a ModelKVCache<StaticKVCache<float, BSHD>>"));
    REQUIRE(contains(wrong, "got a ModelKVCache<StaticKVCache<float, BHSD>>"));
    REQUIRE(contains(load_error<StaticKVCache<float>>(bytes), "got a ModelKVCache"));
    std::string damaged = bytes;
    damaged[damaged.size() - 10] ^= 1;  // in layer 1's payload
    const std::string what = load_error<ModelKVCache<StaticKVCache<float>>>(damaged);
    REQUIRE(contains(what, "layer 1 of 2"));
    REQUIRE(contains(what, "checksum mismatch"));
    // The memory bound covers all layers together.
    LoadLimits limits;
    limits.max_memory_bytes = original.memory_bytes() - 1;
    REQUIRE(contains(load_error<ModelKVCache<StaticKVCache<float>>>(bytes, limits), "layer 1 of 2"));
    limits.max_memory_bytes = original.memory_bytes();
    std::istringstream in(bytes);
    REQUIRE(ModelKVCache<StaticKVCache<float>>::load(in, limits).num_layers() == 2);
  }
}

TEST_CASE("ModelKVCache of mixed layers: save/load, one checksum over the whole",
          "[persistence][model][mixed]") {
  using Layer = std::variant<StaticKVCache<float>, SlidingWindowKVCache<float>, Int8KVCache<float>>;
  using Model = ModelKVCache<Layer>;
  Model original(4, [](Index layer) -> Layer {
    if (layer % 2 == 1) return SlidingWindowKVCache<float>(1, 3, 1, 2, 1);
    if (layer == 2) return Int8KVCache<float>(1, 12, 1, 2, quant_config(2, 1));
    return StaticKVCache<float>(1, 12, 1, 2);
  });
  for (Index layer = 0; layer < 4; ++layer)
    std::visit([&](auto& cache) { append(cache, 1, 7, static_cast<unsigned>(10 + layer)); },
               original[layer]);
  const std::string bytes = saved(original);
  Model copy = loaded<Model>(bytes);
  REQUIRE(copy.num_layers() == 4);
  for (Index layer = 0; layer < 4; ++layer) {
    REQUIRE(copy[layer].index() == original[layer].index());
    std::visit(
        [&](const auto& cache) {
          using C = std::decay_t<decltype(cache)>;
          require_same_state(cache, std::get<C>(copy[layer]));
        },
        original[layer]);
  }
  REQUIRE(saved(copy) == bytes);
  // The copy continues identically.
  for (Index layer = 0; layer < 4; ++layer)
    std::visit(
        [&](auto& cache) {
          using C = std::decay_t<decltype(cache)>;
          append(cache, 1, 2, 30);
          append(std::get<C>(copy[layer]), 1, 2, 30);
          require_same_state(cache, std::get<C>(copy[layer]));
        },
        original[layer]);
  require_every_damage_rejected<Model>(saved(original));

  SECTION("a layer type the model cannot hold names the layer") {
    using Other = ModelKVCache<std::variant<StaticKVCache<float>, DynamicKVCache<float>>>;
    const std::string what = load_error<Other>(bytes);
    REQUIRE(contains(what, "layer 1 of 4: expected one of the layer kinds of this model, got a "
                           "SlidingWindowKVCache<float, BHSD>"));
    // A single-kind model's record is another kind of record.
    REQUIRE(contains(load_error<ModelKVCache<StaticKVCache<float>>>(bytes),
                     "got a ModelKVCache<std::variant<...>>"));
  }
  SECTION("a damaged layer resealed with its own checksums fails the whole-model checksum") {
    // Layer 3's record starts after the header (33 bytes), the type table (20) and layers
    // 0-2; flip a payload byte of the last layer and recompute that record's CRCs.
    std::string damaged = bytes;
    const std::size_t whole_crc = damaged.size() - 4;
    const Model as_saved = loaded<Model>(bytes);  // `original` has grown since
    const std::string last = saved(std::get<SlidingWindowKVCache<float>>(as_saved[3]));
    REQUIRE(damaged.compare(whole_crc - last.size(), last.size(), last) == 0);
    std::string edited = last;
    edited[edited.size() - 10] ^= 1;  // a payload byte
    damaged.replace(whole_crc - last.size(), last.size(), resealed(edited));
    REQUIRE(contains(load_error<Model>(damaged), "checksum mismatch over the whole model"));
    // Two layers of the same kind and size swapped: each record is intact, the order is not.
    const std::string layer0 = saved(std::get<StaticKVCache<float>>(as_saved[0]));
    const std::string layer1 = saved(std::get<SlidingWindowKVCache<float>>(as_saved[1]));
    const std::string layer3 = last;
    std::string swapped = bytes;
    const std::size_t at1 = 33 + 20 + layer0.size(), at3 = whole_crc - layer3.size();
    REQUIRE(layer1.size() == layer3.size());
    swapped.replace(at1, layer1.size(), layer3);
    swapped.replace(at3, layer3.size(), layer1);
    REQUIRE(swapped != bytes);
    REQUIRE(contains(load_error<Model>(swapped), "checksum mismatch over the whole model"));
  }
  SECTION("records follow each other; the memory bound covers every layer") {
    std::stringstream io(std::ios::in | std::ios::out | std::ios::binary);
    original.save(io);
    original.save(io);
    REQUIRE(Model::load(io).num_layers() == 4);
    REQUIRE(Model::load(io).num_layers() == 4);
    REQUIRE(io.peek() == std::char_traits<char>::eof());
    LoadLimits limits;
    limits.max_memory_bytes = original.memory_bytes() - 1;
    REQUIRE(contains(load_error<Model>(saved(original), limits), "layer 3 of 4"));
    limits.max_memory_bytes = original.memory_bytes();
    std::istringstream in(saved(original));
    REQUIRE(Model::load(in, limits).num_layers() == 4);
  }
}

TEST_CASE("persistence: records follow each other in one stream", "[persistence]") {
  StaticKVCache<float> a(1, 4, 1, 2);
  append(a, 1, 3, 1);
  SlidingWindowKVCache<Eigen::half, BSHD> b(1, 2, 2, 1, 1);
  append(b, 1, 5, 2);
  Int8KVCache<float> c(1, 9, 1, 4, quant_config(2, 1));
  append(c, 1, 6, 3);
  std::stringstream io(std::ios::in | std::ios::out | std::ios::binary);
  a.save(io);
  b.save(io);
  c.save(io);
  require_same_state(a, StaticKVCache<float>::load(io));
  require_same_state(b, SlidingWindowKVCache<Eigen::half, BSHD>::load(io));
  require_same_state(c, Int8KVCache<float>::load(io));
  REQUIRE(io.peek() == std::char_traits<char>::eof());
}

/// A saved Int8KVCache<float> of one block (group == head_dim == 16: one value group per
/// token) whose bytes can be edited: `at` is where the block starts in `bytes`.
struct EditableBlockRecord {
  static constexpr Index group = 16, head_dim = 16;
  const kvcache::detail::QuantBlockFormat<8> format{group, head_dim};
  std::string bytes;
  std::size_t at = 0;

  EditableBlockRecord() {
    Int8KVCache<float> original(1, 32, 1, head_dim, quant_config(group, 1));
    append(original, 1, group + 1, 5);
    REQUIRE(original.quantized_size() == group);
    bytes = saved(original);
    const std::vector<std::uint8_t> blocks = quantized_bytes(original);
    at = bytes.find(std::string(blocks.begin(), blocks.end()));
    REQUIRE(at != std::string::npos);
  }
  /// The bfloat16 number at `offset` within the block (little-endian) set to `bits`.
  void put(Index offset, std::uint16_t bits) {
    bytes[at + static_cast<std::size_t>(offset)] = static_cast<char>(bits & 0xFF);
    bytes[at + static_cast<std::size_t>(offset) + 1] = static_cast<char>(bits >> 8);
  }
};

TEST_CASE("persistence: a loaded block whose values reach past the bfloat16 range attends as "
          "the reference dequantizes it (clamped)", "[persistence][quantized]") {
  // A value group with scale and zero the largest finite bfloat16 (0x7F7F, 3.3895e38) and no
  // code 0 reaches past the bfloat16 range (scale * 255 is inf in float), so the kernel must
  // take the clamping path, as the reference dequantizer does (every value of the group clamps
  // to 3.3895e38).
  EditableBlockRecord record;
  const auto& format = record.format;
  for (Index token : {Index(0), Index(7)}) {
    record.put(format.value_scales_offset() + 2 * token, 0x7F7F);
    record.put(format.value_zeros_offset() + 2 * token, 0x7F7F);
    for (Index c = 0; c < record.head_dim; ++c)
      record.bytes[record.at + static_cast<std::size_t>(format.value_code_row_offset(token) + c)] =
          static_cast<char>(1 + 16 * c);
  }
  const auto copy = loaded<Int8KVCache<float>>(resealed(record.bytes));
  const Tensor4<float> q = random_tensor<float, kvcache::BHSD>(1, 4, 1, record.head_dim, 6);
  const Tensor4<float> got = kvcache::attend(q, copy);
  const auto want = reference_attention<kvcache::BHSD>(q, copy.keys(), copy.values(),
                                                       iota_positions(copy.size()),
                                                       copy.size() - 1, ReferenceRules{});
  for (Index i = 0; i < got.size(); ++i) REQUIRE(std::isfinite(got.data()[i]));
  REQUIRE(max_abs_diff(got, want) <= 1e-5 * 3.3895e38);
}

TEST_CASE("persistence: load rejects a block whose zero points or scales the quantizer cannot "
          "make (infinite, NaN, negative scale)", "[persistence][quantized]") {
  // The quantizer makes every zero a finite bfloat16 and every scale a finite one >= 0. A
  // record with another describes no state the cache can reach: FormatError, naming the number.
  struct Case {
    const char* part;
    Index offset;
    std::uint16_t bits;
    const char* says;
  };
  const kvcache::detail::QuantBlockFormat<8> format{EditableBlockRecord::group,
                                                    EditableBlockRecord::head_dim};
  const Case cases[] = {
      {"key zero", format.key_zeros_offset() + 2 * 3, 0x7F80, "key zero 3 must be finite, got inf"},
      {"key scale", format.key_scales_offset(), 0xFFC0, "key scale 0 must be finite and >= 0, got "},
      {"key scale", format.key_scales_offset() + 2 * 15, 0xBF80, "key scale 15 must be finite and >= 0, got -1"},
      {"value zero", format.value_zeros_offset() + 2 * 5, 0xFF80, "value zero 5 must be finite, got -inf"},
      {"value scale", format.value_scales_offset() + 2 * 9, 0x7F80, "value scale 9 must be finite and >= 0, got inf"},
      {"value scale", format.value_scales_offset(), 0x8001, "value scale 0 must be finite and >= 0, got "},
  };
  for (const Case& c : cases) {
    CAPTURE(c.part, c.bits);
    EditableBlockRecord record;
    record.put(c.offset, c.bits);
    const std::string message = load_error<Int8KVCache<float>>(resealed(record.bytes));
    CAPTURE(message);
    CHECK(contains(message, std::string("quantized block 0: ") + c.says));
    char bits[32];
    std::snprintf(bits, sizeof bits, "(bfloat16 0x%04X)", unsigned{c.bits});
    CHECK(contains(message, bits));
  }
  // A negative zero point is one the quantizer makes (the minimum rounded down), and so is a
  // scale of -0 (a constant group under a rounding mode other than to-nearest): accepted.
  EditableBlockRecord record;
  record.put(format.value_zeros_offset(), 0xBF80);
  record.put(format.key_zeros_offset(), 0x8000);
  record.put(format.key_scales_offset() + 2, 0x8000);
  record.put(format.value_scales_offset() + 2, 0x8000);
  (void)loaded<Int8KVCache<float>>(resealed(record.bytes));
  SECTION("in a version 1 record (key codes as token rows: the key zeros follow them)") {
    // int8_d10_g5.kvc: head_dim 10, group 5; its first block follows the 97-byte header, its
    // key zeros follow 5 x 10 key code bytes.
    std::string bytes = format_v1_file("int8_d10_g5.kvc");
    const std::size_t key_zero_3 = 97 + 5 * 10 + 2 * 3;
    bytes[key_zero_3] = '\xC0';
    bytes[key_zero_3 + 1] = '\x7F';
    CHECK(contains(load_error<Int8KVCache<float>>(resealed(bytes)),
                   "quantized block 0: key zero 3 must be finite, got nan (bfloat16 0x7FC0)"));
  }
}

TEST_CASE("persistence: load rejects a quantized cache whose unquantized tail holds what "
          "update() refuses", "[persistence][quantized]") {
  // Later updates quantize the tail: a NaN or an infinity there would make a block that
  // attends as NaN (and that load() refuses once saved); double also past the bfloat16 range.
  auto tail_error = [](auto cache, double bad) {
    using Cache = decltype(cache);
    using T = typename Cache::element_type;
    append(cache, 1, 3, 5);  // group 16: all three positions in the tail
    REQUIRE(cache.quantized_size() == 0);
    std::string bytes = saved(cache);
    // The tail values are the record's last elements before its checksum: the last one.
    const std::size_t at = bytes.size() - 4 - sizeof(T);
    const T x = static_cast<T>(bad);
    std::memcpy(&bytes[at], &x, sizeof x);
    return load_error<Cache>(resealed(bytes));
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  CHECK(contains(tail_error(Int8KVCache<float>(1, 32, 1, 16, quant_config(16, 4)), nan),
                 "tail values: element 47 is nan: expected a finite value"));
  CHECK(contains(tail_error(Int4KVCache<Eigen::half>(1, 32, 1, 16, quant_config(16, 4)), -inf),
                 "tail values: element 47 is -inf: expected a finite value"));
  CHECK(contains(tail_error(QuantizedKVCache<double, 8>(1, 32, 1, 16, quant_config(16, 4)), 1e39),
                 "tail values: element 47 is 1e+39: expected a finite value of magnitude <= 3.3895e38"));
}

// --- damage: every truncation, every flipped bit ----------------------------------------------------

TEST_CASE("persistence: every truncation and every flipped bit is a FormatError",
          "[persistence][damage]") {
  SECTION("static") {
    StaticKVCache<float, BSHD> cache(1, 3, 1, 2);
    append(cache, 1, 2, 1);
    require_every_damage_rejected<StaticKVCache<float, BSHD>>(saved(cache));
  }
  SECTION("dynamic") {
    DynamicKVCache<Eigen::half> cache(1, 1, 3);
    append(cache, 1, 2, 2);
    require_every_damage_rejected<DynamicKVCache<Eigen::half>>(saved(cache));
  }
  SECTION("sliding window after a wrap, with a sink") {
    SlidingWindowKVCache<float> cache(1, 2, 1, 1, 1);
    for (unsigned i = 0; i < 6; ++i) append(cache, 1, 1, i);
    require_every_damage_rejected<SlidingWindowKVCache<float>>(saved(cache));
  }
  SECTION("int8 with a block and a tail") {
    Int8KVCache<float> cache(1, 8, 1, 2, quant_config(2, 1));
    append(cache, 1, 3, 4);
    REQUIRE(cache.quantized_size() == 2);
    require_every_damage_rejected<Int8KVCache<float>>(saved(cache));
  }
  SECTION("int4 with a block and a tail") {
    Int4KVCache<Eigen::bfloat16, BSHD> cache(1, 8, 1, 2, quant_config(2, 0));
    append(cache, 1, 3, 5);
    REQUIRE(cache.quantized_size() == 2);
    require_every_damage_rejected<Int4KVCache<Eigen::bfloat16, BSHD>>(saved(cache));
  }
  SECTION("frozen") {
    StaticKVCache<double> cache(1, 2, 1, 1);
    append(cache, 1, 2, 6);
    require_every_damage_rejected<FrozenKVCache<double>>(saved(*cache.freeze()));
  }
  SECTION("the errors say what is wrong") {
    StaticKVCache<float> cache(1, 3, 1, 2);
    append(cache, 1, 2, 1);
    const std::string bytes = saved(cache);
    const auto flipped = [&](std::size_t at) {
      std::string damaged = bytes;
      damaged[at] = static_cast<char>(damaged[at] ^ 0x04);
      return load_error<StaticKVCache<float>>(damaged);
    };
    REQUIRE(contains(flipped(1), "not a kvcache record: expected the magic bytes "
                                 "89 4B 56 43 0D 0A 1A 0A, got 89 4F 56 43 0D 0A 1A 0A"));
    REQUIRE(contains(flipped(8), "unsupported format version: expected 1 to 2, got 6"));
    REQUIRE(contains(flipped(30), "header checksum mismatch"));
    REQUIRE(contains(flipped(bytes.size() - 6), "checksum mismatch: the record stores"));
    const std::string truncated =
        load_error<StaticKVCache<float>>(bytes.substr(0, bytes.size() - 10));
    REQUIRE(contains(truncated, "truncated: expected 16 bytes of values, the stream ended after 10"));
    REQUIRE(contains(load_error<StaticKVCache<float>>(bytes.substr(0, 3)),
                     "truncated: expected 8 bytes of magic"));
    REQUIRE(contains(load_error<StaticKVCache<float>>("not a cache"), "not a kvcache record"));
    REQUIRE(contains(load_error<StaticKVCache<float>>(""), "truncated"));
    REQUIRE(contains(load_error<StaticKVCache<float>>(bytes.substr(0, 40)),
                     "truncated: expected 49 bytes of header, the stream ended after 24"));
  }
}

// --- another type ----------------------------------------------------------------------------------

TEST_CASE("persistence: loading as another kind, element type or layout names both",
          "[persistence][mismatch]") {
  StaticKVCache<float> static_cache(1, 4, 1, 2);
  const std::string static_bytes = saved(static_cache);
  const auto require_names = [](const std::string& what, const std::string& expected,
                                const std::string& got) {
    CAPTURE(what);
    REQUIRE(contains(what, "expected a " + expected));
    REQUIRE(contains(what, "got a " + got));
  };
  require_names(load_error<StaticKVCache<float, BSHD>>(static_bytes),
                "StaticKVCache<float, BSHD>", "StaticKVCache<float, BHSD>");
  require_names(load_error<StaticKVCache<double>>(static_bytes), "StaticKVCache<double, BHSD>",
                "StaticKVCache<float, BHSD>");
  require_names(load_error<StaticKVCache<Eigen::half>>(static_bytes),
                "StaticKVCache<Eigen::half, BHSD>", "StaticKVCache<float, BHSD>");
  require_names(load_error<DynamicKVCache<float>>(static_bytes), "DynamicKVCache<float, BHSD>",
                "StaticKVCache<float, BHSD>");
  require_names(load_error<FrozenKVCache<float>>(static_bytes), "FrozenKVCache<float, BHSD>",
                "StaticKVCache<float, BHSD>");
  require_names(load_error<SlidingWindowKVCache<float>>(static_bytes),
                "SlidingWindowKVCache<float, BHSD>", "StaticKVCache<float, BHSD>");

  Int8KVCache<Eigen::bfloat16, BSHD> int8(1, 4, 1, 2, quant_config(2, 1));
  const std::string int8_bytes = saved(int8);
  require_names(load_error<Int4KVCache<Eigen::bfloat16, BSHD>>(int8_bytes),
                "QuantizedKVCache<Eigen::bfloat16, 4, BSHD>",
                "QuantizedKVCache<Eigen::bfloat16, 8, BSHD>");
  require_names(load_error<StaticKVCache<Eigen::bfloat16, BSHD>>(int8_bytes),
                "StaticKVCache<Eigen::bfloat16, BSHD>",
                "QuantizedKVCache<Eigen::bfloat16, 8, BSHD>");
  require_names(load_error<Int8KVCache<Eigen::bfloat16>>(int8_bytes),
                "QuantizedKVCache<Eigen::bfloat16, 8, BHSD>",
                "QuantizedKVCache<Eigen::bfloat16, 8, BSHD>");

  // Unknown codes (with valid checksums) are named as such.
  const std::string unknown =
      load_error<StaticKVCache<float>>(record_bytes({9, 7, 3, 0, 0}, {1, 1, 1, 1, 0}, ""));
  REQUIRE(contains(unknown, "got a unknown kind 9<unknown element type 7, unknown layout 3>"));
}

// --- crafted headers with valid checksums --------------------------------------------------------

TEST_CASE("persistence: headers inconsistent with themselves or the payload are rejected",
          "[persistence][consistency]") {
  StaticKVCache<float> cache(1, 3, 1, 2);
  append(cache, 1, 2, 1);
  const std::string bytes = saved(cache);  // fields: batch, heads, head_dim, capacity, position
  using S = StaticKVCache<float>;
  REQUIRE(contains(load_error<S>(with_field(bytes, 4, 4)),
                   "position: expected at most capacity = 3, got 4"));
  REQUIRE(contains(load_error<S>(with_field(bytes, 0, 0)), "batch_size: expected at least 1, got 0"));
  REQUIRE(contains(load_error<S>(with_field(bytes, 2, 0)), "head_dim: expected at least 1, got 0"));
  REQUIRE(contains(load_error<S>(with_field(with_field(bytes, 4, 0), 3, 0)),
                   "capacity: expected at least 1, got 0"));
  REQUIRE(contains(load_error<S>(with_field(bytes, 1, std::uint64_t{1} << 63)),
                   "num_heads: expected at most 2^63 - 1, got 9223372036854775808"));
  REQUIRE(contains(load_error<S>(with_field(bytes, 3, (std::uint64_t{1} << 48) + 1)),
                   "capacity: expected at most max_position = 2^48 = 281474976710656, got "
                   "281474976710657"));
  // A position the payload does not match: shorter than declared is truncated, a longer payload
  // leaves bytes where the checksum should be.
  REQUIRE(contains(load_error<S>(with_field(bytes, 4, 3)), "truncated"));
  REQUIRE(contains(load_error<S>(with_field(bytes, 4, 1)), "checksum mismatch"));
  // header_size that is in range but not the kind's.
  std::string wrong_size = bytes;
  wrong_size[12] = 73;
  wrong_size.insert(65, 8, '\0');
  REQUIRE(contains(load_error<S>(resealed(wrong_size)),
                   "header_size: expected 65 bytes for a StaticKVCache<float, BHSD>, got 73"));
  std::string too_big = bytes;
  too_big[13] = 1;  // 65 + 256
  REQUIRE(contains(load_error<S>(too_big), "header_size: expected 33 to 256 bytes, got 321"));
  // Non-zero type bytes a kind does not use.
  std::string with_bits = bytes;
  with_bits[19] = 8;
  REQUIRE(contains(load_error<S>(resealed(with_bits)), "got a StaticKVCache<float, 8, BHSD>"));

  SECTION("sliding window") {
    SlidingWindowKVCache<float> window(1, 3, 1, 1, 2);
    for (unsigned i = 0; i < 9; ++i) append(window, 1, 1, i);  // ring 3, next (9 - 2) % 3 = 1
    const std::string w = saved(window);
    using W = SlidingWindowKVCache<float>;
    // fields 5..8: window, num_sink_tokens, ring_slots, next_ring_slot
    REQUIRE(contains(load_error<W>(with_field(w, 8, 2)),
                     "next_ring_slot: expected 1 ((max(position, num_sink_tokens) - "
                     "num_sink_tokens) % ring_slots), got 2"));
    REQUIRE(contains(load_error<W>(with_field(w, 3, 6)),
                     "capacity: expected 5 (num_sink_tokens + window), got 6"));
    REQUIRE(contains(load_error<W>(with_field(w, 7, 2)),
                     "ring_slots: expected at least window = 3, got 2"));
    REQUIRE(contains(load_error<W>(with_field(with_field(w, 5, 0), 3, 2)),
                     "window: expected at least 1, got 0"));
    REQUIRE(contains(load_error<W>(with_field(w, 6, (std::uint64_t{1} << 63) - 1)),
                     "num_sink_tokens: expected at most max_position = 2^48 = 281474976710656, "
                     "got 9223372036854775807"));
    // The fuzz finding of issue 15 (fuzz/corpus/fuzz_load/regression-position-2p63): a
    // position no cache reaches was accepted, and the next one-token update threw.
    REQUIRE(contains(load_error<W>(with_field(w, 4, (std::uint64_t{1} << 63) - 1)),
                     "position: expected at most max_position = 2^48"));
    // A ring offset consistent with a position at max_position loads, and the next token is
    // refused (length_error), as for a cache that reached it by updates.
    const Index top = kvcache::max_position;
    const std::string full = with_field(with_field(w, 4, static_cast<std::uint64_t>(top)), 8,
                                        static_cast<std::uint64_t>((top - 2) % 3));
    W at_top = loaded<W>(full);
    REQUIRE(at_top.position() == top);
    REQUIRE_THROWS_AS(append(at_top, 1, 1, 5), std::length_error);
    REQUIRE(at_top.position() == top);
  }
  SECTION("quantized") {
    Int8KVCache<float> q(1, 10, 1, 4, quant_config(2, 1));
    append(q, 1, 5, 3);  // quantized 4, tail 1, tail ring max(1, 2 - 1) = 1 slot
    const std::string b8 = saved(q);
    using Q = Int8KVCache<float>;
    // fields 5..8: group_size, residual_length, quantized_positions, tail_slots
    REQUIRE(contains(load_error<Q>(with_field(b8, 5, 3)),
                     "invalid quantization config: QuantConfig: group_size must divide head_dim"));
    REQUIRE(contains(load_error<Q>(with_field(b8, 6, 65)),
                     "invalid quantization config: QuantConfig: residual_length must be in [0, 64]"));
    REQUIRE(contains(load_error<Q>(with_field(b8, 7, 2)),
                     "quantized_positions: expected 4 (position minus its unquantized tail), got 2"));
    REQUIRE(contains(load_error<Q>(with_field(b8, 8, 2)), "tail_slots: expected 1"));
  }
  SECTION("frozen") {
    const std::string f = saved(*cache.freeze());
    REQUIRE(contains(load_error<FrozenKVCache<float>>(with_field(f, 3, 3)),
                     "capacity: expected 2 (a frozen cache's capacity is its position), got 3"));
  }
}

TEST_CASE("persistence: absurd sizes are refused before they are allocated",
          "[persistence][limits]") {
  SECTION("extents whose product overflows") {
    const std::string bytes =
        record_bytes({kStatic, kFloat32, kBHSD, 0, 0},
                     {std::uint64_t{1} << 20, std::uint64_t{1} << 20, std::uint64_t{1} << 20,
                      std::uint64_t{1} << 20, 0},
                     "");
    REQUIRE(contains(load_error<StaticKVCache<float>>(bytes), "exceeds 2^63 - 1"));
  }
  SECTION("a capacity beyond LoadLimits") {
    const std::string bytes = record_bytes({kStatic, kFloat32, kBHSD, 0, 0},
                                           {1, 1, 1, std::uint64_t{1} << 40, 0}, "");
    const std::string what = load_error<StaticKVCache<float>>(bytes);
    REQUIRE(contains(what, "the cache would own 8796093022208 bytes of K/V storage: expected at "
                           "most LoadLimits::max_memory_bytes = 17179869184"));
    const std::string quantized = record_bytes({kQuantized, kFloat16, kBSHD, 4, 0},
                                               {8, 8, 128, std::uint64_t{1} << 36, 0, 32, 32, 0, 32},
                                               "");
    REQUIRE(contains(load_error<Int4KVCache<Eigen::half, BSHD>>(quantized), "LoadLimits"));
    const std::string window = record_bytes({kSliding, kFloat64, kBHSD, 0, 0},
                                            {1, 1, 1, 5, 0, 4, 1, std::uint64_t{1} << 40, 0}, "");
    REQUIRE(contains(load_error<SlidingWindowKVCache<double>>(window), "LoadLimits"));
    const std::string model = header_bytes({kModel, kFloat32, kBHSD, 0, kStatic},
                                           {std::uint64_t{1} << 60}) + bytes;
    REQUIRE(contains(load_error<ModelKVCache<StaticKVCache<float>>>(model),
                     "layer 0 of 1152921504606846976"));
  }
  SECTION("a payload the stream does not hold: no allocation beyond what arrived") {
    // 8 GiB of K/V (within the default limit), 4 GiB of keys declared, 100 bytes present.
    const std::uint64_t positions = std::uint64_t{1} << 30;
    std::string bytes = header_bytes({kDynamic, kFloat32, kBSHD, 0, 0},
                                     {1, 1, 1, positions, positions});
    bytes += std::string(100 - bytes.size(), '\x01');
    largest_allocation = 0;
    tracking_allocations = true;
    std::string what;
    try {
      std::istringstream in(bytes);
      (void)DynamicKVCache<float, BSHD>::load(in);
    } catch (const FormatError& e) {
      what = e.what();
    }
    tracking_allocations = false;
    REQUIRE(contains(what, "truncated: expected 4294967296 bytes of keys, the stream ended after 35"));
    REQUIRE(largest_allocation.load() <= 2 * kd::kSerializationChunkBytes);
  }
  SECTION("LoadLimits is exact and adjustable") {
    StaticKVCache<float> cache(2, 16, 1, 4);
    const std::string bytes = saved(cache);
    LoadLimits limits;
    limits.max_memory_bytes = cache.memory_bytes() - 1;
    REQUIRE(contains(load_error<StaticKVCache<float>>(bytes, limits),
                     "the cache would own 1024 bytes of K/V storage: expected at most "
                     "LoadLimits::max_memory_bytes = 1023"));
    limits.max_memory_bytes = cache.memory_bytes();
    std::istringstream in(bytes);
    REQUIRE(StaticKVCache<float>::load(in, limits).capacity() == 16);
  }
}

// --- streams that fail -----------------------------------------------------------------------------

TEST_CASE("persistence: failing streams", "[persistence][streams]") {
  StaticKVCache<float> cache(1, 4, 2, 3);
  append(cache, 1, 3, 1);
  const std::string bytes = saved(cache);
  using S = StaticKVCache<float>;

  SECTION("load from a stream with failbit or badbit set") {
    for (const auto state : {std::ios::failbit, std::ios::badbit}) {
      std::istringstream in(bytes);
      in.setstate(state);
      const std::string what = message_of([&] { (void)S::load(in); });
      REQUIRE_THROWS_AS(S::load(in), FormatError);
      REQUIRE(contains(what, "stream error: the input stream is in a failed state"));
    }
  }
  SECTION("load from a stream with exceptions enabled") {
    std::istringstream in(bytes.substr(0, 50));
    in.exceptions(std::ios::failbit | std::ios::badbit | std::ios::eofbit);
    const std::string what = message_of([&] { (void)S::load(in); });
    REQUIRE(contains(what, "truncated"));
    std::istringstream again(bytes.substr(0, 50));
    again.exceptions(std::ios::failbit | std::ios::badbit | std::ios::eofbit);
    REQUIRE_THROWS_AS(S::load(again), FormatError);
    std::istringstream whole(bytes);
    whole.exceptions(std::ios::failbit | std::ios::badbit);
    require_same_state(cache, S::load(whole));
  }
  SECTION("load from a device that fails midway") {
    for (const std::size_t fail_at : {std::size_t(0), std::size_t(5), std::size_t(70), bytes.size() - 1}) {
      FailingSource source(bytes, fail_at);
      std::istream in(&source);
      const std::string what = message_of([&] { (void)S::load(in); });
      CAPTURE(fail_at, what);
      REQUIRE(contains(what, "stream error"));
      FailingSource again(bytes, fail_at);
      std::istream in_again(&again);
      REQUIRE_THROWS_AS(S::load(in_again), FormatError);
    }
  }
  SECTION("save to a failed stream, a full device, a stream with exceptions") {
    std::ostringstream bad;
    bad.setstate(std::ios::badbit);
    REQUIRE_THROWS_AS(cache.save(bad), std::ios_base::failure);
    REQUIRE(contains(message_of([&] { cache.save(bad); }), "the output stream is in a failed state"));
    for (std::size_t room = 0; room < bytes.size(); ++room) {
      FullDevice device(room);
      std::ostream out(&device);
      CAPTURE(room);
      REQUIRE_THROWS_AS(cache.save(out), std::ios_base::failure);
    }
    FullDevice roomy(bytes.size());
    std::ostream fits(&roomy);
    REQUIRE_NOTHROW(cache.save(fits));
    FullDevice small(10);
    std::ostream throwing(&small);
    throwing.exceptions(std::ios::badbit | std::ios::failbit);
    REQUIRE_THROWS_AS(cache.save(throwing), std::ios_base::failure);
    // Every kind reports it.
    FullDevice none(0);
    std::ostream full(&none);
    REQUIRE_THROWS_AS(cache.freeze()->save(full), std::ios_base::failure);
    REQUIRE_THROWS_AS(SlidingWindowKVCache<float>(1, 2, 1, 1).save(full), std::ios_base::failure);
    REQUIRE_THROWS_AS(Int8KVCache<float>(1, 2, 1, 2, quant_config(2, 0)).save(full),
                      std::ios_base::failure);
    REQUIRE_THROWS_AS(DynamicKVCache<float>(1, 1, 1).save(full), std::ios_base::failure);
    REQUIRE_THROWS_AS((ModelKVCache<StaticKVCache<float>>(2, 1, 1, 1, 1).save(full)),
                      std::ios_base::failure);
  }
}

TEST_CASE("a cache of no positions with a huge head count saves and loads at once",
          "[persistence]") {
  // fuzz_load's finding: copying "no positions" walked every (row, head) pair, 2^42 of them.
  const Index heads = Index(1) << 42;
  kvcache::DynamicKVCache<float> empty(1, heads, 3);
  std::stringstream io;
  empty.save(io);
  const auto back = kvcache::DynamicKVCache<float>::load(io);
  REQUIRE(back.num_heads() == heads);
  REQUIRE(back.size() == 0);
  std::stringstream again;
  back.save(again);
  REQUIRE(again.str() == io.str());
}
