// kvcache: the saved-cache format (docs/persistence_format.md) - its version, the limits load()
// enforces, the record header every cache kind shares and the payload helpers the caches'
// save() and load() members are written with.
#ifndef KVCACHE_PERSISTENCE_HPP
#define KVCACHE_PERSISTENCE_HPP

#include <kvcache/detail/serialization.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/layout.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace kvcache {

/// \brief The version of the saved-cache format: what save() writes and the only version
/// load() reads. Any change to the format increments it (docs/persistence_format.md,
/// "Compatibility").
inline constexpr std::uint32_t persistence_format_version = 1;

/// \brief What load() is willing to allocate for one record.
///
/// load() reads the payload into memory that grows as the bytes arrive and allocates the
/// cache itself only once the record's checksum has matched; this limit bounds that last
/// allocation for records that are intact but declare a huge cache (crafted, or from a bigger
/// machine). For ModelKVCache it bounds all layers together.
struct LoadLimits {
  /// The largest memory_bytes() a loaded cache may have; a record declaring more is rejected
  /// with FormatError before anything is allocated for it. Default 16 GiB.
  std::uint64_t max_memory_bytes = std::uint64_t{16} << 30;
};

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

/// The record kind of each cache class that can be saved, as `value`; specialised next to each
/// class. Empty (no `value`) for everything else.
template <class Cache>
struct record_kind {};

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

/// The numbers of a record header. Every field is a little-endian uint64 in the file and must
/// be at most 2^63 - 1 (an Index); which fields a record has depends on its kind
/// (header_fields).
struct RecordHeader {
  RecordType type;
  // every kind but models
  Index batch_size = 0;
  Index num_heads = 0;
  Index head_dim = 0;
  Index capacity = 0;  ///< the cache's capacity(); for quantized caches max_seq_len
  Index position = 0;
  // sliding-window caches
  Index window = 0;
  Index num_sink_tokens = 0;
  Index ring_slots = 0;      ///< storage slots of the ring (>= window)
  Index next_ring_slot = 0;  ///< ring slot (0-based, after the sinks) of the next non-sink position
  // quantized caches
  Index group_size = 0;
  Index residual_length = 0;
  Index quantized_positions = 0;  ///< quantized_size(): positions [0, this) are blocks
  Index tail_slots = 0;           ///< slots of the unquantized tail ring
  // models and paged pools
  Index num_layers = 0;
  // paged pools
  Index num_blocks = 0;
  Index block_size = 0;
  Index num_sequences = 0;
  Index published_blocks = 0;
  Index next_sequence_id = 0;
};

struct HeaderField {
  const char* name;
  Index RecordHeader::*member;
};

/// The uint64 fields of a record of this kind, in file order.
inline std::vector<HeaderField> header_fields(std::uint8_t kind) {
  if (is_model_kind(kind)) return {{"num_layers", &RecordHeader::num_layers}};
  if (kind == static_cast<std::uint8_t>(CacheKind::paged_cache))
    return {{"num_layers", &RecordHeader::num_layers},
            {"num_blocks", &RecordHeader::num_blocks},
            {"block_size", &RecordHeader::block_size},
            {"num_heads", &RecordHeader::num_heads},
            {"head_dim", &RecordHeader::head_dim},
            {"num_sequences", &RecordHeader::num_sequences},
            {"published_blocks", &RecordHeader::published_blocks},
            {"next_sequence_id", &RecordHeader::next_sequence_id}};
  std::vector<HeaderField> fields = {{"batch_size", &RecordHeader::batch_size},
                                     {"num_heads", &RecordHeader::num_heads},
                                     {"head_dim", &RecordHeader::head_dim},
                                     {"capacity", &RecordHeader::capacity},
                                     {"position", &RecordHeader::position}};
  if (kind == static_cast<std::uint8_t>(CacheKind::sliding_window_cache))
    fields.insert(fields.end(), {{"window", &RecordHeader::window},
                                 {"num_sink_tokens", &RecordHeader::num_sink_tokens},
                                 {"ring_slots", &RecordHeader::ring_slots},
                                 {"next_ring_slot", &RecordHeader::next_ring_slot}});
  if (kind == static_cast<std::uint8_t>(CacheKind::quantized_cache))
    fields.insert(fields.end(), {{"group_size", &RecordHeader::group_size},
                                 {"residual_length", &RecordHeader::residual_length},
                                 {"quantized_positions", &RecordHeader::quantized_positions},
                                 {"tail_slots", &RecordHeader::tail_slots}});
  return fields;
}

/// Byte offsets of the header's fixed part.
inline constexpr std::size_t kVersionOffset = 8;
inline constexpr std::size_t kHeaderSizeOffset = 12;
inline constexpr std::size_t kRecordTypeOffset = 16;
inline constexpr std::size_t kHeaderFieldsOffset = 21;
/// The smallest and the largest header_size load() accepts (any kind, version 1).
inline constexpr std::uint32_t kMinHeaderBytes = kHeaderFieldsOffset + 8 + 4;
inline constexpr std::uint32_t kMaxHeaderBytes = 256;

/// Bytes of the header of a record of this kind: the fixed part, 8 per field, the header CRC.
inline std::uint32_t header_size(std::uint8_t kind) {
  return static_cast<std::uint32_t>(kHeaderFieldsOffset + 8 * header_fields(kind).size() + 4);
}

/// Writes a record header: magic, version, header_size, type, fields, header CRC.
inline void write_record_header(Writer& writer, const RecordHeader& header) {
  const std::vector<HeaderField> fields = header_fields(header.type.kind);
  std::vector<std::uint8_t> bytes(header_size(header.type.kind));
  std::copy(kRecordMagic.begin(), kRecordMagic.end(), bytes.begin());
  store_little_endian(bytes.data() + kVersionOffset, persistence_format_version);
  store_little_endian(bytes.data() + kHeaderSizeOffset, static_cast<std::uint32_t>(bytes.size()));
  const RecordType& t = header.type;
  const std::uint8_t type_bytes[] = {t.kind, t.element, t.layout, t.bits, t.layer_kind};
  std::copy(std::begin(type_bytes), std::end(type_bytes), bytes.begin() + kRecordTypeOffset);
  std::uint8_t* at = bytes.data() + kHeaderFieldsOffset;
  for (const HeaderField& field : fields) {
    store_little_endian(at, static_cast<std::uint64_t>(header.*field.member));
    at += 8;
  }
  store_little_endian(at, crc32c(bytes.data(), bytes.size() - 4));
  writer.write_bytes(bytes.data(), bytes.size(), "header");
}

/// Reads a record header and checks, in this order: the magic, the version, the header size
/// against [kMinHeaderBytes, kMaxHeaderBytes], the header CRC, the record type against
/// `expected`, the header size against the kind's, every field <= 2^63 - 1, and for caches
/// batch_size, num_heads and head_dim >= 1 and every field <= max_position (2^48). Each failure throws FormatError naming the
/// expected and the received value. Nothing is allocated beyond kMaxHeaderBytes.
inline RecordHeader read_record_header(Reader& reader, const RecordType& expected) {
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
  if (version != persistence_format_version)
    reader.fail("unsupported format version: expected ", persistence_format_version, ", got ",
                version, " (this library reads and writes version ", persistence_format_version,
                " only)");
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

  RecordHeader header;
  const std::uint8_t* type_bytes = bytes.data() + kRecordTypeOffset;
  header.type = {type_bytes[0], type_bytes[1], type_bytes[2], type_bytes[3], type_bytes[4]};
  if (header.type != expected)
    reader.fail("expected a ", describe(expected), ", got a ", describe(header.type),
                " (kind, element type and layout must match)");
  if (size != header_size(header.type.kind))
    reader.fail("header_size: expected ", header_size(header.type.kind), " bytes for a ",
                describe(header.type), ", got ", size);
  const std::uint8_t* at = bytes.data() + kHeaderFieldsOffset;
  for (const HeaderField& field : header_fields(header.type.kind)) {
    const auto value = load_little_endian<std::uint64_t>(at);
    at += 8;
    if (value > static_cast<std::uint64_t>(std::numeric_limits<Index>::max()))
      reader.fail(field.name, ": expected at most 2^63 - 1, got ", value);
    header.*field.member = static_cast<Index>(value);
  }
  if (!is_model_kind(header.type.kind)) {
    const bool paged = header.type.kind == static_cast<std::uint8_t>(CacheKind::paged_cache);
    for (const auto& [name, value] :
         {std::pair<const char*, Index>{paged ? "num_layers" : "batch_size",
                                        paged ? header.num_layers : header.batch_size},
          {paged ? "num_blocks" : "num_heads", paged ? header.num_blocks : header.num_heads},
          {paged ? "block_size" : "head_dim", paged ? header.block_size : header.head_dim},
          {"num_heads", header.num_heads},
          {"head_dim", header.head_dim}})
      if (value < 1) reader.fail(name, ": expected at least 1, got ", value);
    // No cache reaches a position, size, capacity or extent beyond max_position (an update
    // past it throws; storage that large exceeds any memory): a record beyond it describes a
    // state the library never produces.
    for (const HeaderField& field : header_fields(header.type.kind))
      if (header.*field.member > max_position)
        reader.fail(field.name, ": expected at most max_position = 2^48 = ", max_position,
                    ", got ", header.*field.member);
  }
  return header;
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

/// `value` must be at most `bound`, else FormatError "<what>: expected at most <bound_name> =
/// <bound>, got <value>".
inline void require_at_most(const Reader& reader, const char* what, Index value,
                            const char* bound_name, Index bound) {
  if (value > bound)
    reader.fail(what, ": expected at most ", bound_name, " = ", bound, ", got ", value);
}

/// `value` must equal `want`, else FormatError "<what>: expected <want> (<why>), got <value>".
inline void require_equal(const Reader& reader, const char* what, Index value, Index want,
                          const std::string& why) {
  if (value != want) reader.fail(what, ": expected ", want, " (", why, "), got ", value);
}

/// a + b, or FormatError when it exceeds 2^63 - 1.
inline Index checked_sum(const Reader& reader, const char* what, Index a, Index b) {
  if (a > std::numeric_limits<Index>::max() - b)
    reader.fail(what, ": ", a, " + ", b, " exceeds 2^63 - 1");
  return a + b;
}

/// The product of non-negative extents, or FormatError when it exceeds 2^63 - 1.
inline Index checked_product(const Reader& reader, const char* what,
                             std::initializer_list<Index> extents) {
  Index product = 1;
  for (const Index extent : extents) {
    if (extent != 0 && product > std::numeric_limits<Index>::max() / extent)
      reader.fail(what, ": ", message_of_extents(extents), " exceeds 2^63 - 1");
    product *= extent;
  }
  return product;
}

/// Rejects a record whose cache would own more than limits.max_memory_bytes.
inline void require_within_limit(const Reader& reader, Index memory_bytes,
                                  const LoadLimits& limits) {
  if (static_cast<std::uint64_t>(memory_bytes) > limits.max_memory_bytes)
    reader.fail("the cache would own ", memory_bytes,
                " bytes of K/V storage: expected at most LoadLimits::max_memory_bytes = ",
                limits.max_memory_bytes, " (pass a larger LoadLimits to load() to accept it)");
}

/// Calls f(b, h, i) for the rows (head_dim elements each) of a (batch, heads, count, head_dim)
/// tensor in Layout's memory order: the order of every K/V payload in a record.
template <class Layout, class F>
void for_each_row(Index batch, Index heads, Index count, F&& f) {
  if (count <= 0) return;  // no rows, however many heads (see copy_positions)
  for (Index b = 0; b < batch; ++b) {
    if constexpr (std::is_same_v<Layout, BHSD>) {
      for (Index h = 0; h < heads; ++h)
        for (Index i = 0; i < count; ++i) f(b, h, i);
    } else {
      for (Index i = 0; i < count; ++i)
        for (Index h = 0; h < heads; ++h) f(b, h, i);
    }
  }
}

/// Writes the rows row_of(b, h, i) -> const T* of positions i in [0, count) as one
/// (batch, heads, count, head_dim) tensor in Layout order.
template <class Layout, class RowOf>
void write_rows(Writer& writer, Index batch, Index heads, Index count, Index head_dim,
                RowOf&& row_of, const char* field) {
  for_each_row<Layout>(batch, heads, count, [&](Index b, Index h, Index i) {
    writer.write_elements(row_of(b, h, i), static_cast<std::size_t>(head_dim), field);
  });
}

/// Copies a (batch, heads, count, head_dim) tensor in Layout order to the rows
/// row_of(b, h, i) -> T*.
template <class Layout, class T, class RowOf>
void place_rows(const std::vector<T>& from, Index batch, Index heads, Index count, Index head_dim,
                RowOf&& row_of) {
  const T* next = from.data();
  for_each_row<Layout>(batch, heads, count, [&](Index b, Index h, Index i) {
    std::copy_n(next, head_dim, row_of(b, h, i));
    next += head_dim;
  });
}

/// The element (b, h, i, 0) of strided storage: the start of a row.
template <class T>
T* row_at(T* base, const Strides& strides, Index b, Index h, Index slot) {
  return base + b * strides.batch + h * strides.head + slot * strides.seq;
}

/// An exception message without its leading "kvcache: ", to quote it inside another.
inline std::string without_library_prefix(const std::string& what) {
  const std::string prefix = "kvcache: ";
  return what.compare(0, prefix.size(), prefix) == 0 ? what.substr(prefix.size()) : what;
}

/// "StaticKVCache<float, BHSD>::load": the owner named in a Reader's or Writer's messages.
template <class Cache>
std::string persistence_owner(const char* operation) {
  return describe(record_type_of<Cache>()) + "::" + operation;
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_PERSISTENCE_HPP
