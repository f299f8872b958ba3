// kvcache: the record header every saved cache starts with (docs/persistence_format.md) - the
// magic, the version, which type of cache the record holds, the kind's numbers (each kind names
// its own fields in its RecordTraits), the header CRC - and the record's trailing checksum.
#ifndef KVCACHE_DETAIL_RECORD_HEADER_HPP
#define KVCACHE_DETAIL_RECORD_HEADER_HPP

#include <kvcache/detail/serialization.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/layout.hpp>
#include <kvcache/persistence.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace kvcache {
namespace detail {

/// The first eight bytes of every record. As in PNG: a non-ASCII first byte, so that a text
/// file is never taken for a record, and CR LF, SUB (0x1A), LF, which text-mode transfers and
/// line-ending conversions damage detectably.
inline constexpr std::array<std::uint8_t, 8> kRecordMagic = {0x89, 'K', 'V', 'C',
                                                             '\r', '\n', 0x1A, '\n'};

/// Byte 16 of a record: the cache kind.
enum class CacheKind : std::uint8_t {
  static_cache = 1,
  dynamic_cache = 2,
  sliding_window_cache = 3,
  quantized_cache = 4,
  frozen_cache = 5,
  model_cache = 6,
  mixed_model_cache = 7,  ///< a ModelKVCache of std::variant layers: a table of layer types
  paged_cache = 8,
};

/// Whether a record kind is a model (a header of num_layers, then layer records).
constexpr bool is_model_kind(std::uint8_t kind) {
  return kind == static_cast<std::uint8_t>(CacheKind::model_cache) ||
         kind == static_cast<std::uint8_t>(CacheKind::mixed_model_cache);
}

/// Byte 17: the element type.
enum class ElementCode : std::uint8_t { float32 = 1, float64 = 2, float16 = 3, bfloat16 = 4 };

/// Byte 18: the layout.
enum class LayoutCode : std::uint8_t { bhsd = 1, bshd = 2 };

template <class T>
constexpr ElementCode element_code() {
  if constexpr (std::is_same_v<T, float>)
    return ElementCode::float32;
  else if constexpr (std::is_same_v<T, double>)
    return ElementCode::float64;
  else if constexpr (std::is_same_v<T, Eigen::half>)
    return ElementCode::float16;
  else
    return ElementCode::bfloat16;
}

template <class Layout>
constexpr LayoutCode layout_code() {
  return std::is_same_v<Layout, BHSD> ? LayoutCode::bhsd : LayoutCode::bshd;
}

/// Bytes 16-20 of a record: which type of cache it holds. Raw bytes, so that an unknown code
/// read from a stream can still be shown.
struct RecordType {
  std::uint8_t kind = 0;
  std::uint8_t element = 0;
  std::uint8_t layout = 0;
  std::uint8_t bits = 0;        ///< quantized caches (and models of them): 8 or 4; else 0
  std::uint8_t layer_kind = 0;  ///< models: the layers' kind; else 0

  bool operator==(const RecordType& o) const {
    return kind == o.kind && element == o.element && layout == o.layout && bits == o.bits &&
           layer_kind == o.layer_kind;
  }
  bool operator!=(const RecordType& o) const { return !(*this == o); }
};

/// How a cache kind is saved and loaded, specialised next to each kind that has save() and
/// load() (the codec in detail/record_codec.hpp calls it). A specialisation holds:
///   kind                      the CacheKind of its records;
///   Header, fields            the kind's numbers (a struct of Index) and their names in file
///                             order (CacheHeader and cache_fields for one cache's positions);
///   header(cache)             the numbers of a cache;
///   write_payload(cache, header, writer), read_payload(reader, header, limits) -> Payload,
///   build(header, Payload&&)  the bytes after the header, and the cache made from them once
///                             the checksum has matched.
/// Empty for every other class. (Models write their layers' records after their own header
/// and need only kind, Header and fields.)
template <class Cache>
struct RecordTraits {};

/// The record kind of a cache class (RecordTraits<Cache>::kind) as `value`; no `value` for a
/// class without records.
template <class Cache, class = void>
struct record_kind {};
template <class Cache>
struct record_kind<Cache, std::void_t<decltype(RecordTraits<Cache>::kind)>>
    : std::integral_constant<CacheKind, RecordTraits<Cache>::kind> {};

/// The RecordType of a cache class; a ModelKVCache's is its layers' with kind model_cache and
/// layer_kind the layers' kind.
template <class Cache>
constexpr RecordType record_type_of() {
  if constexpr (record_kind<Cache>::value == CacheKind::mixed_model_cache) {
    RecordType type;  // the layers' types follow the header, one per layer
    type.kind = static_cast<std::uint8_t>(CacheKind::mixed_model_cache);
    return type;
  } else if constexpr (record_kind<Cache>::value == CacheKind::model_cache) {
    RecordType type = record_type_of<typename Cache::cache_type>();
    type.layer_kind = type.kind;
    type.kind = static_cast<std::uint8_t>(CacheKind::model_cache);
    return type;
  } else {
    RecordType type;
    type.kind = static_cast<std::uint8_t>(record_kind<Cache>::value);
    type.element = static_cast<std::uint8_t>(element_code<typename Cache::element_type>());
    type.layout = static_cast<std::uint8_t>(layout_code<typename Cache::layout_type>());
    if constexpr (record_kind<Cache>::value == CacheKind::quantized_cache)
      type.bits = static_cast<std::uint8_t>(Cache::bits);
    return type;
  }
}

inline const char* kind_name(std::uint8_t kind) {
  switch (static_cast<CacheKind>(kind)) {
    case CacheKind::static_cache: return "StaticKVCache";
    case CacheKind::dynamic_cache: return "DynamicKVCache";
    case CacheKind::sliding_window_cache: return "SlidingWindowKVCache";
    case CacheKind::quantized_cache: return "QuantizedKVCache";
    case CacheKind::frozen_cache: return "FrozenKVCache";
    case CacheKind::model_cache: return "ModelKVCache";
    case CacheKind::mixed_model_cache: return "ModelKVCache of mixed layers";
    case CacheKind::paged_cache: return "PagedKVCache";
  }
  return nullptr;
}

inline const char* element_name(std::uint8_t element) {
  switch (static_cast<ElementCode>(element)) {
    case ElementCode::float32: return "float";
    case ElementCode::float64: return "double";
    case ElementCode::float16: return "Eigen::half";
    case ElementCode::bfloat16: return "Eigen::bfloat16";
  }
  return nullptr;
}

inline const char* layout_name(std::uint8_t layout) {
  switch (static_cast<LayoutCode>(layout)) {
    case LayoutCode::bhsd: return "BHSD";
    case LayoutCode::bshd: return "BSHD";
  }
  return nullptr;
}

/// "QuantizedKVCache<float, 4, BHSD>", "ModelKVCache<StaticKVCache<double, BSHD>>"; unknown
/// codes as "unknown kind 77" and the like.
inline std::string describe(const RecordType& type) {
  const auto named = [](const char* name, const char* what, std::uint8_t code) {
    return name != nullptr ? std::string(name) : message("unknown ", what, " ", int{code});
  };
  if (type == RecordType{static_cast<std::uint8_t>(CacheKind::mixed_model_cache), 0, 0, 0, 0})
    return "ModelKVCache<std::variant<...>>";
  if (type.kind == static_cast<std::uint8_t>(CacheKind::model_cache)) {
    RecordType layer = type;
    layer.kind = type.layer_kind;
    layer.layer_kind = 0;
    return "ModelKVCache<" + describe(layer) + ">";
  }
  std::string out = named(kind_name(type.kind), "kind", type.kind) + "<" +
                    named(element_name(type.element), "element type", type.element) + ", ";
  if (type.kind == static_cast<std::uint8_t>(CacheKind::quantized_cache) || type.bits != 0)
    out += std::to_string(int{type.bits}) + ", ";
  out += named(layout_name(type.layout), "layout", type.layout) + ">";
  if (type.layer_kind != 0) out += " with layer kind " + std::to_string(int{type.layer_kind});
  return out;
}

/// A number of a record header: a little-endian uint64 in the file, an Index in the kind's
/// Header (at most 2^63 - 1). `at_least_one`: a record with 0 there is rejected.
template <class Header>
struct HeaderField {
  const char* name;
  Index Header::*member;
  bool at_least_one = false;
};

/// The numbers a record of one cache's positions starts with (every kind but models and paged
/// pools); a kind's Header derives from it and adds its own state.
struct CacheHeader {
  Index batch_size = 0;
  Index num_heads = 0;
  Index head_dim = 0;
  Index capacity = 0;  ///< the cache's capacity(); for quantized caches max_seq_len
  Index position = 0;
};

/// CacheHeader's fields, in file order, then `own` (the kind's state) for a Header derived from
/// it.
template <class Header, class... Own>
constexpr std::array<HeaderField<Header>, 5 + sizeof...(Own)> cache_fields(Own... own) {
  return {{{"batch_size", &Header::batch_size, true},
           {"num_heads", &Header::num_heads, true},
           {"head_dim", &Header::head_dim, true},
           {"capacity", &Header::capacity, false},
           {"position", &Header::position, false},
           own...}};
}

/// Byte offsets of the header's fixed part.
inline constexpr std::size_t kVersionOffset = 8;
inline constexpr std::size_t kHeaderSizeOffset = 12;
inline constexpr std::size_t kRecordTypeOffset = 16;
inline constexpr std::size_t kHeaderFieldsOffset = 21;
/// The smallest and the largest header_size load() accepts (any kind, any version).
inline constexpr std::uint32_t kMinHeaderBytes = kHeaderFieldsOffset + 8 + 4;
inline constexpr std::uint32_t kMaxHeaderBytes = 256;

/// Bytes of the header of a record with n fields: the fixed part, 8 per field, the header CRC.
constexpr std::uint32_t header_bytes(std::size_t n) {
  return static_cast<std::uint32_t>(kHeaderFieldsOffset + 8 * n + 4);
}

/// Writes a record header: magic, version, header_size, type, the fields of `header`, header
/// CRC.
template <class Header, std::size_t N>
void write_record_header(Writer& writer, const RecordType& t,
                         const std::array<HeaderField<Header>, N>& fields, const Header& header) {
  std::vector<std::uint8_t> bytes(header_bytes(N));
  std::copy(kRecordMagic.begin(), kRecordMagic.end(), bytes.begin());
  store_little_endian(bytes.data() + kVersionOffset, persistence_format_version);
  store_little_endian(bytes.data() + kHeaderSizeOffset, static_cast<std::uint32_t>(bytes.size()));
  const std::uint8_t type_bytes[] = {t.kind, t.element, t.layout, t.bits, t.layer_kind};
  std::copy(std::begin(type_bytes), std::end(type_bytes), bytes.begin() + kRecordTypeOffset);
  std::uint8_t* at = bytes.data() + kHeaderFieldsOffset;
  for (const HeaderField<Header>& field : fields) {
    store_little_endian(at, static_cast<std::uint64_t>(header.*field.member));
    at += 8;
  }
  store_little_endian(at, crc32c(bytes.data(), bytes.size() - 4));
  writer.write_bytes(bytes.data(), bytes.size(), "header");
}

/// The record header of a cache class's record (its RecordTraits' fields).
template <class Cache>
void write_record_header(Writer& writer, const typename RecordTraits<Cache>::Header& header) {
  write_record_header(writer, record_type_of<Cache>(), RecordTraits<Cache>::fields, header);
}

/// Reads a record header and checks, in this order: the magic, the version, the header size
/// against [kMinHeaderBytes, kMaxHeaderBytes], the header CRC, the record type against
/// `expected`, the header size against the kind's (`fields`), every field <= 2^63 - 1, the
/// fields marked at_least_one >= 1, and for every kind but models every field <= max_position
/// (2^48). Each failure throws FormatError naming the expected and the received value. Nothing
/// is allocated beyond kMaxHeaderBytes.
template <class Header, std::size_t N>
Header read_record_header(Reader& reader, const RecordType& expected,
                          const std::array<HeaderField<Header>, N>& fields) {
  std::vector<std::uint8_t> bytes(kHeaderFieldsOffset);
  // A short stream that does not start like the magic is "not a record", not "truncated".
  const std::size_t got = reader.read_some(bytes.data(), kRecordMagic.size());
  if (!std::equal(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(got),
                  kRecordMagic.begin()))
    reader.fail("not a kvcache record: expected the magic bytes ",
                hex_bytes(kRecordMagic.data(), kRecordMagic.size()), ", got ",
                hex_bytes(bytes.data(), got));
  if (got != kRecordMagic.size()) reader.fail_short("magic", kRecordMagic.size(), got);
  reader.read_bytes(bytes.data() + kVersionOffset, 4, "format_version");
  const auto version = load_little_endian<std::uint32_t>(bytes.data() + kVersionOffset);
  if (version < oldest_persistence_format_version || version > persistence_format_version)
    reader.fail("unsupported format version: expected ", oldest_persistence_format_version, " to ",
                persistence_format_version, ", got ", version, " (this library writes version ",
                persistence_format_version, " and reads versions ", oldest_persistence_format_version,
                " to ", persistence_format_version, ")");
  reader.set_format_version(version);
  reader.read_bytes(bytes.data() + kHeaderSizeOffset, 4, "header_size");
  const auto size = load_little_endian<std::uint32_t>(bytes.data() + kHeaderSizeOffset);
  if (size < kMinHeaderBytes || size > kMaxHeaderBytes)
    reader.fail("header_size: expected ", kMinHeaderBytes, " to ", kMaxHeaderBytes,
                " bytes, got ", size);
  bytes.resize(size);
  reader.read_bytes(bytes.data() + kRecordTypeOffset, size - kRecordTypeOffset, "header");
  const auto stored_crc = load_little_endian<std::uint32_t>(bytes.data() + size - 4);
  const std::uint32_t computed_crc = crc32c(bytes.data(), size - 4);
  if (stored_crc != computed_crc)
    reader.fail("header checksum mismatch: the header stores ", hex32(stored_crc),
                ", its bytes give ", hex32(computed_crc), " (the header is corrupt)");

  const std::uint8_t* type_bytes = bytes.data() + kRecordTypeOffset;
  const RecordType type{type_bytes[0], type_bytes[1], type_bytes[2], type_bytes[3], type_bytes[4]};
  if (type != expected)
    reader.fail("expected a ", describe(expected), ", got a ", describe(type),
                " (kind, element type and layout must match)");
  if (size != header_bytes(N))
    reader.fail("header_size: expected ", header_bytes(N), " bytes for a ", describe(type),
                ", got ", size);
  Header header;
  const std::uint8_t* at = bytes.data() + kHeaderFieldsOffset;
  for (const HeaderField<Header>& field : fields) {
    const auto value = load_little_endian<std::uint64_t>(at);
    at += 8;
    if (value > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
      reader.fail(field.name, ": expected at most 2^63 - 1, got ", value);
    header.*field.member = static_cast<Index>(value);
  }
  for (const HeaderField<Header>& field : fields)
    if (field.at_least_one && header.*field.member < 1)
      reader.fail(field.name, ": expected at least 1, got ", header.*field.member);
  // No cache reaches a position, size, capacity or extent beyond max_position (an update past
  // it throws; storage that large exceeds any memory): a record beyond it describes a state the
  // library never produces.
  if (!is_model_kind(type.kind))
    for (const HeaderField<Header>& field : fields)
      if (header.*field.member > max_position)
        reader.fail(field.name, ": expected at most max_position = 2^48 = ", max_position,
                    ", got ", header.*field.member);
  return header;
}

/// The record header of a cache class's record, checked as above.
template <class Cache>
typename RecordTraits<Cache>::Header read_record_header(Reader& reader) {
  return read_record_header(reader, record_type_of<Cache>(), RecordTraits<Cache>::fields);
}

/// Writes the record's trailing CRC-32C, over every byte of the record before it.
inline void write_record_checksum(Writer& writer) {
  const std::uint32_t crc = writer.checksum();
  writer.write_unsigned(crc, "checksum");
}

/// Reads the trailing CRC-32C and compares it with the bytes read.
inline void read_record_checksum(Reader& reader) {
  const std::uint32_t computed = reader.checksum();
  const std::uint64_t covered = reader.offset();
  const auto stored = reader.read_unsigned<std::uint32_t>("checksum");
  if (stored != computed)
    reader.fail("checksum mismatch: the record stores ", hex32(stored), ", its ", covered,
                " bytes give ", hex32(computed), " (the data are corrupt)");
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_RECORD_HEADER_HPP
