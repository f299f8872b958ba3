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
#include <kvcache/detail/quantized_record.hpp>
#include <kvcache/detail/quantizer.hpp>
#include <ostream>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache {
namespace detail {

/// `count` bytes, all zero, in a KVBuffer (64-byte aligned, huge pages from 32 MiB): block i of
/// a head starts at i * block_bytes, and with head_dim a multiple of 32 and group_size 32 every
/// part of every block then starts on a cache line (quantization.hpp), ready for vector loads.
inline KVBuffer<std::uint8_t> zeroed_bytes(std::size_t count) {
  KVBuffer<std::uint8_t> bytes(count);
  if (count > 0) std::memset(bytes.data(), 0, count);
  return bytes;
}

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
class QuantizedKVCache : public detail::Persistent<QuantizedKVCache<T, Bits, Layout>> {
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
        blocks_(detail::zeroed_bytes(static_cast<std::size_t>(detail::checked_element_count(
            "QuantizedKVCache", {batch_size, num_heads, max_blocks_, format_.block_bytes()}, 1)))),
        tail_(batch_size, num_heads, ring_, head_dim) {}

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
    // Row (b, h) of absolute position p: the tail for p < old_size, else the input (zeros for
    // batch rows the input does not have).
    auto source = [&](bool keys, Index b, Index h, Index p) -> const T* {
      if (p < old_size)
        return std::as_const(tail_).row(keys ? detail::KVPart::keys : detail::KVPart::values, b, h, slot(p));
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
          std::copy_n(source(true, b, h, p), head_dim_, tail_.row(detail::KVPart::keys, b, h, slot(p)));
          std::copy_n(source(false, b, h, p), head_dim_, tail_.row(detail::KVPart::values, b, h, slot(p)));
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
    // Positions [new_quantized, min(n, old_quantized)) return to the tail. With the positions
    // [old_quantized, n) already there they are the new tail, n - new_quantized <= ring_
    // positions, so their slots are distinct.
    for (Index p = new_quantized; p < std::min(n, old_quantized); ++p) {
      const Index block_idx = p / config_.group_size, token = p % config_.group_size;
      for (Index b = 0; b < batch_size_; ++b)
        for (Index h = 0; h < num_heads_; ++h) {
          const std::uint8_t* block = block_at(b, h, block_idx);
          detail::dequantize_key_row<Bits>(block, token, format_, tail_.row(detail::KVPart::keys, b, h, slot(p)));
          detail::dequantize_value_row<Bits>(block, token, format_, tail_.row(detail::KVPart::values, b, h, slot(p)));
        }
    }
    position_ = n;
  }

  /// \brief Bytes of K/V storage this object owns, all allocated by the constructor: the
  /// quantized blocks (batch * heads * max_blocks * block bytes) plus the T tail ring.
  std::size_t memory_bytes() const {
    return blocks_.size() + tail_.memory_bytes();
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
      view.add(tail_.segment(first_slot, length, p));
    });
    return view;
  }



 private:
  friend struct detail::QuantizedRecord<QuantizedKVCache>;

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
            if (detail::quantizable_value(x)) continue;
            if (!(Eigen::numext::isfinite)(x))
              detail::throw_invalid_argument(
                  "QuantizedKVCache::update: ", name, " at (batch ", b, ", head ", h,
                  ", new position ", i, ", channel ", c, ") is ", static_cast<double>(x),
                  ": expected a finite value (a quantized cache stores finite values only: a "
                  "group shares one zero point and one scale, which a NaN or an infinity would "
                  "corrupt; keep such values in a StaticKVCache or DynamicKVCache); the cache "
                  "is unchanged");
            detail::throw_invalid_argument(
                "QuantizedKVCache<double>::update: ", name, " at (batch ", b, ", head ", h,
                ", new position ", i, ", channel ", c, ") = ", static_cast<double>(x),
                " exceeds the magnitude its bfloat16 zero point and scale can represent: "
                "expected |x| <= ", detail::kBfloat16Max,
                " (keep such values in a StaticKVCache<double> or DynamicKVCache<double>)");
          }
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
  detail::KVBuffer<std::uint8_t> blocks_;  ///< (batch, heads, max_blocks) blocks
  detail::KVStorage<T, Layout> tail_;  ///< the unquantized tail: a ring of ring_ slots
  Index position_ = 0;
};

namespace detail {
template <class T, int Bits, class Layout>
struct RecordTraits<QuantizedKVCache<T, Bits, Layout>> : QuantizedRecord<QuantizedKVCache<T, Bits, Layout>> {};
}  // namespace detail

/// \brief QuantizedKVCache with 8-bit codes.
template <class T, class Layout = BHSD>
using Int8KVCache = QuantizedKVCache<T, 8, Layout>;

/// \brief QuantizedKVCache with 4-bit codes (two per byte).
template <class T, class Layout = BHSD>
using Int4KVCache = QuantizedKVCache<T, 4, Layout>;

}  // namespace kvcache

#endif  // KVCACHE_QUANTIZED_CACHE_HPP
