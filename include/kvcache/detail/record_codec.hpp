// kvcache: the record codec - the parts every kind's save() and load() share: the header, the
// K/V rows of a kind's positions in the layout's order, the checks of a record's numbers
// against the memory limit, the checksum. A kind adds only its own state (RecordTraits, next
// to the kind): save_record and load_record run the same steps for every kind.
#ifndef KVCACHE_DETAIL_RECORD_CODEC_HPP
#define KVCACHE_DETAIL_RECORD_CODEC_HPP

#include <kvcache/detail/kv_view.hpp>
#include <kvcache/detail/record_header.hpp>
#include <kvcache/detail/serialization.hpp>
#include <kvcache/layout.hpp>
#include <kvcache/persistence.hpp>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <istream>
#include <limits>
#include <ostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache {
namespace detail {

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

/// Writes the keys, then the values, of a view's T segments in held order (the positions a
/// kind keeps in T: all of a contiguous or frozen cache's, a sliding window's sinks and ring,
/// a quantized cache's tail), each as one (batch, heads, n, head_dim) tensor in Layout order.
template <class Layout, class T>
void write_view_rows(Writer& writer, const KVView<T>& view, const char* keys_name = "keys",
                     const char* values_name = "values") {
  std::vector<std::pair<const KVSegment<T>*, Index>> held;  // held row i: (segment, offset)
  for (int s = 0; s < view.num_segments; ++s) {
    const KVSegment<T>& segment = view.segments[static_cast<std::size_t>(s)];
    for (Index i = 0; i < segment.length; ++i) held.emplace_back(&segment, i);
  }
  const auto n = static_cast<Index>(held.size());
  for (const bool keys : {true, false})
    write_rows<Layout>(
        writer, view.batch_size, view.num_heads, n, view.head_dim,
        [&](Index b, Index h, Index i) {
          const auto& [segment, offset] = held[static_cast<std::size_t>(i)];
          return row_at(keys ? segment->keys : segment->values, segment->strides, b, h, offset);
        },
        keys ? keys_name : values_name);
}

/// The keys and values of a record's T rows as read, each a (batch, heads, n, head_dim) tensor
/// in the layout's order.
template <class T>
struct KVRows {
  std::vector<T> keys;
  std::vector<T> values;
};

/// Reads what write_view_rows wrote for `shape` (seq: n). The caller has bounded the storage
/// the shape needs, so its element count cannot overflow.
template <class T>
KVRows<T> read_kv_rows(Reader& reader, const Shape& shape, const char* keys_name = "keys",
                       const char* values_name = "values") {
  const auto count = static_cast<std::uint64_t>(shape.batch * shape.heads * shape.seq * shape.head_dim);
  KVRows<T> rows;
  rows.keys = reader.read_elements<T>(count, keys_name);
  rows.values = reader.read_elements<T>(count, values_name);
  return rows;
}

/// The K/V rows of a record of one cache's positions (CacheHeader): bounds the storage the
/// cache will own, 2 x batch x heads x `slots` x head_dim elements of T, by `limits`, then
/// reads the keys and values of its `rows` held positions (write_view_rows).
template <class T>
KVRows<T> read_cache_rows(Reader& reader, const CacheHeader& h, Index slots, Index rows,
                          const LoadLimits& limits) {
  require_within_limit(reader,
                       checked_product(reader, "K/V storage bytes",
                                       {2, h.batch_size, h.num_heads, slots, h.head_dim, Index(sizeof(T))}),
                       limits);
  // At most the storage just bounded (rows <= slots): cannot overflow.
  return read_kv_rows<T>(reader, {h.batch_size, h.num_heads, rows, h.head_dim});
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

/// A cache's record: the header (RecordTraits::header), the payload (write_payload), the
/// checksum. Throws std::ios_base::failure when the stream fails (the stream may then hold a
/// partial record).
template <class Cache>
void save_record(const Cache& cache, std::ostream& out) {
  using Record = RecordTraits<Cache>;
  Writer writer(out, persistence_owner<Cache>("save"));
  const typename Record::Header header = Record::header(cache);
  write_record_header<Cache>(writer, header);
  Record::write_payload(cache, header, writer);
  write_record_checksum(writer);
  writer.finish();
}

/// Reads a record written by save_record: the header (checked), the payload (checked against
/// the header and `limits`, read into memory that grows as the bytes arrive), the checksum;
/// only then does RecordTraits::build allocate the cache. Throws FormatError naming the
/// expected and the received value; the stream is left right after the record.
template <class Cache>
Cache load_record(std::istream& in, const LoadLimits& limits) {
  using Record = RecordTraits<Cache>;
  Reader reader(in, persistence_owner<Cache>("load"));
  const typename Record::Header header = read_record_header<Cache>(reader);
  auto payload = Record::read_payload(reader, header, limits);
  read_record_checksum(reader);
  return Record::build(header, std::move(payload));
}

/// save() and load() of a cache kind (docs/persistence_format.md), from its RecordTraits: every
/// kind that derives from Persistent<Kind> and specialises RecordTraits<Kind> has them.
template <class Cache>
class Persistent {
 public:
  /// \brief Writes the cache to `out`: a header (the kind, element type and layout, the shape
  /// and the kind's state), every position it holds, a CRC-32C. Throws std::ios_base::failure
  /// when the stream fails (the stream may then hold a partial record).
  void save(std::ostream& out) const { save_record(static_cast<const Cache&>(*this), out); }

  /// \brief Reads a cache written by save(), bit for bit, so further calls behave exactly as
  /// on the original. Throws kvcache::FormatError (naming the expected and the received
  /// value) when the stream does not hold an intact record of this type or fails; the stream
  /// is left right after the record.
  static Cache load(std::istream& in) { return load_record<Cache>(in, LoadLimits{}); }
  /// \brief load() with a bound on the memory the loaded cache may own (see LoadLimits).
  static Cache load(std::istream& in, const LoadLimits& limits) { return load_record<Cache>(in, limits); }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_RECORD_CODEC_HPP
