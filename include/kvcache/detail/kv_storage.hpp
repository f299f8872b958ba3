// kvcache: preallocated K/V storage in a layout, with a capacity along the sequence axis.
// It knows nothing of positions or policies; the caches do the bookkeeping.
#ifndef KVCACHE_DETAIL_KV_STORAGE_HPP
#define KVCACHE_DETAIL_KV_STORAGE_HPP

#include <kvcache/detail/kv_buffer.hpp>
#include <kvcache/detail/kv_view.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/detail/quantizer.hpp>

#include <algorithm>
#include <cstddef>
#include <utility>

namespace kvcache {
namespace detail {

/// Copies positions [src_begin, src_begin + length) of batch rows [0, batch) and all heads from
/// one strided buffer to positions [dst_begin, ...) of another. head_dim elements are
/// contiguous in both, so each (row, head, position) is one contiguous run.
template <class T>
void copy_positions(const T* src, const Strides& src_strides, Index src_begin, T* dst,
                    const Strides& dst_strides, Index dst_begin, Index batch, Index heads,
                    Index length, Index head_dim) {
  // Nothing to copy: return before walking batch x heads (a cache of no positions may declare
  // any number of heads; fuzz_load found a 2^42-head record that made load() loop for hours).
  if (length <= 0 || head_dim <= 0) return;
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < heads; ++h)
      for (Index i = 0; i < length; ++i)
        std::copy_n(src + b * src_strides.batch + h * src_strides.head +
                        (src_begin + i) * src_strides.seq,
                    head_dim,
                    dst + b * dst_strides.batch + h * dst_strides.head +
                        (dst_begin + i) * dst_strides.seq);
}

/// Sets positions [begin, begin + length) of batch rows [batch_begin, batch_end) to zero.
template <class T>
void zero_positions(T* dst, const Strides& strides, Index begin, Index batch_begin,
                    Index batch_end, Index heads, Index length, Index head_dim) {
  if (length <= 0 || head_dim <= 0) return;  // as copy_positions
  for (Index b = batch_begin; b < batch_end; ++b)
    for (Index h = 0; h < heads; ++h)
      for (Index i = 0; i < length; ++i)
        std::fill_n(dst + b * strides.batch + h * strides.head + (begin + i) * strides.seq,
                    head_dim, T(0));
}

/// Calls f(slot, length, first_position) for the runs of consecutive slots of a ring that hold
/// absolute positions [first, last): position p >= origin lives in slot (p - origin) % ring.
/// At most two runs when last - first <= ring (the ring wraps once).
template <class F>
void for_each_ring_run(Index first, Index last, Index origin, Index ring, F&& f) {
  // Invariant: positions [the caller's first, first) went to f, in order.
  while (first < last) {
    const Index slot = (first - origin) % ring;
    const Index length = std::min(last - first, ring - slot);
    f(slot, length, first);
    first += length;
  }
}

/// Which half of a cache gather_held() copies.
enum class KVPart { keys, values };

/// The held keys or values of a cache's view, oldest first, as one (batch_size, num_heads,
/// held_length(), head_dim) tensor in Layout: its quantized blocks dequantized (quantization.hpp),
/// then each T segment, then the block table's rows. What every cache's keys() and values()
/// return, one walk for every kind of run a view holds.
template <class Layout, class T>
Tensor4<T> gather_held(const KVView<T>& view, KVPart part) {
  const Shape shape{view.batch_size, view.num_heads, view.held_length(), view.head_dim};
  Tensor4<T> out(Layout::dims(shape));
  const Strides to = Layout::strides(shape);
  const bool keys = part == KVPart::keys;
  Index at = 0;  // held index of the next run's first position
  const QuantSegment& q = view.quantized;
  auto dequantize = [&](auto format) {
    for (Index b = 0; b < shape.batch; ++b)
      for (Index h = 0; h < shape.heads; ++h)
        for (Index p = 0; p < q.num_blocks * q.group_size; ++p) {
          const std::uint8_t* block =
              q.blocks + b * q.batch_stride + h * q.head_stride + p / q.group_size * q.bytes_per_block;
          T* row = out.data() + b * to.batch + h * to.head + p * to.seq;
          if (keys)
            dequantize_key_row(block, p % q.group_size, format, row);
          else
            dequantize_value_row(block, p % q.group_size, format, row);
        }
  };
  if (q.num_blocks > 0) {
    if (q.bits == 8)
      dequantize(QuantBlockFormat<8>{q.group_size, view.head_dim});
    else
      dequantize(QuantBlockFormat<4>{q.group_size, view.head_dim});
    at += q.num_blocks * q.group_size;
  }
  for (int s = 0; s < view.num_segments; ++s) {
    const KVSegment<T>& seg = view.segments[static_cast<std::size_t>(s)];
    copy_positions(keys ? seg.keys : seg.values, seg.strides, 0, out.data(), to, at, shape.batch,
                   shape.heads, seg.length, shape.head_dim);
    at += seg.length;
  }
  const BlockTable<T>& table = view.paged;
  for (Index done = 0; done < table.length;) {  // batch row 0, a pool block's rows at a time
    const Index slot = table.offset + done;
    const Index rows = std::min(table.length - done, table.block_size - slot % table.block_size);
    const T* first = (keys ? table.keys : table.values) +
                     table.ids[slot / table.block_size] * table.block_stride +
                     slot % table.block_size * table.strides.seq;
    copy_positions(first, table.strides, 0, out.data(), to, at + done, 1, shape.heads, rows,
                   shape.head_dim);
    done += rows;
  }
  return out;
}

/// The inputs of an update, checked: k and v as views and their common shape.
template <class T>
struct CheckedUpdate {
  ConstView4<T> k;
  ConstView4<T> v;
  Shape shape;
};

/// Checks k and v of an update (Tensor4<T> or TensorMaps of one; other types fail to compile)
/// against a cache's shape. Throws std::invalid_argument naming the expected and the received
/// shape; every cache kind calls this before it modifies anything.
template <class T, class Layout, class K, class V>
CheckedUpdate<T> check_update(const char* where, const K& k_in, const V& v_in, Index batch_size,
                              Index num_heads, Index head_dim) {
  check_input_tensor<T, K>();
  check_input_tensor<T, V>();
  const ConstView4<T> k = view_of(k_in);
  const ConstView4<T> v = view_of(v_in);
  if (k.dims != v.dims)
    throw_invalid_argument(where, ": k and v must have the same shape: expected v of k's shape ",
                           describe_dims<Layout>(k.dims), "; got ", describe_dims<Layout>(v.dims));
  const Shape s = Layout::shape(k.dims);
  if (s.batch < 1 || s.batch > batch_size || s.heads != num_heads || s.head_dim != head_dim ||
      s.seq < 0)
    throw_invalid_argument(
        where, ": expected k and v of shape ",
        describe_expected<Layout>(batch_size == 1 ? std::string("1") : "1.." + std::to_string(batch_size),
                                  std::to_string(num_heads),
                                  "new_len", std::to_string(head_dim)),
        "; got ", describe_dims<Layout>(k.dims));
  return {k, v, s};
}

/// K and V buffers of shape (batch, heads, capacity, head_dim) in Layout (KVBuffer: cache-line
/// aligned, huge pages where the system gives them).
template <class T, class Layout>
class KVStorage {
 public:
  /// Throws std::length_error when the buffers could not be addressed (extents whose product
  /// overflows), before allocating anything.
  KVStorage(Index batch_size, Index num_heads, Index capacity, Index head_dim)
      : shape_(checked_shape(batch_size, num_heads, capacity, head_dim)),
        keys_(element_count(shape_)),
        values_(element_count(shape_)) {}
  KVStorage(const KVStorage&) = default;
  /// A moved-from storage is empty (no positions), as an Eigen tensor is.
  KVStorage(KVStorage&& other) noexcept
      : shape_(std::exchange(other.shape_, Shape{0, 0, 0, 0})),
        keys_(std::move(other.keys_)),
        values_(std::move(other.values_)) {}
  /// Copies first, then swaps: a copy that fails leaves this storage as it was.
  KVStorage& operator=(KVStorage other) noexcept {
    std::swap(shape_, other.shape_);
    keys_.swap(other.keys_);
    values_.swap(other.values_);
    return *this;
  }
  ~KVStorage() = default;

  Shape shape() const { return shape_; }
  Index capacity() const { return shape().seq; }
  Strides strides() const { return Layout::strides(shape()); }

  /// Writes k, v (already checked: batch <= batch_size, same heads and head_dim) at positions
  /// [at, at + new_len); batch rows the input does not have are zeroed at those positions.
  /// Requires: at + new_len <= capacity().
  void write(const ConstView4<T>& k, const ConstView4<T>& v, Index at) {
    write_range(k, v, 0, Layout::shape(k.dims).seq, at);
  }

  /// Like write(), for input positions [src_begin, src_begin + length) only, stored at
  /// [at, at + length). Requires: the range lies in the input and at + length <= capacity().
  void write_range(const ConstView4<T>& k, const ConstView4<T>& v, Index src_begin,
                   Index length, Index at) {
    const Shape in = Layout::shape(k.dims);
    const Shape own = shape();
    const Strides in_strides = Layout::strides(in);
    copy_positions(k.data, in_strides, src_begin, keys_.data(), strides(), at, in.batch,
                   in.heads, length, in.head_dim);
    copy_positions(v.data, in_strides, src_begin, values_.data(), strides(), at, in.batch,
                   in.heads, length, in.head_dim);
    zero_positions(keys_.data(), strides(), at, in.batch, own.batch, own.heads, length,
                   own.head_dim);
    zero_positions(values_.data(), strides(), at, in.batch, own.batch, own.heads, length,
                   own.head_dim);
  }

  /// Copies positions [src_begin, src_begin + length) of another storage of the same batch,
  /// heads and head_dim (any capacity) to positions [dst_begin, dst_begin + length) of this.
  void copy_from(const KVStorage& from, Index src_begin, Index length, Index dst_begin) {
    const Shape own = shape();
    copy_positions(from.keys_.data(), from.strides(), src_begin, keys_.data(), strides(),
                   dst_begin, own.batch, own.heads, length, own.head_dim);
    copy_positions(from.values_.data(), from.strides(), src_begin, values_.data(), strides(),
                   dst_begin, own.batch, own.heads, length, own.head_dim);
  }

  /// Copies positions [begin, begin + length) of keys or values into a new tensor.
  Tensor4<T> copy_keys(Index begin, Index length) const { return copy_range(keys_, begin, length); }
  Tensor4<T> copy_values(Index begin, Index length) const {
    return copy_range(values_, begin, length);
  }

  /// Moves to a buffer of new_capacity positions keeping [0, keep). Strong guarantee: the new
  /// buffers are allocated before anything changes.
  void reallocate(Index new_capacity, Index keep) {
    const Shape own = shape();
    KVStorage grown(own.batch, own.heads, new_capacity, own.head_dim);
    copy_positions(keys_.data(), strides(), 0, grown.keys_.data(), grown.strides(), 0, own.batch,
                   own.heads, keep, own.head_dim);
    copy_positions(values_.data(), strides(), 0, grown.values_.data(), grown.strides(), 0,
                   own.batch, own.heads, keep, own.head_dim);
    keys_.swap(grown.keys_);
    values_.swap(grown.values_);
    std::swap(shape_, grown.shape_);
  }

  /// A kernel's view of positions [begin, begin + length), which sit at absolute positions
  /// first_position, first_position + 1, ...
  KVSegment<T> segment(Index begin, Index length, Index first_position) const {
    const Strides s = strides();
    return {keys_.data() + begin * s.seq, values_.data() + begin * s.seq, s, first_position,
            length};
  }

  std::size_t memory_bytes() const {
    return 2 * static_cast<std::size_t>(keys_.size()) * sizeof(T);
  }

  /// The row (head_dim elements) of batch row b, head h at storage position `slot`.
  T* row(KVPart part, Index b, Index h, Index slot) {
    return row_at(part == KVPart::keys ? keys_.data() : values_.data(), b, h, slot);
  }
  const T* row(KVPart part, Index b, Index h, Index slot) const {
    return row_at(part == KVPart::keys ? keys_.data() : values_.data(), b, h, slot);
  }

  /// The first element of the keys and of the values (position 0 of batch row 0, head 0).
  T* keys_data() { return keys_.data(); }
  T* values_data() { return values_.data(); }
  const T* keys_data() const { return keys_.data(); }
  const T* values_data() const { return values_.data(); }

 private:
  static Shape checked_shape(Index batch_size, Index num_heads, Index capacity, Index head_dim) {
    checked_element_count("cache storage", {batch_size, num_heads, capacity, head_dim}, sizeof(T));
    return {batch_size, num_heads, capacity, head_dim};
  }
  static std::size_t element_count(const Shape& s) {
    return static_cast<std::size_t>(s.batch) * static_cast<std::size_t>(s.heads) *
           static_cast<std::size_t>(s.seq) * static_cast<std::size_t>(s.head_dim);
  }

  template <class P>
  P* row_at(P* base, Index b, Index h, Index slot) const {
    const Strides s = strides();
    return base + b * s.batch + h * s.head + slot * s.seq;
  }

  Tensor4<T> copy_range(const KVBuffer<T>& from, Index begin, Index length) const {
    Shape out_shape = shape();
    out_shape.seq = length;
    Tensor4<T> out(Layout::dims(out_shape));
    copy_positions(from.data(), strides(), begin, out.data(), Layout::strides(out_shape), 0,
                   out_shape.batch, out_shape.heads, length, out_shape.head_dim);
    return out;
  }

  Shape shape_;
  KVBuffer<T> keys_;
  KVBuffer<T> values_;
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KV_STORAGE_HPP
