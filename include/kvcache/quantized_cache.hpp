// kvcache: QuantizedKVCache - int8/int4 keys and values (KIVI), a full-precision tail of the
// most recent positions, and attention that reads the integer codes in place.
#ifndef KVCACHE_QUANTIZED_CACHE_HPP
#define KVCACHE_QUANTIZED_CACHE_HPP

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <istream>
#include <kvcache/detail/kv_storage.hpp>
#include <kvcache/persistence.hpp>
#include <kvcache/quantization.hpp>
#include <new>
#include <ostream>
#include <stdexcept>
#include <type_traits>
#include <vector>

namespace kvcache {
namespace detail {

/// A std::allocator for bytes on 64-byte boundaries: block i of a head starts at
/// i * block_bytes, and with head_dim a multiple of 32 and group_size 32 every part of every
/// block then starts on a cache line (quantization.hpp), ready for vector loads.
template <class U>
struct CacheLineAllocator {
  using value_type = U;
  static constexpr std::size_t alignment = 64;
  CacheLineAllocator() = default;
  template <class V>
  CacheLineAllocator(const CacheLineAllocator<V>&) noexcept {}
  U* allocate(std::size_t n) {
    return static_cast<U*>(::operator new(n * sizeof(U), std::align_val_t(alignment)));
  }
  void deallocate(U* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(alignment)); }
  template <class V>
  bool operator==(const CacheLineAllocator<V>&) const noexcept {
    return true;
  }
  template <class V>
  bool operator!=(const CacheLineAllocator<V>&) const noexcept {
    return false;
  }
};

}  // namespace detail

/// \brief A cache that stores keys and values as Bits-bit integer codes with a bfloat16 zero
/// point and scale per group (KIVI, Liu et al. 2024), the most recent positions in T.
///
/// \tparam T      float, double, Eigen::half or Eigen::bfloat16: the element type of every
///                tensor the cache takes or returns, and of the unquantized tail
/// \tparam Bits   8 or 4 (anything else is a compile-time error)
/// \tparam Layout BHSD (default) or BSHD: the layout of the tail and of every tensor the cache
///                takes or returns (the quantized blocks have their own layout, below)
///
/// Scheme (quantization.hpp): keys per channel over blocks of group_size consecutive tokens
/// (robust to the few large-magnitude channels real keys have), values per token over groups
/// of group_size channels. Positions [0, Q) are quantized, in whole blocks of group_size
/// tokens; positions [Q, size()) - the unquantized tail, Q = size() -
/// detail::unquantized_tail_length(size(), config) - are held in T, exactly as given. The
/// policy (quantization.hpp) is "after each update, quantize the oldest whole blocks while the
/// tail exceeds C = max(residual_length, group_size - 1) positions", as the Hugging Face
/// QuantizedCache does with its residual: the tail holds between C - group_size + 1 and C
/// positions once size() > C (e.g. 1 to 32 with the default group_size 32, residual_length
/// 32), all of them while size() <= C.
///
/// Quantization is incremental: after each update the oldest whole blocks leave the tail and
/// are quantized once, never again. The state depends on size() alone, not on how the tokens
/// were chunked: one update of N tokens and N updates of one token give the same bytes.
///
/// Storage, all allocated by the constructor for max_seq_len positions:
///  * blocks: (batch_size, num_heads, max_blocks) quantized blocks of
///    detail::quantized_block_bytes<Bits>(group_size, head_dim) bytes, in that order (one head's
///    blocks are contiguous, so attention streams them), 64-byte aligned; max_blocks is the
///    number of whole blocks quantized at max_seq_len positions;
///  * tail: (batch_size, num_heads, R, head_dim) keys and values of T in Layout, a ring of
///    R = min(unquantized_tail_capacity(config), max_seq_len) slots (at least 1): position p
///    sits at slot p % R. Moving positions from the tail into blocks never shifts the tail.
///
/// attend() reads both in place: the kernel dequantizes the codes a few at a time in registers
/// (the key scales folded into the query, the value scales into the probabilities) and never
/// builds a dequantized copy of the cache.
///
/// An update with fewer batch rows than batch_size() writes rows [0, b) and sets the other
/// rows to zero at the new positions (zeros quantize exactly).
///
/// crop(n) is lossless when it keeps every quantized block whole. When it cuts into the
/// quantized blocks, the surviving positions of the cut blocks move back into the tail as
/// their dequantized values (which is what keys()/values() and attend() saw of them before):
/// lossy with respect to the original inputs, and when those positions later leave the tail
/// again they are quantized a second time.
template <class T, int Bits, class Layout = BHSD>
class QuantizedKVCache {
  static_assert((detail::check_cache_parameters<T, Layout>(), true));
  static_assert(Bits == 8 || Bits == 4,
                "kvcache: QuantizedKVCache Bits must be 8 (int8) or 4 (int4)");

 public:
  using element_type = T;
  using layout_type = Layout;
  static constexpr int bits = Bits;
  /// Its views hold quantized blocks (cache_concept.hpp, holds_quantized_blocks).
  static constexpr bool quantized_blocks = true;

  /// \param batch_size, max_seq_len, num_heads, head_dim  positive, else std::invalid_argument
  /// \param config group_size (divides head_dim; even for int4) and residual_length (in
  ///               [0, 64]), else std::invalid_argument (see validate_quant_config)
  QuantizedKVCache(Index batch_size, Index max_seq_len, Index num_heads, Index head_dim,
                   QuantConfig config = {})
      : config_(checked_config(batch_size, max_seq_len, num_heads, head_dim, config)),
        batch_size_(batch_size),
        max_seq_len_(max_seq_len),
        num_heads_(num_heads),
        head_dim_(head_dim),
        format_{config.group_size, head_dim},
        max_blocks_(quantized_positions(max_seq_len) / config.group_size),
        ring_(std::max<Index>(1, std::min(detail::unquantized_tail_capacity(config), max_seq_len))),
        blocks_(static_cast<std::size_t>(detail::checked_element_count(
            "QuantizedKVCache", {batch_size, num_heads, max_blocks_, format_.block_bytes()}, 1))),
        tail_keys_(Layout::dims({batch_size, num_heads, ring_, head_dim})),
        tail_values_(Layout::dims({batch_size, num_heads, ring_, head_dim})) {}

  /// \brief Appends k, v of shape (b <= batch_size(), num_heads(), new_len, head_dim()) at
  /// position(), quantizing the blocks that leave the tail. Accepts Tensor4<T> and
  /// Eigen::TensorMap of one.
  ///
  /// Throws std::invalid_argument for a shape that does not fit (checked first), for a NaN or
  /// infinite element of k or v (naming it; a quantized cache stores finite values only), and
  /// for a finite double beyond 3.3895e38 (bfloat16 scales); std::length_error past capacity();
  /// in every case the cache is unchanged.
  template <class K, class V>
  void update(const K& k, const V& v) {
    // Named references, not structured bindings: the lambdas below capture them, which C++17
    // does not allow for structured bindings (clang rejects it).
    const detail::CheckedUpdate<T> input = detail::check_update<T, Layout>(
        "QuantizedKVCache::update", k, v, batch_size_, num_heads_, head_dim_);
    const detail::ConstView4<T>& k_view = input.k;
    const detail::ConstView4<T>& v_view = input.v;
    const Shape& in = input.shape;
    if (in.seq == 0) return;
    if (in.seq > max_seq_len_ - position_)  // not position_ + in.seq: it may overflow
      detail::throw_length_error("QuantizedKVCache::update: appending ", in.seq,
                                 " positions at position ", position_, " exceeds the capacity of ",
                                 max_seq_len_, " (max_seq_len)");
    require_storable("k", k_view, in);
    require_storable("v", v_view, in);
    // The only allocations; nothing is modified before they succeed.
    std::vector<T> key_rows(static_cast<std::size_t>(config_.group_size * head_dim_));
    const std::vector<T> zero_row(static_cast<std::size_t>(head_dim_), T(0));

    const Index old_size = position_, new_size = position_ + in.seq;
    const Index old_quantized = quantized_positions(old_size);
    const Index new_quantized = quantized_positions(new_size);
    const Strides in_strides = Layout::strides(in);
    const Strides tail_strides = tail_strides_();
    // Row (b, h) of absolute position p: the tail for p < old_size, else the input (zeros for
    // batch rows the input does not have).
    auto source = [&](bool keys, Index b, Index h, Index p) -> const T* {
      if (p < old_size)
        return (keys ? tail_keys_.data() : tail_values_.data()) + b * tail_strides.batch +
               h * tail_strides.head + slot(p) * tail_strides.seq;
      if (b >= in.batch) return zero_row.data();
      return (keys ? k_view.data : v_view.data) + b * in_strides.batch + h * in_strides.head +
             (p - old_size) * in_strides.seq;
    };

    // 1. Quantize the blocks that leave the tail, positions [old_quantized, new_quantized).
    //    They read tail slots the new positions may overwrite, so they go first.
    for (Index b = 0; b < batch_size_; ++b)
      for (Index h = 0; h < num_heads_; ++h)
        for (Index first = old_quantized; first < new_quantized; first += config_.group_size) {
          std::uint8_t* block = block_at(b, h, first / config_.group_size);
          for (Index t = 0; t < config_.group_size; ++t) {
            std::copy_n(source(true, b, h, first + t), head_dim_, key_rows.data() + t * head_dim_);
            detail::quantize_value_row<Bits>(source(false, b, h, first + t), t, format_, block);
          }
          detail::quantize_key_block<Bits>(key_rows.data(), head_dim_, format_, block);
        }

    // 2. The new positions that stay unquantized go to their tail slots. A slot written here
    //    held position p - ring_ < new_size - ring_ <= new_quantized: quantized by now.
    for (Index p = std::max(old_size, new_quantized); p < new_size; ++p)
      for (Index b = 0; b < batch_size_; ++b)
        for (Index h = 0; h < num_heads_; ++h) {
          const Index at =
              b * tail_strides.batch + h * tail_strides.head + slot(p) * tail_strides.seq;
          std::copy_n(source(true, b, h, p), head_dim_, tail_keys_.data() + at);
          std::copy_n(source(false, b, h, p), head_dim_, tail_values_.data() + at);
        }
    position_ = new_size;
  }

  /// \brief Positions held for the next query; equal to position().
  Index size() const { return position_; }
  /// \brief Tokens appended since construction or reset(): the absolute position of the next.
  Index position() const { return position_; }
  /// \brief max_seq_len: the positions the preallocated storage holds.
  Index capacity() const { return max_seq_len_; }
  Index batch_size() const { return batch_size_; }
  Index num_heads() const { return num_heads_; }
  Index head_dim() const { return head_dim_; }
  const QuantConfig& config() const { return config_; }

  /// \brief Positions [0, quantized_size()) are held as quantized blocks, the rest in T.
  Index quantized_size() const { return quantized_positions(position_); }

  /// \brief The size() held keys, oldest first: (batch, heads, size(), head_dim) in Layout;
  /// the quantized positions dequantized (detail::dequantize_key_row), the tail as stored.
  Tensor4<T> keys() const {
    return detail::gather_held<Layout>(attention_view(), detail::KVPart::keys);
  }
  /// \brief The size() held values, like keys() (detail::dequantize_value_row).
  Tensor4<T> values() const {
    return detail::gather_held<Layout>(attention_view(), detail::KVPart::values);
  }

  /// \brief Forgets every position; the storage (and capacity()) is kept.
  void reset() noexcept { position_ = 0; }

  /// \brief Keeps the first n positions (speculative-decoding rollback).
  ///
  /// Whole quantized blocks below quantized_size() after the crop are kept as they are. When n
  /// cuts into the quantized blocks, the positions of the cut blocks that survive and belong to
  /// the new tail are dequantized back into it: lossy (see the class comment), but keys(),
  /// values() and attend() show the same numbers for them as before the crop.
  /// Requires: 0 <= n <= size(), else std::invalid_argument and nothing changes.
  void crop(Index n) {
    if (n < 0 || n > position_)
      detail::throw_invalid_argument("QuantizedKVCache::crop: n must be in [0, size()] = [0, ",
                                     position_, "], got ", n);
    const Index old_quantized = quantized_positions(position_);
    const Index new_quantized = quantized_positions(n);  // <= old_quantized
    const Strides tail_strides = tail_strides_();
    // Positions [new_quantized, min(n, old_quantized)) return to the tail. With the positions
    // [old_quantized, n) already there they are the new tail, n - new_quantized <= ring_
    // positions, so their slots are distinct.
    for (Index p = new_quantized; p < std::min(n, old_quantized); ++p) {
      const Index block_idx = p / config_.group_size, token = p % config_.group_size;
      for (Index b = 0; b < batch_size_; ++b)
        for (Index h = 0; h < num_heads_; ++h) {
          const std::uint8_t* block = block_at(b, h, block_idx);
          const Index at =
              b * tail_strides.batch + h * tail_strides.head + slot(p) * tail_strides.seq;
          detail::dequantize_key_row<Bits>(block, token, format_, tail_keys_.data() + at);
          detail::dequantize_value_row<Bits>(block, token, format_, tail_values_.data() + at);
        }
    }
    position_ = n;
  }

  /// \brief Bytes of K/V storage this object owns, all allocated by the constructor: the
  /// quantized blocks (batch * heads * max_blocks * block bytes) plus the T tail ring.
  std::size_t memory_bytes() const {
    return blocks_.size() + 2 * static_cast<std::size_t>(tail_keys_.size()) * sizeof(T);
  }

  /// \brief The kernel's view: the quantized blocks, then the tail (up to two runs of the
  /// ring). Valid until the cache is next modified.
  detail::KVView<T> attention_view() const {
    detail::KVView<T> view;
    view.batch_size = batch_size_;
    view.num_heads = num_heads_;
    view.head_dim = head_dim_;
    view.position = position_;
    const Index quantized = quantized_positions(position_);
    detail::QuantSegment blocks;
    blocks.blocks = blocks_.data();
    blocks.bytes_per_block = format_.block_bytes();
    blocks.head_stride = max_blocks_ * format_.block_bytes();
    blocks.batch_stride = num_heads_ * blocks.head_stride;
    blocks.first_position = 0;
    blocks.num_blocks = quantized / config_.group_size;
    blocks.group_size = config_.group_size;
    blocks.bits = Bits;
    view.add_quantized(blocks);
    for_each_tail_run(quantized, position_, [&](Index first_slot, Index length, Index p) {
      const Strides s = tail_strides_();
      view.add({tail_keys_.data() + first_slot * s.seq, tail_values_.data() + first_slot * s.seq, s,
                p, length});
    });
    return view;
  }

  /// \brief Writes the cache to `out` (docs/persistence_format.md): shape, max_seq_len,
  /// position, Bits, the QuantConfig, quantized_size() and the tail ring's size; then the
  /// quantized blocks as stored (codes, bfloat16 zero points and scales) and the unquantized
  /// tail in T, with a CRC-32C. Throws std::ios_base::failure when the stream fails (the stream
  /// may then hold a partial record).
  void save(std::ostream& out) const {
    detail::Writer writer(out, detail::persistence_owner<QuantizedKVCache>("save"));
    detail::RecordHeader header;
    header.type = detail::record_type_of<QuantizedKVCache>();
    header.batch_size = batch_size_;
    header.num_heads = num_heads_;
    header.head_dim = head_dim_;
    header.capacity = max_seq_len_;
    header.position = position_;
    header.group_size = config_.group_size;
    header.residual_length = config_.residual_length;
    header.quantized_positions = quantized_positions(position_);
    header.tail_slots = ring_;
    detail::write_record_header(writer, header);
    const Index num_blocks = header.quantized_positions / config_.group_size;
    std::vector<std::uint8_t> block_bytes(static_cast<std::size_t>(format_.block_bytes()));
    for (Index b = 0; b < batch_size_; ++b)
      for (Index h = 0; h < num_heads_; ++h)
        for (Index i = 0; i < num_blocks; ++i) {
          std::copy_n(block_at(b, h, i), block_bytes.size(), block_bytes.data());
          scale_arrays_to_little_endian(block_bytes.data());
          writer.write_bytes(block_bytes.data(), block_bytes.size(), "quantized blocks");
        }
    const Index tail_length = position_ - header.quantized_positions;
    const Strides ts = tail_strides_();
    for (const bool keys : {true, false})
      detail::write_rows<Layout>(
          writer, batch_size_, num_heads_, tail_length, head_dim_,
          [&](Index b, Index h, Index i) {
            return detail::row_at(keys ? tail_keys_.data() : tail_values_.data(), ts, b, h,
                                  slot(header.quantized_positions + i));
          },
          keys ? "tail keys" : "tail values");
    detail::write_record_checksum(writer);
    writer.finish();
  }

  /// \brief Reads a cache written by save(): the same max_seq_len, config, position, quantized
  /// blocks and tail, bit for bit, so further update(), crop() and attend() calls behave
  /// exactly as on the original. Throws kvcache::FormatError (naming the expected and the
  /// received value) when the stream does not hold an intact QuantizedKVCache<T, Bits, Layout>
  /// record or fails; the stream is left right after the record.
  static QuantizedKVCache load(std::istream& in) { return load(in, LoadLimits{}); }
  /// \brief load() with a bound on the memory the loaded cache may own (see LoadLimits).
  static QuantizedKVCache load(std::istream& in, const LoadLimits& limits) {
    detail::Reader reader(in, detail::persistence_owner<QuantizedKVCache>("load"));
    const detail::RecordHeader h =
        detail::read_record_header(reader, detail::record_type_of<QuantizedKVCache>());
    if (h.capacity < 1) reader.fail("capacity: expected at least 1, got ", h.capacity);
    detail::require_at_most(reader, "position", h.position, "capacity", h.capacity);
    QuantConfig config;
    config.group_size = h.group_size;
    config.residual_length = h.residual_length;
    try {
      validate_quant_config<Bits>(config, h.head_dim);
    } catch (const std::invalid_argument& e) {
      reader.fail("invalid quantization config: ", detail::without_library_prefix(e.what()));
    }
    const Index tail_capacity = detail::unquantized_tail_capacity(config);
    detail::require_equal(reader, "tail_slots", h.tail_slots,
                          std::max<Index>(1, std::min(tail_capacity, h.capacity)),
                          "max(1, min(max(residual_length, group_size - 1), capacity))");
    const Index quantized = h.position - detail::unquantized_tail_length(h.position, config);
    detail::require_equal(reader, "quantized_positions", h.quantized_positions, quantized,
                          "position minus its unquantized tail");
    // The storage, every product checked: blocks of the whole capacity plus the tail ring.
    const Index code_bytes = detail::checked_product(
        reader, "code bytes of a block",
        {h.group_size, h.head_dim / detail::QuantBlockFormat<Bits>::codes_per_byte});
    const Index block_bytes = detail::checked_sum(
        reader, "block bytes",
        detail::checked_product(
            reader, "code bytes of a block",
            {2, detail::checked_sum(reader, "code bytes of a block", code_bytes, code_bytes % 2)}),
        detail::checked_product(reader, "scale bytes of a block", {8, h.head_dim}));
    const Index max_blocks =
        (h.capacity - detail::unquantized_tail_length(h.capacity, config)) / h.group_size;
    const Index blocks_bytes = detail::checked_product(
        reader, "quantized block bytes", {h.batch_size, h.num_heads, max_blocks, block_bytes});
    const Index tail_bytes =
        detail::checked_product(reader, "tail bytes", {2, h.batch_size, h.num_heads, h.tail_slots,
                                                       h.head_dim, Index(sizeof(T))});
    detail::require_within_limit(
        reader, detail::checked_sum(reader, "K/V storage bytes", blocks_bytes, tail_bytes), limits);
    // The payload is at most the storage just bounded: no product below can overflow.
    const Index num_blocks = quantized / h.group_size;
    const std::vector<std::uint8_t> blocks = reader.read_byte_array(
        static_cast<std::uint64_t>(h.batch_size * h.num_heads * num_blocks * block_bytes),
        "quantized blocks");
    const Index tail_length = h.position - quantized;
    const auto tail_count =
        static_cast<std::uint64_t>(h.batch_size * h.num_heads * tail_length * h.head_dim);
    const std::vector<T> tail_keys = reader.read_elements<T>(tail_count, "tail keys");
    const std::vector<T> tail_values = reader.read_elements<T>(tail_count, "tail values");
    detail::read_record_checksum(reader);

    QuantizedKVCache cache(h.batch_size, h.capacity, h.num_heads, h.head_dim, config);
    const std::uint8_t* next_block = blocks.data();
    for (Index b = 0; b < h.batch_size; ++b)
      for (Index head = 0; head < h.num_heads; ++head)
        for (Index i = 0; i < num_blocks; ++i) {
          std::uint8_t* block = cache.block_at(b, head, i);
          std::copy_n(next_block, block_bytes, block);
          cache.scale_arrays_from_little_endian(block);
          next_block += block_bytes;
        }
    const Strides ts = cache.tail_strides_();
    detail::place_rows<Layout>(tail_keys, h.batch_size, h.num_heads, tail_length, h.head_dim,
                               [&](Index b, Index head, Index i) {
                                 return detail::row_at(cache.tail_keys_.data(), ts, b, head,
                                                       cache.slot(quantized + i));
                               });
    detail::place_rows<Layout>(tail_values, h.batch_size, h.num_heads, tail_length, h.head_dim,
                               [&](Index b, Index head, Index i) {
                                 return detail::row_at(cache.tail_values_.data(), ts, b, head,
                                                       cache.slot(quantized + i));
                               });
    cache.position_ = h.position;
    return cache;
  }

 private:
  /// Refuses what a group's bfloat16 zero point and scale cannot hold, before update() changes
  /// anything (std::invalid_argument naming the element): NaN and +-infinity (one would
  /// corrupt the zero point and scale its whole group shares, and an attention over it would
  /// silently see finite values), and for double a finite value beyond kBfloat16Max
  /// (3.3895e38), which could not be stored without a large error.
  void require_storable(const char* name, const detail::ConstView4<T>& input,
                        const Shape& in) const {
    const Strides strides = Layout::strides(in);
    for (Index b = 0; b < in.batch; ++b)
      for (Index h = 0; h < in.heads; ++h)
        for (Index i = 0; i < in.seq; ++i) {
          const T* row = input.data + b * strides.batch + h * strides.head + i * strides.seq;
          for (Index c = 0; c < in.head_dim; ++c) {
            const T x = row[c];
            if (!(Eigen::numext::isfinite)(x))
              detail::throw_invalid_argument(
                  "QuantizedKVCache::update: ", name, " at (batch ", b, ", head ", h,
                  ", new position ", i, ", channel ", c, ") is ", static_cast<double>(x),
                  ": expected a finite value (a quantized cache stores finite values only: a "
                  "group shares one zero point and one scale, which a NaN or an infinity would "
                  "corrupt; keep such values in a StaticKVCache or DynamicKVCache); the cache "
                  "is unchanged");
            if constexpr (std::is_same_v<T, double>)
              if (std::abs(x) > static_cast<T>(detail::kBfloat16Max))
                detail::throw_invalid_argument(
                    "QuantizedKVCache<double>::update: ", name, " at (batch ", b, ", head ", h,
                    ", new position ", i, ", channel ", c, ") = ", x,
                    " exceeds the magnitude its bfloat16 zero point and scale can represent: "
                    "expected |x| <= ", detail::kBfloat16Max,
                    " (keep such values in a StaticKVCache<double> or DynamicKVCache<double>)");
          }
        }
  }

  /// A block's bfloat16 zero points and scales (native byte order in memory) as little-endian
  /// in a saved record, and back; the codes are bytes and need no conversion. Both are the
  /// identity on little-endian hosts.
  void scale_arrays_to_little_endian(std::uint8_t* block) const {
    for (const Index offset : {format_.key_zeros_offset(), format_.value_zeros_offset()})
      for (Index j = 0; j < 2 * head_dim_; ++j) {  // zeros then scales: 2 * head_dim numbers
        std::uint8_t* at = block + offset + 2 * j;
        std::uint16_t number;
        std::memcpy(&number, at, sizeof number);
        detail::store_little_endian(at, number);
      }
  }
  void scale_arrays_from_little_endian(std::uint8_t* block) const {
    for (const Index offset : {format_.key_zeros_offset(), format_.value_zeros_offset()})
      for (Index j = 0; j < 2 * head_dim_; ++j) {
        std::uint8_t* at = block + offset + 2 * j;
        const auto number = detail::load_little_endian<std::uint16_t>(at);
        std::memcpy(at, &number, sizeof number);
      }
  }

  static QuantConfig checked_config(Index batch_size, Index max_seq_len, Index num_heads,
                                    Index head_dim, const QuantConfig& config) {
    const char* kind = "QuantizedKVCache";
    detail::require_positive(kind, "batch_size", batch_size);
    detail::require_positive(kind, "max_seq_len", max_seq_len);
    detail::require_positive(kind, "num_heads", num_heads);
    detail::require_positive(kind, "head_dim", head_dim);
    validate_quant_config<Bits>(config, head_dim);
    return config;
  }

  /// Positions held as quantized blocks when the cache holds `size` positions (the policy of
  /// detail::unquantized_tail_length; a multiple of group_size, non-decreasing in size).
  Index quantized_positions(Index size) const {
    return size - detail::unquantized_tail_length(size, config_);
  }

  Index slot(Index p) const { return p % ring_; }
  Strides tail_strides_() const {
    return Layout::strides({batch_size_, num_heads_, ring_, head_dim_});
  }

  std::uint8_t* block_at(Index b, Index h, Index block_idx) {
    return blocks_.data() +
           ((b * num_heads_ + h) * max_blocks_ + block_idx) * format_.block_bytes();
  }
  const std::uint8_t* block_at(Index b, Index h, Index block_idx) const {
    return blocks_.data() +
           ((b * num_heads_ + h) * max_blocks_ + block_idx) * format_.block_bytes();
  }

  /// Calls f(first_slot, length, first_position) for the runs of consecutive ring slots that
  /// hold positions [first, last) (at most two: the ring wraps once as last - first <= ring_).
  template <class F>
  void for_each_tail_run(Index first, Index last, F&& f) const {
    detail::for_each_ring_run(first, last, 0, ring_, f);
  }

  QuantConfig config_;
  Index batch_size_;
  Index max_seq_len_;
  Index num_heads_;
  Index head_dim_;
  detail::QuantBlockFormat<Bits> format_;
  Index max_blocks_;  ///< blocks per (batch row, head) at max_seq_len positions
  Index ring_;        ///< tail slots
  std::vector<std::uint8_t, detail::CacheLineAllocator<std::uint8_t>> blocks_;
  Tensor4<T> tail_keys_;
  Tensor4<T> tail_values_;
  Index position_ = 0;
};

namespace detail {
template <class T, int Bits, class Layout>
struct record_kind<QuantizedKVCache<T, Bits, Layout>>
    : std::integral_constant<CacheKind, CacheKind::quantized_cache> {};
}  // namespace detail

/// \brief QuantizedKVCache with 8-bit codes.
template <class T, class Layout = BHSD>
using Int8KVCache = QuantizedKVCache<T, 8, Layout>;

/// \brief QuantizedKVCache with 4-bit codes (two per byte).
template <class T, class Layout = BHSD>
using Int4KVCache = QuantizedKVCache<T, 4, Layout>;

}  // namespace kvcache

#endif  // KVCACHE_QUANTIZED_CACHE_HPP
