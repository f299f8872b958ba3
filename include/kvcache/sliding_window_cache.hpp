// kvcache: SlidingWindowKVCache - attention sinks plus a ring buffer of the most recent
// positions; memory stays bounded however long the stream.
#ifndef KVCACHE_SLIDING_WINDOW_CACHE_HPP
#define KVCACHE_SLIDING_WINDOW_CACHE_HPP

#include <kvcache/detail/kv_storage.hpp>
#include <kvcache/detail/record_codec.hpp>

#include <algorithm>
#include <cstddef>
#include <istream>
#include <limits>
#include <ostream>
#include <utility>
#include <vector>

namespace kvcache {

/// \brief A cache that keeps the first num_sink_tokens positions forever (attention sinks,
/// StreamingLLM) and the most recent `window` positions, in a ring buffer: appending a token
/// writes it over the oldest one, O(1) per token and head, never a shift of the window.
///
/// \tparam T      float, double, Eigen::half or Eigen::bfloat16
/// \tparam Layout BHSD (default) or BSHD: the layout of the storage and of every tensor the
///                cache takes or returns
///
/// Storage: one KVStorage of (batch_size, num_heads, num_sink_tokens + ring, head_dim).
/// Slots [0, num_sink_tokens) hold the sinks; absolute position p >= num_sink_tokens lives at
/// slot num_sink_tokens + (p - num_sink_tokens) % ring. The ring holds the last
/// min(position() - num_sink_tokens, ring) non-sink positions.
///
/// Chunks longer than the window: attend() must answer every query row of the last update
/// exactly, and the first row of an update of n tokens at position P sees keys from
/// P - window + 1. So after an update the ring must hold the whole chunk plus the window - 1
/// positions before it: ring >= n + window - 1. The ring starts at `window` slots and, when an
/// update needs more, is reallocated to exactly n + window - 1 (the held positions are moved
/// once); it is reused for the rest of the sequence, so the storage is fixed by the largest
/// chunk seen since construction or reset(), n_max: num_sink_tokens + window + n_max - 1
/// positions. Decoding one token at a time never grows it; a stream of chunks of c tokens
/// grows it once, at the first chunk. It does not shrink within a sequence: later queries may
/// still reach back into a long chunk as far as the ring holds it, and a stream that mixes
/// long and short chunks would otherwise reallocate again and again. reset() - a new
/// sequence - returns it to `window` slots (num_sink_tokens + window positions of storage).
///
/// size() and keys() report the sinks and the last `window` positions (what a decode step
/// sees); attention_view() shows the kernel every position the ring still holds, and the
/// shared masking rules apply the cache's window (sinks exempt). A query that would need an
/// evicted key - more query rows than the last update appended, beyond what the ring still
/// holds - makes attend() throw std::invalid_argument.
///
/// An update with fewer batch rows than batch_size() writes rows [0, b) and sets the other
/// rows to zero at the new positions. No crop(): rolling back a ring would need positions it
/// has already overwritten.
template <class T, class Layout = BHSD>
class SlidingWindowKVCache : public detail::Persistent<SlidingWindowKVCache<T, Layout>> {
  static_assert((detail::check_cache_parameters<T, Layout>(), true));

 public:
  using element_type = T;
  using layout_type = Layout;

  /// \param batch_size, window, num_heads, head_dim  positive, else std::invalid_argument
  /// \param num_sink_tokens first positions kept forever; 0 or more, else
  ///        std::invalid_argument
  SlidingWindowKVCache(Index batch_size, Index window, Index num_heads, Index head_dim,
                       Index num_sink_tokens = 0)
      : storage_(checked_storage(batch_size, window, num_heads, head_dim, num_sink_tokens)),
        window_(window),
        num_sink_tokens_(num_sink_tokens) {}

  /// \brief Appends k, v of shape (b <= batch_size(), num_heads(), new_len, head_dim()) at
  /// position(), overwriting the oldest ring positions. Accepts Tensor4<T> and Eigen::TensorMap
  /// of one. Any new_len works (see the class comment for chunks longer than the window).
  ///
  /// Throws std::invalid_argument for a shape that does not fit, with the cache unchanged.
  template <class K, class V>
  void update(const K& k, const V& v) {
    const detail::CheckedUpdate<T> input =
        detail::check_update<T, Layout>("SlidingWindowKVCache::update", k, v, batch_size(),
                                        num_heads(), head_dim());
    const detail::ConstView4<T>& k_view = input.k;
    const detail::ConstView4<T>& v_view = input.v;
    const Shape& in = input.shape;
    if (in.seq == 0) return;
    // The ring may need sinks + window - 1 slots beyond the chunk, and position() grows by it.
    detail::require_representable_append("SlidingWindowKVCache::update", position_, in.seq,
                                         num_sink_tokens_ + window_);
    const Index needed = ring_needed(in.seq);
    if (needed > ring_capacity()) grow_ring(needed);  // the only later step that can throw
    const Index first = position_;
    for_each_run(first, first + in.seq, ring_capacity(),
                 [&](Index slot, Index length, Index p) {
                   storage_.write_range(k_view, v_view, p - first, length, slot);
                 });
    position_ += in.seq;
  }

  /// \brief Positions held for the next query: min(position(), num_sink_tokens() + window()).
  Index size() const { return std::min(position_, num_sink_tokens_ + window_); }
  /// \brief Tokens appended since construction or reset(): the absolute position of the next.
  Index position() const { return position_; }
  /// \brief num_sink_tokens() + window(): what size() reaches on a long stream.
  Index capacity() const { return num_sink_tokens_ + window_; }
  Index batch_size() const { return storage_.shape().batch; }
  Index num_heads() const { return storage_.shape().heads; }
  Index head_dim() const { return storage_.shape().head_dim; }
  /// \brief The most recent positions kept (besides the sinks).
  Index window() const { return window_; }
  /// \brief The first positions kept forever and exempt from the window rule.
  Index num_sink_tokens() const { return num_sink_tokens_; }

  /// \brief The size() held keys, oldest first - the sinks, then the last window() positions:
  /// (batch_size, num_heads, size(), head_dim) in Layout.
  Tensor4<T> keys() const {
    return detail::gather_held<Layout>(view_from(window_start()), detail::KVPart::keys);
  }
  /// \brief The size() held values, in the order of keys().
  Tensor4<T> values() const {
    return detail::gather_held<Layout>(view_from(window_start()), detail::KVPart::values);
  }

  /// \brief Forgets every position, sinks included. A ring grown for a long chunk (see the
  /// class comment) is released: the storage returns to num_sink_tokens() + window()
  /// positions, as constructed. Otherwise the storage is kept. Never throws: should allocating
  /// the smaller storage fail, the grown one is kept (it serves the new sequence just as well).
  void reset() noexcept {
    position_ = 0;
    if (ring_capacity() == window_) return;
    try {
      const Shape s = storage_.shape();
      storage_ = detail::KVStorage<T, Layout>(s.batch, s.heads, num_sink_tokens_ + window_,
                                              s.head_dim);  // moves buffer pointers
    } catch (...) {  // std::bad_alloc: keep the grown storage
    }
  }

  /// \brief Bytes of K/V storage this object owns: 2 x batch x heads x head_dim x sizeof(T) x
  /// (num_sink_tokens + ring), where the ring is window() positions unless a longer chunk made
  /// it grow since construction or reset() (see the class comment). Constant on a stream of
  /// small updates, however long.
  std::size_t memory_bytes() const { return storage_.memory_bytes(); }

  /// \brief The kernel's view: the held sinks, then every held ring position (at most three
  /// segments: sinks, ring tail, ring head), with the cache's window and sinks and the first
  /// non-sink position still held. Valid until the cache is next modified.
  detail::KVView<T> attention_view() const { return view_from(first_held_position()); }



 private:
  friend struct detail::RecordTraits<SlidingWindowKVCache>;

  /// The ring slot (0-based, after the sinks) the next non-sink position goes to.
  static Index next_ring_slot(Index position, Index num_sink_tokens, Index ring) {
    return (std::max(position, num_sink_tokens) - num_sink_tokens) % ring;
  }

  /// The kernel's view with the ring's positions from `from` on (first_held_position(): all
  /// it holds; max(sinks, position - window): the last window() positions, what keys() shows).
  detail::KVView<T> view_from(Index from) const {
    const Shape s = storage_.shape();
    detail::KVView<T> view;
    view.batch_size = s.batch;
    view.num_heads = s.heads;
    view.head_dim = s.head_dim;
    view.position = position_;
    view.window = window_;
    view.num_sink_tokens = num_sink_tokens_;
    view.first_held_position = first_held_position();
    auto add = [&](Index slot, Index length, Index p) {
      view.add(storage_.segment(slot, length, p));
    };
    for_each_run(0, std::min(position_, num_sink_tokens_), ring_capacity(), add);
    for_each_run(from, position_, ring_capacity(), add);
    return view;
  }

  /// The storage slots of every held position, oldest first: the sinks, then the ring's.
  std::vector<Index> held_slots() const {
    std::vector<Index> slots;
    auto add = [&](Index slot, Index length, Index) {
      for (Index i = 0; i < length; ++i) slots.push_back(slot + i);
    };
    for_each_run(0, std::min(position_, num_sink_tokens_), ring_capacity(), add);
    for_each_run(first_held_position(), position_, ring_capacity(), add);
    return slots;
  }

  static detail::KVStorage<T, Layout> checked_storage(Index batch_size, Index window,
                                                      Index num_heads, Index head_dim,
                                                      Index num_sink_tokens) {
    const char* kind = "SlidingWindowKVCache";
    detail::require_positive(kind, "batch_size", batch_size);
    detail::require_positive(kind, "window", window);
    detail::require_positive(kind, "num_heads", num_heads);
    detail::require_positive(kind, "head_dim", head_dim);
    if (num_sink_tokens < 0)
      detail::throw_invalid_argument(kind, ": num_sink_tokens must not be negative, got ",
                                     num_sink_tokens);
    if (window > std::numeric_limits<Index>::max() - num_sink_tokens)
      detail::throw_length_error(kind, ": num_sink_tokens + window overflows: ", num_sink_tokens,
                                 " + ", window);
    return detail::KVStorage<T, Layout>(batch_size, num_heads, num_sink_tokens + window,
                                        head_dim);
  }

  /// Storage slots of the ring (after the sinks).
  Index ring_capacity() const { return storage_.capacity() - num_sink_tokens_; }

  /// The oldest of the last window() positions (after the sinks): where keys() starts the ring.
  Index window_start() const { return std::max(num_sink_tokens_, position_ - window_); }

  /// The oldest non-sink position the ring still holds (num_sink_tokens_ when none evicted).
  Index first_held_position() const {
    return std::max(num_sink_tokens_, position_ - ring_capacity());
  }

  /// Ring slots an update of n >= 1 tokens needs: the chunk and the window - 1 positions
  /// before it, which the window of its first row reaches. (Near the start of the stream
  /// fewer would do; asking for the same every time makes memory_bytes() depend on the chunk
  /// sizes only.)
  Index ring_needed(Index n) const { return n + window_ - 1; }

  /// Calls f(slot, length, first_position) for the runs of consecutive storage slots that hold
  /// absolute positions [first, last) in a ring of `ring` slots; the positions must be held
  /// (or be about to be written). A run ends at the end of the sinks or of the ring.
  template <class F>
  void for_each_run(Index first, Index last, Index ring, F&& f) const {
    if (first < num_sink_tokens_) {  // the sinks: slot = position
      const Index sinks_end = std::min(last, num_sink_tokens_);
      f(first, sinks_end - first, first);
      first = sinks_end;
    }
    detail::for_each_ring_run(first, last, num_sink_tokens_, ring,
                              [&](Index slot, Index length, Index p) {
                                f(num_sink_tokens_ + slot, length, p);
                              });
  }

  /// Moves to a ring of `new_ring` slots, every held position at its slot in the new ring.
  /// Strong guarantee: the new storage is complete before it replaces the old one.
  void grow_ring(Index new_ring) {
    const Shape s = storage_.shape();
    detail::KVStorage<T, Layout> grown(s.batch, s.heads, num_sink_tokens_ + new_ring,
                                       s.head_dim);
    grown.copy_from(storage_, 0, std::min(position_, num_sink_tokens_), 0);
    const Index old_ring = ring_capacity();
    for_each_run(first_held_position(), position_, old_ring,
                 [&](Index from_slot, Index length, Index p) {
                   for_each_run(p, p + length, new_ring,
                                [&](Index to_slot, Index piece, Index q) {
                                  grown.copy_from(storage_, from_slot + (q - p), piece, to_slot);
                                });
                 });
    storage_ = std::move(grown);  // swaps buffer pointers: cannot throw
  }

  detail::KVStorage<T, Layout> storage_;
  Index window_;
  Index num_sink_tokens_;
  Index position_ = 0;
};

namespace detail {
/// A SlidingWindowKVCache record: shape, capacity (num_sink_tokens + window), position, the
/// window, the sinks, the ring's size and next slot, then every position the storage holds
/// (the sinks, then the ring's oldest first; more than size() when a long chunk grew the ring).
template <class T, class Layout>
struct RecordTraits<SlidingWindowKVCache<T, Layout>> {
  using Cache = SlidingWindowKVCache<T, Layout>;
  static constexpr CacheKind kind = CacheKind::sliding_window_cache;
  struct Header : CacheHeader {
    Index window = 0;
    Index num_sink_tokens = 0;
    Index ring_slots = 0;      ///< storage slots of the ring (>= window)
    Index next_ring_slot = 0;  ///< ring slot (after the sinks) of the next non-sink position
  };
  static constexpr auto fields = cache_fields<Header>(
      HeaderField<Header>{"window", &Header::window}, HeaderField<Header>{"num_sink_tokens", &Header::num_sink_tokens},
      HeaderField<Header>{"ring_slots", &Header::ring_slots}, HeaderField<Header>{"next_ring_slot", &Header::next_ring_slot});

  static Header header(const Cache& c) {
    Header h;
    static_cast<CacheHeader&>(h) = {c.batch_size(), c.num_heads(), c.head_dim(), c.capacity(), c.position()};
    h.window = c.window_;
    h.num_sink_tokens = c.num_sink_tokens_;
    h.ring_slots = c.ring_capacity();
    h.next_ring_slot = Cache::next_ring_slot(c.position_, c.num_sink_tokens_, c.ring_capacity());
    return h;
  }
  static void write_payload(const Cache& cache, const Header&, Writer& writer) {
    write_view_rows<Layout>(writer, cache.attention_view());
  }
  static KVRows<T> read_payload(Reader& reader, const Header& h, const LoadLimits& limits) {
    if (h.window < 1) reader.fail("window: expected at least 1, got ", h.window);
    require_equal(reader, "capacity", h.capacity,
                  checked_sum(reader, "num_sink_tokens + window", h.num_sink_tokens, h.window),
                  "num_sink_tokens + window");
    if (h.ring_slots < h.window)
      reader.fail("ring_slots: expected at least window = ", h.window, ", got ", h.ring_slots);
    const Index slots = checked_sum(reader, "num_sink_tokens + ring_slots", h.num_sink_tokens, h.ring_slots);
    require_equal(reader, "next_ring_slot", h.next_ring_slot,
                  Cache::next_ring_slot(h.position, h.num_sink_tokens, h.ring_slots),
                  "(max(position, num_sink_tokens) - num_sink_tokens) % ring_slots");
    return read_cache_rows<T>(reader, h, slots, held(h), limits);
  }
  static Cache build(const Header& h, KVRows<T>&& rows) {
    Cache cache(h.batch_size, h.window, h.num_heads, h.head_dim, h.num_sink_tokens);
    if (h.ring_slots > h.window)
      cache.storage_ = KVStorage<T, Layout>(h.batch_size, h.num_heads, h.num_sink_tokens + h.ring_slots, h.head_dim);
    cache.position_ = h.position;
    const std::vector<Index> slots = cache.held_slots();
    const std::array<Index, 4> dims = Layout::dims({h.batch_size, h.num_heads, held(h), h.head_dim});
    for (Index i = 0; i < held(h); ++i)
      cache.storage_.write_range({rows.keys.data(), dims}, {rows.values.data(), dims}, i, 1,
                                 slots[static_cast<std::size_t>(i)]);
    return cache;
  }

 private:
  /// Positions the storage holds: the sinks reached, then the ring's.
  static Index held(const Header& h) {
    return std::min(h.position, h.num_sink_tokens) +
           std::min(std::max<Index>(h.position - h.num_sink_tokens, 0), h.ring_slots);
  }
};
}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_SLIDING_WINDOW_CACHE_HPP
