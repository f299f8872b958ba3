// kvcache: PagedKVCache - many sequences of different lengths in one fixed pool of blocks, with
// copy-on-write forks and prefix reuse by token ids (vLLM's PagedAttention, SGLang's
// RadixAttention). attend() over a ragged batch of its sequences is in paged_attend.hpp.
#ifndef KVCACHE_PAGED_CACHE_HPP
#define KVCACHE_PAGED_CACHE_HPP

#include <kvcache/detail/kv_storage.hpp>
#include <kvcache/detail/kv_view.hpp>
#include <kvcache/detail/paged_record.hpp>
#include <kvcache/detail/prefix_index.hpp>
#include <kvcache/errors.hpp>

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <limits>
#include <istream>
#include <map>
#include <ostream>
#include <set>
#include <stdexcept>
#include <utility>
#include <vector>

namespace kvcache {

/// \brief The shape of a PagedKVCache's pool, fixed at construction.
struct PagedConfig {
  Index num_layers = 1;
  Index num_blocks = 0;  ///< blocks per layer in the pool
  Index block_size = 16; ///< tokens per block
  Index num_heads = 0;   ///< KV heads
  Index head_dim = 0;
};

/// \brief Many sequences in one pool of fixed-size blocks. Each sequence has, per layer, a
/// block table (the pool blocks that hold its positions, in order) and a size; blocks are
/// reference-counted, so fork() shares every block of its parent and a block is copied only
/// when a holder writes into a block someone else holds (copy on write). Whole blocks can be
/// published under their token ids (cache_prefix) and found again by a new sequence with the
/// same leading tokens (add_sequence(tokens)); published blocks that no sequence holds stay in
/// the pool until it needs them, then go least recently used first.
///
/// \tparam T      float, double, Eigen::half or Eigen::bfloat16
/// \tparam Layout BHSD (default) or BSHD: the layout of update()'s k and v ([1, num_heads, n,
///                head_dim]), of keys()/values() and of the queries of the ragged attend
///
/// Memory: the pool (2 x num_layers x num_blocks x block_size x num_heads x head_dim
/// elements) is allocated at construction, the prefix index (one node per block at most) too;
/// a sequence's block tables (4 bytes per block per layer, num_blocks entries per layer) at
/// add_sequence() or fork(). update(), crop(), cache_prefix() and the ragged attend with a
/// reused workspace allocate nothing. At most one partly filled block per sequence per layer
/// is waste.
///
/// Errors: an unknown or removed SequenceId throws std::invalid_argument, a layer out of range
/// std::out_of_range, a pool that cannot supply a needed block OutOfBlocks; every operation
/// that throws leaves the pool as it was. Not thread-safe for writers; concurrent const use
/// (attend from many threads) is safe.
template <class T, class Layout = BHSD>
class PagedKVCache : public detail::Persistent<PagedKVCache<T, Layout>> {
  static_assert(is_kv_element_v<T>,
                "kvcache: PagedKVCache's element type must be float, double, Eigen::half or "
                "Eigen::bfloat16");
  static_assert(is_layout_v<Layout>, "kvcache: the layout must be kvcache::BHSD or kvcache::BSHD");

 public:
  using element_type = T;
  using layout_type = Layout;
  using config_type = PagedConfig;
  /// Sequence ids are never reused: a removed id stays unknown.
  using SequenceId = std::int64_t;
  /// What add_sequence(tokens) found: the new sequence and the positions it already holds.
  struct Match {
    SequenceId sequence;
    Index cached;
  };

  /// \param config every extent positive (num_blocks below 2^31), else std::invalid_argument;
  ///               std::length_error when the pool's size overflows
  explicit PagedKVCache(const PagedConfig& config)
      : config_(checked(config)),
        storage_(config.num_layers, config.num_heads, config.num_blocks * config.block_size,
                 config.head_dim),
        refcounts_(detail::count(config.num_layers) * detail::count(config.num_blocks), 0),
        free_(detail::count(config.num_layers) * detail::count(config.num_blocks)),
        free_count_(detail::count(config.num_layers), config.num_blocks),
        index_(config.num_layers, config.num_blocks, config.block_size) {
    // Every layer's free stack pops block 0 first.
    for (Index layer = 0; layer < config_.num_layers; ++layer)
      for (Index i = 0; i < config_.num_blocks; ++i)
        free_[detail::count(layer * config_.num_blocks + i)] =
            static_cast<std::int32_t>(config_.num_blocks - 1 - i);
  }

  /// \brief A new empty sequence.
  SequenceId add_sequence() {
    const SequenceId id = next_id_;
    sequences_.emplace(id, Sequence(config_));
    ++next_id_;
    return id;
  }

  /// \brief A new sequence holding the longest published block-aligned prefix of `tokens`
  /// (see cache_prefix); `cached` is how many positions it holds, in every layer: a multiple
  /// of block_size(), at most tokens.size(). The caller appends the rest of the tokens' keys
  /// and values (from position `cached`); to get the last token's logits when every token
  /// matched, crop one position first.
  Match add_sequence(const std::vector<std::int32_t>& tokens) {
    Sequence sequence(config_);
    const Index whole = static_cast<Index>(tokens.size()) / config_.block_size;
    Index depth = 0;
    // Nothing below throws once the sequence exists: reference counts change last.
    index_.match(tokens.data(), whole, [&](std::int32_t node) {
      for (Index layer = 0; layer < config_.num_layers; ++layer)
        sequence.table(layer, config_)[depth] = index_.block(node, layer);
      ++depth;
    });
    const SequenceId id = next_id_;
    Sequence& added = sequences_.emplace(id, std::move(sequence)).first->second;
    ++next_id_;
    for (Index layer = 0; layer < config_.num_layers; ++layer) {
      added.sizes[detail::count(layer)] = depth * config_.block_size;
      for (Index i = 0; i < depth; ++i) retain(layer, added.table(layer, config_)[i]);
    }
    return Match{id, depth * config_.block_size};
  }

  /// \brief A new sequence that shares every held position of `parent` in every layer (no
  /// copy; the first write into a shared partly filled block copies that block).
  SequenceId fork(SequenceId parent) {
    const Sequence& from = find("PagedKVCache::fork", parent);
    Sequence copy = from;
    const SequenceId id = next_id_;
    sequences_.emplace(id, std::move(copy));
    ++next_id_;
    for (Index layer = 0; layer < config_.num_layers; ++layer)
      for_each_held_block(from, layer, [&](std::int32_t b) { retain(layer, b); });
    return id;
  }

  /// \brief Removes a sequence; its blocks return to the pool when nothing else holds them.
  void remove_sequence(SequenceId s) {
    auto it = sequences_.find(s);
    if (it == sequences_.end()) throw_unknown("PagedKVCache::remove_sequence", s);
    for (Index layer = 0; layer < config_.num_layers; ++layer)
      for_each_held_block(it->second, layer, [&](std::int32_t b) { release(layer, b); });
    sequences_.erase(it);
  }

  /// \brief Appends k, v of shape [1, num_heads(), n, head_dim()] in Layout (Tensor4<T> or
  /// TensorMaps of one) to `layer` of sequence s. Takes the blocks it needs from the pool
  /// (evicting unheld published blocks, least recently used first, when none is free) and
  /// copies a shared partly filled last block before writing into it. Throws
  /// std::invalid_argument (shape, unknown sequence), std::out_of_range (layer) or OutOfBlocks,
  /// with the pool unchanged.
  template <class K, class V>
  void update(Index layer, SequenceId s, const K& k, const V& v) {
    const char* where = "PagedKVCache::update";
    check_layer(where, layer);
    Sequence& sequence = find(where, s);
    const detail::CheckedUpdate<T> in = detail::check_update<T, Layout>(
        where, k, v, 1, config_.num_heads, config_.head_dim);
    const Index n = in.shape.seq;
    if (n == 0) return;
    const Index size = sequence.sizes[detail::count(layer)];
    const Index bs = config_.block_size;
    const Index held_blocks = (size + bs - 1) / bs;
    const Index needed_blocks = (size + n + bs - 1) / bs;
    std::int32_t* table = sequence.table(layer, config_);
    const bool copy_tail = size % bs != 0 && refcount(layer, table[held_blocks - 1]) > 1;
    const Index wanted = needed_blocks - held_blocks + (copy_tail ? 1 : 0);
    if (needed_blocks > config_.num_blocks)
      throw OutOfBlocks(detail::message("kvcache: ", where, ": a sequence of ", size + n, " positions needs ",
                                       needed_blocks, " blocks of ", bs,
                                       "; the pool has num_blocks() = ", config_.num_blocks));
    make_free(where, layer, wanted);
    // Nothing below throws.
    if (copy_tail) {
      const std::int32_t copy = acquire(layer);
      copy_rows(layer, table[held_blocks - 1], copy, size % bs);
      release(layer, table[held_blocks - 1]);
      table[held_blocks - 1] = copy;
    }
    for (Index i = held_blocks; i < needed_blocks; ++i) table[i] = acquire(layer);
    const Strides in_strides = Layout::strides(in.shape);
    for (Index done = 0; done < n;) {
      const Index at = size + done;
      const Index rows = std::min(n - done, bs - at % bs);
      const Index block = global_block(layer, table[at / bs]);
      detail::copy_positions(in.k.data, in_strides, done, block_keys(block), block_strides(),
                             at % bs, 1, config_.num_heads, rows, config_.head_dim);
      detail::copy_positions(in.v.data, in_strides, done, block_values(block), block_strides(),
                             at % bs, 1, config_.num_heads, rows, config_.head_dim);
      done += rows;
    }
    sequence.sizes[detail::count(layer)] = size + n;
  }

  /// \brief Keeps the first n positions of s in every layer (0 <= n <= the smallest size(s,
  /// layer), else std::invalid_argument); blocks past them return to the pool when nothing
  /// else holds them.
  void crop(SequenceId s, Index n) {
    Sequence& sequence = find("PagedKVCache::crop", s);
    const Index smallest = *std::min_element(sequence.sizes.begin(), sequence.sizes.end());
    if (n < 0 || n > smallest)
      detail::throw_invalid_argument("PagedKVCache::crop: n must be in [0, ", smallest,
                                     "] (the sequence's smallest size over the layers), got ", n);
    const Index keep_blocks = (n + config_.block_size - 1) / config_.block_size;
    for (Index layer = 0; layer < config_.num_layers; ++layer) {
      const Index held = (sequence.sizes[detail::count(layer)] + config_.block_size - 1) / config_.block_size;
      for (Index i = keep_blocks; i < held; ++i) release(layer, sequence.table(layer, config_)[i]);
      sequence.sizes[detail::count(layer)] = n;
    }
  }

  /// \brief Publishes the whole blocks of s that cover tokens (the ids of s's first
  /// tokens.size() positions; at most the smallest size(s, layer), else
  /// std::invalid_argument) in the prefix index, so add_sequence(tokens) finds them. The
  /// trailing tokens.size() % block_size() positions are not published.
  void cache_prefix(SequenceId s, const std::vector<std::int32_t>& tokens) {
    const Sequence& sequence = find("PagedKVCache::cache_prefix", s);
    const Index n = static_cast<Index>(tokens.size());
    const Index smallest = *std::min_element(sequence.sizes.begin(), sequence.sizes.end());
    if (n > smallest)
      detail::throw_invalid_argument("PagedKVCache::cache_prefix: expected at most ", smallest,
                                     " token ids (the sequence's smallest size over the "
                                     "layers), got ",
                                     n);
    index_.publish(
        tokens.data(), n / config_.block_size,
        [&](Index depth, Index layer) { return sequence.table(layer, config_)[depth]; },
        [&](Index layer, std::int32_t b) { retain(layer, b); });
  }

  /// \brief Positions s holds in `layer`.
  Index size(SequenceId s, Index layer = 0) const {
    check_layer("PagedKVCache::size", layer);
    return find("PagedKVCache::size", s).sizes[detail::count(layer)];
  }

  /// \brief The live sequences, in increasing id.
  std::vector<SequenceId> sequences() const {
    std::vector<SequenceId> ids;
    ids.reserve(sequences_.size());
    for (const auto& entry : sequences_) ids.push_back(entry.first);
    return ids;
  }

  /// \brief Whether s is a live sequence.
  bool contains(SequenceId s) const { return sequences_.count(s) != 0; }

  /// \brief The shape the pool was made with.
  const PagedConfig& config() const { return config_; }
  Index num_layers() const { return config_.num_layers; }
  Index num_heads() const { return config_.num_heads; }
  Index head_dim() const { return config_.head_dim; }
  Index block_size() const { return config_.block_size; }
  /// \brief Blocks per layer.
  Index num_blocks() const { return config_.num_blocks; }
  /// \brief The fewest blocks that nothing (no sequence, no published prefix) holds, over the
  /// layers.
  Index free_blocks() const { return *std::min_element(free_count_.begin(), free_count_.end()); }
  /// \brief Blocks that published prefixes hold and no sequence does: free_blocks() +
  /// evictable_blocks() blocks can be had (per layer) before OutOfBlocks.
  Index evictable_blocks() const {
    return index_.evictable([&](std::int32_t node) { return only_index_holds(node); });
  }
  /// \brief Published blocks (per layer) in the prefix index.
  Index published_blocks() const { return index_.size(); }
  /// \brief Bytes of the pool's K/V storage.
  std::size_t memory_bytes() const { return storage_.memory_bytes(); }
  /// \brief Block-table entries: positions of `layer` allocated to sequences but not filled
  /// (at most block_size() - 1 per sequence), counting shared blocks once.
  Index wasted_positions(Index layer = 0) const {
    check_layer("PagedKVCache::wasted_positions", layer);
    const std::vector<Index> fill = filled_rows();
    Index filled = 0;
    for (Index b = 0; b < config_.num_blocks; ++b) filled += fill[detail::count(layer * config_.num_blocks + b)];
    return (config_.num_blocks - free_count_[detail::count(layer)]) * config_.block_size - filled;
  }

  /// \brief Copies of positions [0, size(s, layer)) of the keys / values, [1, num_heads,
  /// size, head_dim] in Layout.
  Tensor4<T> keys(Index layer, SequenceId s) const {
    return detail::gather_held<Layout>(attention_view(layer, s), detail::KVPart::keys);
  }
  Tensor4<T> values(Index layer, SequenceId s) const {
    return detail::gather_held<Layout>(attention_view(layer, s), detail::KVPart::values);
  }

  /// \brief The kernel's view of s in `layer` (one block table from position 0); valid until
  /// the pool is next modified.
  detail::KVView<T> attention_view(Index layer, SequenceId s) const {
    check_layer("PagedKVCache::attention_view", layer);
    const Sequence& sequence = find("PagedKVCache::attention_view", s);
    const Index size = sequence.sizes[detail::count(layer)];
    detail::KVView<T> view;
    view.batch_size = 1;
    view.num_heads = config_.num_heads;
    view.head_dim = config_.head_dim;
    view.position = size;
    detail::BlockTable<T> table;
    table.keys = storage_.keys_data() + layer * storage_.strides().batch;
    table.values = storage_.values_data() + layer * storage_.strides().batch;
    table.ids = sequence.table(layer, config_);
    table.block_size = config_.block_size;
    table.block_stride = block_stride();
    table.strides = block_strides();
    table.length = size;
    view.add_block_table(table);
    return view;
  }

 private:
  friend struct detail::PagedRecord<PagedKVCache>;

  struct Sequence {
    explicit Sequence(const PagedConfig& c)
        : tables(detail::count(c.num_layers) * detail::count(c.num_blocks), -1), sizes(detail::count(c.num_layers), 0) {}
    std::int32_t* table(Index layer, const PagedConfig& c) {
      return tables.data() + layer * c.num_blocks;
    }
    const std::int32_t* table(Index layer, const PagedConfig& c) const {
      return tables.data() + layer * c.num_blocks;
    }
    std::vector<std::int32_t> tables;  ///< (layer, num_blocks): pool blocks, in position order
    std::vector<Index> sizes;          ///< (layer): positions held
  };

  /// (layer, block): rows written into each block, the most any holder filled (a published
  /// block is full); 0 for a free block.
  std::vector<Index> filled_rows() const {
    std::vector<Index> fill(refcounts_.size(), 0);
    for (const auto& entry : sequences_)
      for (Index layer = 0; layer < config_.num_layers; ++layer) {
        const Index size = entry.second.sizes[detail::count(layer)];
        const std::int32_t* table = entry.second.table(layer, config_);
        for (Index i = 0; i * config_.block_size < size; ++i) {
          Index& f = fill[detail::count(layer * config_.num_blocks + table[i])];
          f = std::max(f, std::min(config_.block_size, size - i * config_.block_size));
        }
      }
    index_.for_each_node([&](std::int32_t node, std::int32_t, const std::int32_t*) {
      for (Index layer = 0; layer < config_.num_layers; ++layer)
        fill[detail::count(layer * config_.num_blocks + index_.block(node, layer))] = config_.block_size;
    });
    return fill;
  }

  static PagedConfig checked(const PagedConfig& c) {
    const char* where = "PagedKVCache";
    detail::require_positive(where, "num_layers", c.num_layers);
    detail::require_positive(where, "num_blocks", c.num_blocks);
    detail::require_positive(where, "block_size", c.block_size);
    detail::require_positive(where, "num_heads", c.num_heads);
    detail::require_positive(where, "head_dim", c.head_dim);
    if (c.num_blocks > std::numeric_limits<std::int32_t>::max())
      detail::throw_invalid_argument(where, ": num_blocks must be below 2^31, got ", c.num_blocks);
    detail::checked_element_count(where, {c.num_layers, c.num_blocks, c.block_size, c.num_heads,
                                          c.head_dim},
                                  sizeof(T));
    detail::checked_element_count(where, {c.num_layers, c.num_blocks, c.num_blocks}, 4);
    return c;
  }

  [[noreturn]] static void throw_unknown(const char* where, SequenceId s) {
    detail::throw_invalid_argument(where, ": sequence ", s,
                                   " is unknown or was removed (expected one of sequences())");
  }
  Sequence& find(const char* where, SequenceId s) {
    auto it = sequences_.find(s);
    if (it == sequences_.end()) throw_unknown(where, s);
    return it->second;
  }
  const Sequence& find(const char* where, SequenceId s) const {
    auto it = sequences_.find(s);
    if (it == sequences_.end()) throw_unknown(where, s);
    return it->second;
  }
  void check_layer(const char* where, Index layer) const {
    if (layer < 0 || layer >= config_.num_layers)
      throw std::out_of_range(detail::message("kvcache: ", where, ": layer must be in [0, ", config_.num_layers,
                                             "), got ", layer));
  }

  template <class F>
  void for_each_held_block(const Sequence& sequence, Index layer, F&& f) const {
    const Index held =
        (sequence.sizes[detail::count(layer)] + config_.block_size - 1) / config_.block_size;
    for (Index i = 0; i < held; ++i) f(sequence.table(layer, config_)[i]);
  }

  std::int32_t& refcount(Index layer, std::int32_t b) {
    return refcounts_[detail::count(layer * config_.num_blocks + b)];
  }
  std::int32_t refcount(Index layer, std::int32_t b) const {
    return refcounts_[detail::count(layer * config_.num_blocks + b)];
  }
  void retain(Index layer, std::int32_t b) { ++refcount(layer, b); }
  void release(Index layer, std::int32_t b) {
    if (--refcount(layer, b) == 0)
      free_[detail::count(layer * config_.num_blocks + free_count_[detail::count(layer)]++)] = b;
  }
  /// Takes a free block of `layer` (make_free has ensured there is one), held once.
  std::int32_t acquire(Index layer) {
    const std::int32_t b = free_[detail::count(layer * config_.num_blocks + --free_count_[detail::count(layer)])];
    refcount(layer, b) = 1;
    return b;
  }
  bool only_index_holds(std::int32_t node) const {
    for (Index layer = 0; layer < config_.num_layers; ++layer)
      if (refcount(layer, index_.block(node, layer)) != 1) return false;
    return true;
  }
  /// Makes `wanted` blocks of `layer` free, evicting unheld published blocks least recently
  /// used first; throws OutOfBlocks, before evicting anything, when even that is not enough.
  void make_free(const char* where, Index layer, Index wanted) {
    const Index free_now = free_count_[detail::count(layer)];
    if (wanted <= free_now) return;
    const Index evictable = evictable_blocks();
    if (free_now + evictable < wanted)
      throw OutOfBlocks(detail::message("kvcache: ", where, ": needs ", wanted, " free blocks in layer ", layer,
                                       "; the pool has ", free_now, " free and ", evictable,
                                       " evictable of num_blocks() = ", config_.num_blocks));
    auto unheld = [&](std::int32_t node) { return only_index_holds(node); };
    auto released = [&](Index l, std::int32_t b) { release(l, b); };
    while (free_count_[detail::count(layer)] < wanted) index_.evict_one(unheld, released);
  }

  /// Elements between block b and b + 1 of a head (or of a position, BSHD).
  Index block_stride() const { return config_.block_size * storage_.strides().seq; }
  /// Head and position strides within a block (the storage's; batch unused).
  Strides block_strides() const { return storage_.strides(); }
  /// Where block b of `layer` starts (row 0, head 0) in the keys and in the values.
  Index global_block(Index layer, std::int32_t b) const {
    return layer * storage_.strides().batch + b * block_stride();
  }
  T* block_keys(Index at) { return storage_.keys_data() + at; }
  T* block_values(Index at) { return storage_.values_data() + at; }
  const T* block_keys(Index at) const { return storage_.keys_data() + at; }
  const T* block_values(Index at) const { return storage_.values_data() + at; }

  void copy_rows(Index layer, std::int32_t from, std::int32_t to, Index rows) {
    const Index f = global_block(layer, from), t = global_block(layer, to);
    detail::copy_positions(block_keys(f), block_strides(), 0, block_keys(t), block_strides(), 0,
                           1, config_.num_heads, rows, config_.head_dim);
    detail::copy_positions(block_values(f), block_strides(), 0, block_values(t), block_strides(),
                           0, 1, config_.num_heads, rows, config_.head_dim);
  }

  PagedConfig config_;
  /// The pool: layer l is batch row l, of num_blocks * block_size positions in Layout; block b
  /// holds positions [b * block_size, (b + 1) * block_size) of it. With BHSD each head's
  /// blocks are contiguous, so a sequence whose blocks are consecutive (a prefill into a fresh
  /// pool) is one contiguous run per head, as in a contiguous cache.
  detail::KVStorage<T, Layout> storage_;
  std::vector<std::int32_t> refcounts_;  ///< (layer, block): holders (sequences, the index)
  std::vector<std::int32_t> free_;       ///< (layer, num_blocks): a stack of free blocks
  std::vector<Index> free_count_;        ///< (layer): height of the free stack
  detail::PrefixIndex index_;
  std::map<SequenceId, Sequence> sequences_;
  SequenceId next_id_ = 0;
};

namespace detail {
template <class T, class Layout>
struct RecordTraits<PagedKVCache<T, Layout>> : PagedRecord<PagedKVCache<T, Layout>> {};
}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_PAGED_CACHE_HPP
