// kvcache: the record of a QuantizedKVCache (docs/persistence_format.md, kind 4) - its
// RecordTraits, which quantized_cache.hpp derives from QuantizedRecord (a friend of the cache).
// The quantized blocks are written as stored, their bfloat16 zero points and scales in
// little-endian order; the unquantized tail as the rows of the cache's view. A version 1 record's
// blocks (key codes in token rows) are converted as they are read.
#ifndef KVCACHE_DETAIL_QUANTIZED_RECORD_HPP
#define KVCACHE_DETAIL_QUANTIZED_RECORD_HPP

#include <kvcache/detail/kv_storage.hpp>
#include <kvcache/detail/record_codec.hpp>
#include <kvcache/quantization.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache {
namespace detail {

/// The header of a quantized cache's record: CacheHeader (capacity is max_seq_len), then the
/// QuantConfig, quantized_size() and the tail ring's size.
struct QuantizedHeader : CacheHeader {
  Index group_size = 0;
  Index residual_length = 0;
  Index quantized_positions = 0;  ///< quantized_size(): positions [0, this) are blocks
  Index tail_slots = 0;           ///< slots of the unquantized tail ring
};

/// A block's bfloat16 zero points and scales (key zeros then scales, value zeros then scales:
/// 2 * head_dim numbers from each offset) from native byte order to little-endian, or back: the
/// same reordering either way (a swap of each number's two bytes on a big-endian host, the
/// identity on a little-endian one). The codes are bytes and need no conversion.
template <int Bits>
void reorder_scale_arrays_little_endian(std::uint8_t* block, const QuantBlockFormat<Bits>& format) {
  for (const Index offset : {format.key_zeros_offset(), format.value_zeros_offset()})
    for (Index j = 0; j < 2 * format.head_dim; ++j) {
      std::uint8_t* at = block + offset + 2 * j;
      std::uint16_t number;
      std::memcpy(&number, at, sizeof number);
      store_little_endian(at, number);
    }
}

/// Fails the load unless every bfloat16 zero point of the stored blocks is finite and every
/// scale finite and >= 0 (-0 included: a constant group quantized under a rounding mode other
/// than to-nearest gets it), as the quantizer makes them (quantization.hpp): a block with
/// another describes no state the cache can reach, and its attention would be NaN or wrong.
/// `blocks` holds `count` stored blocks of `stored_bytes`, whose key zeros start at
/// `key_zeros_at` (the parts from there on are laid out alike in every format version), their
/// numbers little-endian.
template <int Bits>
void require_valid_scales(const Reader& reader, const std::vector<std::uint8_t>& blocks,
                          Index count, Index stored_bytes, Index key_zeros_at,
                          const QuantBlockFormat<Bits>& format) {
  const Index d = format.head_dim, from = format.key_zeros_offset();
  struct Part {
    const char* name;
    Index offset;  // from the key zeros
    bool scale;
  };
  const Part parts[] = {{"key zero", 0, false},
                        {"key scale", format.key_scales_offset() - from, true},
                        {"value zero", format.value_zeros_offset() - from, false},
                        {"value scale", format.value_scales_offset() - from, true}};
  for (Index i = 0; i < count; ++i)
    for (const Part& part : parts) {
      const std::uint8_t* at = blocks.data() + i * stored_bytes + key_zeros_at + part.offset;
      for (Index j = 0; j < d; ++j) {
        const auto bits = static_cast<std::uint16_t>(at[2 * j] | at[2 * j + 1] << 8);
        const bool finite = (bits & 0x7F80u) != 0x7F80u;
        const bool negative = (bits & 0x8000u) != 0 && (bits & 0x7FFFu) != 0;
        if (finite && !(part.scale && negative)) continue;
        reader.fail("quantized block ", i, ": ", part.name, " ", j,
                    part.scale ? " must be finite and >= 0" : " must be finite", ", got ",
                    static_cast<float>(from_bits<Eigen::bfloat16>(bits)), " (bfloat16 ",
                    hex_digits(bits, 4), ")");
      }
    }
}

template <class Cache>
struct QuantizedRecord {
  using T = typename Cache::element_type;
  using Layout = typename Cache::layout_type;
  static constexpr int Bits = Cache::bits;
  static constexpr CacheKind kind = CacheKind::quantized_cache;
  using Header = QuantizedHeader;
  static constexpr auto fields = cache_fields<Header>(
      HeaderField<Header>{"group_size", &Header::group_size},
      HeaderField<Header>{"residual_length", &Header::residual_length},
      HeaderField<Header>{"quantized_positions", &Header::quantized_positions},
      HeaderField<Header>{"tail_slots", &Header::tail_slots});

  /// What a record holds after its header, as read.
  struct Payload {
    std::vector<std::uint8_t> blocks;  ///< (batch, heads, num_blocks) blocks, little-endian
    bool version_1 = false;            ///< blocks in format version 1, converted by build()
    KVRows<T> tail;
  };

  static Header header(const Cache& c) {
    Header h;
    static_cast<CacheHeader&>(h) = {c.batch_size_, c.num_heads_, c.head_dim_, c.max_seq_len_, c.position_};
    h.group_size = c.config_.group_size;
    h.residual_length = c.config_.residual_length;
    h.quantized_positions = c.quantized_positions(c.position_);
    h.tail_slots = c.ring_;
    return h;
  }

  static void write_payload(const Cache& c, const Header& h, Writer& writer) {
    const Index num_blocks = h.quantized_positions / h.group_size;
    std::vector<std::uint8_t> block(static_cast<std::size_t>(c.format_.block_bytes()));
    for (Index b = 0; b < h.batch_size; ++b)
      for (Index head = 0; head < h.num_heads; ++head)
        for (Index i = 0; i < num_blocks; ++i) {
          std::copy_n(c.block_at(b, head, i), block.size(), block.data());
          reorder_scale_arrays_little_endian(block.data(), c.format_);
          writer.write_bytes(block.data(), block.size(), "quantized blocks");
        }
    write_view_rows<Layout>(writer, c.attention_view(), "tail keys", "tail values");
  }

  static Payload read_payload(Reader& reader, const Header& h, const LoadLimits& limits) {
    if (h.capacity < 1) reader.fail("capacity: expected at least 1, got ", h.capacity);
    require_at_most(reader, "position", h.position, "capacity", h.capacity);
    const QuantConfig config = config_of(h);
    try {
      validate_quant_config<Bits>(config, h.head_dim);
    } catch (const std::invalid_argument& e) {
      reader.fail("invalid quantization config: ", without_library_prefix(e.what()));
    }
    require_equal(reader, "tail_slots", h.tail_slots,
                  std::max<Index>(1, std::min(unquantized_tail_capacity(config), h.capacity)),
                  "max(1, min(max(residual_length, group_size - 1), capacity))");
    const Index quantized = h.position - unquantized_tail_length(h.position, config);
    require_equal(reader, "quantized_positions", h.quantized_positions, quantized,
                  "position minus its unquantized tail");
    // The storage, every product checked: blocks of the whole capacity plus the tail ring.
    // Value codes: a row of head_dim codes per token, padded to even; key codes: 4 bytes per
    // channel quad and quad row (version 1: rows like the values').
    constexpr Index per_byte = QuantBlockFormat<Bits>::codes_per_byte;
    const Index code_bytes = checked_product(reader, "code bytes of a block",
                                             {h.group_size, h.head_dim / per_byte});
    const Index value_code_bytes = checked_sum(reader, "code bytes of a block", code_bytes, code_bytes % 2);
    const Index key_code_bytes = checked_product(
        reader, "key code bytes of a block", {(h.head_dim + 3) / 4, h.group_size / per_byte, 4});
    const Index scale_bytes = checked_product(reader, "scale bytes of a block", {8, h.head_dim});
    const Index block_bytes = checked_sum(reader, "block bytes",
                                          checked_sum(reader, "block bytes", key_code_bytes, value_code_bytes),
                                          scale_bytes);
    const Index max_blocks = (h.capacity - unquantized_tail_length(h.capacity, config)) / h.group_size;
    const Index blocks_bytes = checked_product(reader, "quantized block bytes",
                                               {h.batch_size, h.num_heads, max_blocks, block_bytes});
    const Index tail_bytes = checked_product(
        reader, "tail bytes", {2, h.batch_size, h.num_heads, h.tail_slots, h.head_dim, Index(sizeof(T))});
    require_within_limit(reader, checked_sum(reader, "K/V storage bytes", blocks_bytes, tail_bytes),
                         limits);
    // The payload is at most the storage just bounded: no product below can overflow. A
    // version 1 block is no larger than today's block_bytes (checked above): its key codes
    // take code_bytes(), today's channel quads at least as many.
    const QuantBlockFormat<Bits> format{h.group_size, h.head_dim};
    const bool version_1 = reader.format_version() == 1;
    const Index stored_block_bytes = version_1 ? version_1_block_bytes(format) : block_bytes;
    Payload payload;
    const Index num_blocks = h.batch_size * h.num_heads * (quantized / h.group_size);
    payload.blocks = reader.read_byte_array(static_cast<std::uint64_t>(num_blocks * stored_block_bytes),
                                            "quantized blocks");
    payload.version_1 = version_1;
    require_valid_scales(reader, payload.blocks, num_blocks, stored_block_bytes,
                         version_1 ? format.code_bytes() : format.key_zeros_offset(), format);
    payload.tail = read_kv_rows<T>(reader, {h.batch_size, h.num_heads, h.position - quantized, h.head_dim},
                                   "tail keys", "tail values");
    require_quantizable(reader, payload.tail.keys, "tail keys");
    require_quantizable(reader, payload.tail.values, "tail values");
    return payload;
  }

  static Cache build(const Header& h, Payload&& payload) {
    Cache cache(h.batch_size, h.capacity, h.num_heads, h.head_dim, config_of(h));
    const Index num_blocks = h.quantized_positions / h.group_size;
    const auto block_bytes = static_cast<std::size_t>(cache.format_.block_bytes());
    // A version 1 block is converted straight into its place (its key codes into channel
    // quads, quantization.hpp): no second copy of the blocks.
    const auto stored_bytes = payload.version_1
                                  ? static_cast<std::size_t>(version_1_block_bytes(cache.format_))
                                  : block_bytes;
    const std::uint8_t* next = payload.blocks.data();
    for (Index b = 0; b < h.batch_size; ++b)
      for (Index head = 0; head < h.num_heads; ++head)
        for (Index i = 0; i < num_blocks; ++i, next += stored_bytes) {
          std::uint8_t* block = cache.block_at(b, head, i);
          if (payload.version_1)
            block_from_version_1(next, cache.format_, block);
          else
            std::copy_n(next, block_bytes, block);
          reorder_scale_arrays_little_endian(block, cache.format_);
        }
    const Index tail_length = h.position - h.quantized_positions;
    for (const KVPart part : {KVPart::keys, KVPart::values})
      place_rows<Layout>(part == KVPart::keys ? payload.tail.keys : payload.tail.values, h.batch_size,
                         h.num_heads, tail_length, h.head_dim, [&](Index b, Index head, Index i) {
                           return cache.tail_.row(part, b, head, cache.slot(h.quantized_positions + i));
                         });
    cache.position_ = h.position;
    return cache;
  }

 private:
  /// Fails the load unless every element of the unquantized tail is what update() accepts:
  /// finite, and for double within the bfloat16 range. Later updates quantize the tail's
  /// positions; a NaN or an infinity would become a block whose attention is NaN, and which
  /// load() itself refuses once saved.
  static void require_quantizable(const Reader& reader, const std::vector<T>& rows, const char* name) {
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (quantizable_value(rows[i])) continue;
      reader.fail(name, ": element ", i, " is ", static_cast<double>(rows[i]), ": expected a finite value",
                  std::is_same_v<T, double> ? " of magnitude <= 3.3895e38" : "",
                  " (QuantizedKVCache::update stores no other)");
    }
  }

  static QuantConfig config_of(const Header& h) {
    QuantConfig config;
    config.group_size = h.group_size;
    config.residual_length = h.residual_length;
    return config;
  }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_QUANTIZED_RECORD_HPP
