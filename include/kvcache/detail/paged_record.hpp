// kvcache: the record of a PagedKVCache (kind 8, docs/persistence_format.md) - its RecordTraits,
// which paged_cache.hpp derives from PagedRecord (a friend of the pool), kept apart from the
// pool's bookkeeping.
#ifndef KVCACHE_DETAIL_PAGED_RECORD_HPP
#define KVCACHE_DETAIL_PAGED_RECORD_HPP

#include <kvcache/detail/prefix_index.hpp>
#include <kvcache/detail/record_codec.hpp>

#include <algorithm>
#include <cassert>
#include <cstdint>
#include <istream>
#include <limits>
#include <ostream>
#include <set>
#include <utility>
#include <vector>

namespace kvcache {
namespace detail {

template <class Pool>
struct PagedRecord {
  using T = typename Pool::element_type;
  using Layout = typename Pool::layout_type;
  using SequenceId = typename Pool::SequenceId;
  /// A published prefix's parent field when it hangs from the root.
  static constexpr std::uint32_t kNoParent = 0xFFFFFFFFu;

  static constexpr CacheKind kind = CacheKind::paged_cache;
  /// The numbers of a paged pool's record.
  struct Header {
    Index num_layers = 0;
    Index num_blocks = 0;
    Index block_size = 0;
    Index num_heads = 0;
    Index head_dim = 0;
    Index num_sequences = 0;
    Index published_blocks = 0;
    Index next_sequence_id = 0;
  };
  static constexpr std::array<HeaderField<Header>, 8> fields = {{
      {"num_layers", &Header::num_layers, true},
      {"num_blocks", &Header::num_blocks, true},
      {"block_size", &Header::block_size, true},
      {"num_heads", &Header::num_heads, true},
      {"head_dim", &Header::head_dim, true},
      {"num_sequences", &Header::num_sequences},
      {"published_blocks", &Header::published_blocks},
      {"next_sequence_id", &Header::next_sequence_id},
  }};

  static Header header(const Pool& pool) {
    Header h;
    h.num_layers = pool.config_.num_layers;
    h.num_blocks = pool.config_.num_blocks;
    h.block_size = pool.config_.block_size;
    h.num_heads = pool.config_.num_heads;
    h.head_dim = pool.config_.head_dim;
    h.num_sequences = static_cast<Index>(pool.sequences_.size());
    h.published_blocks = pool.index_.size();
    h.next_sequence_id = pool.next_id_;
    return h;
  }

  /// The sequences, the published prefixes depth first, the use count, the free stacks, then
  /// every block's filled rows (keys, values) layer by layer.
  static void write_payload(const Pool& pool, const Header&, Writer& writer) {
    for (const auto& [id, sequence] : pool.sequences_) {
      writer.write_unsigned(static_cast<std::uint64_t>(id), "sequence id");
      for (Index size : sequence.sizes) writer.write_unsigned(static_cast<std::uint64_t>(size), "sequence size");
      for (Index layer = 0; layer < pool.config_.num_layers; ++layer)
        pool.for_each_held_block(sequence, layer, [&](std::int32_t b) {
          writer.write_unsigned(static_cast<std::uint32_t>(b), "block table");
        });
    }
    // Nodes depth first; a node names its parent by its place in this list.
    std::vector<std::int32_t> ordinal(detail::count(pool.config_.num_blocks), -1);
    std::int32_t written = 0;
    pool.index_.for_each_node_to_restore([&](std::int32_t node, std::int32_t parent, const std::int32_t* tokens) {
      ordinal[detail::count(node)] = written++;
      writer.write_unsigned(parent == PrefixIndex::kNone
                                ? kNoParent
                                : static_cast<std::uint32_t>(ordinal[detail::count(parent)]),
                            "prefix parent");
      writer.write_unsigned(pool.index_.last_used(node), "prefix last use");
      for (Index i = 0; i < pool.config_.block_size; ++i)
        writer.write_unsigned(static_cast<std::uint32_t>(tokens[i]), "prefix tokens");
      for (Index layer = 0; layer < pool.config_.num_layers; ++layer)
        writer.write_unsigned(static_cast<std::uint32_t>(pool.index_.block(node, layer)), "prefix blocks");
    });
    writer.write_unsigned(pool.index_.tick(), "prefix use count");
    for (Index layer = 0; layer < pool.config_.num_layers; ++layer) {
      const Index n = pool.free_count_[detail::count(layer)];
      writer.write_unsigned(static_cast<std::uint64_t>(n), "free count");
      for (Index i = 0; i < n; ++i)
        writer.write_unsigned(
            static_cast<std::uint32_t>(pool.free_[detail::count(layer * pool.config_.num_blocks + i)]),
            "free blocks");
    }
    const std::vector<Index> fill = pool.filled_rows();
    for (Index layer = 0; layer < pool.config_.num_layers; ++layer)
      for (std::int32_t b = 0; b < static_cast<std::int32_t>(pool.config_.num_blocks); ++b) {
        const Index rows = fill[detail::count(layer * pool.config_.num_blocks + b)];
        const Index at = pool.global_block(layer, b);
        write_rows<Layout>(writer, 1, pool.config_.num_heads, rows, pool.config_.head_dim,
                           [&](Index, Index h, Index r) { return row_at(pool.block_keys(at), pool.block_strides(), 0, h, r); },
                           "keys");
        write_rows<Layout>(writer, 1, pool.config_.num_heads, rows, pool.config_.head_dim,
                           [&](Index, Index h, Index r) { return row_at(pool.block_values(at), pool.block_strides(), 0, h, r); },
                           "values");
      }
  }

  struct LoadedSequence {
    SequenceId id;
    std::vector<Index> sizes;
    std::vector<std::vector<std::int32_t>> tables;
  };
  struct LoadedNode {
    std::uint32_t parent;
    std::uint64_t last_used;
    std::vector<std::int32_t> tokens, blocks;
  };
  /// What a record holds after its header, read and checked.
  struct Payload {
    std::vector<LoadedSequence> sequences;
    std::vector<LoadedNode> nodes;
    std::uint64_t tick = 0;
    std::vector<std::vector<std::int32_t>> free_lists;  ///< (layer)
    std::vector<Index> fill;                             ///< (layer, block): filled rows
    std::vector<T> keys_and_values;
  };

  static Payload read_payload(Reader& reader, const Header& h, const LoadLimits& limits) {
    require_at_most(reader, "num_blocks", h.num_blocks, "2^31 - 1",
                    std::numeric_limits<std::int32_t>::max());
    require_at_most(reader, "published_blocks", h.published_blocks, "num_blocks", h.num_blocks);
    require_at_most(reader, "num_sequences", h.num_sequences, "next_sequence_id",
                    h.next_sequence_id);
    const Index pool_bytes = checked_product(
        reader, "K/V storage bytes",
        {2, h.num_layers, h.num_blocks, h.block_size, h.num_heads, h.head_dim, Index(sizeof(T))});
    const Index table_bytes = checked_product(
        reader, "block table bytes", {h.num_sequences, h.num_layers, h.num_blocks, 4});
    // The pool's bookkeeping counts too (per layer and block: a reference count, a free-stack
    // entry, and this function's three temporaries; per block: an index node, its tokens and
    // blocks), so that a record of tiny blocks cannot pass on its K/V bytes alone.
    const Index per_layer_block = 4 + 4 + 3 * 8;
    const Index per_block = 64 + 4 * h.block_size + 4 * h.num_layers + 4;
    const Index bookkeeping = checked_sum(
        reader, "pool bookkeeping bytes",
        checked_product(reader, "pool bookkeeping bytes", {h.num_layers, h.num_blocks, per_layer_block}),
        checked_product(reader, "pool bookkeeping bytes", {h.num_blocks, per_block}));
    require_within_limit(reader,
                         checked_sum(reader, "pool bytes",
                                     checked_sum(reader, "pool bytes", pool_bytes, table_bytes),
                                     bookkeeping),
                         limits);
    const Index max_size = h.num_blocks * h.block_size;  // bounded by pool_bytes
    const std::size_t layers = detail::count(h.num_layers);
    auto block_id = [&](std::uint32_t value, const char* what) {
      if (value >= static_cast<std::uint64_t>(h.num_blocks))
        reader.fail(what, ": expected a block id below num_blocks = ", h.num_blocks, ", got ", value);
      return static_cast<std::int32_t>(value);
    };

    Payload payload;
    std::vector<LoadedSequence>& loaded = payload.sequences;
    std::vector<Index> holders(layers * detail::count(h.num_blocks), 0);
    std::vector<Index>& fill = payload.fill;
    fill.assign(holders.size(), 0);
    std::vector<Index> seen(holders.size(), -1);  // the sequence that last listed a block
    for (Index s = 0; s < h.num_sequences; ++s) {
      LoadedSequence seq;
      const std::uint64_t id = reader.read_unsigned<std::uint64_t>("sequence id");
      const Index floor = loaded.empty() ? 0 : loaded.back().id + 1;
      if (id < static_cast<std::uint64_t>(floor) || id >= static_cast<std::uint64_t>(h.next_sequence_id))
        reader.fail("sequence id: expected increasing ids in [", floor, ", next_sequence_id = ",
                    h.next_sequence_id, "), got ", id);
      seq.id = static_cast<SequenceId>(id);
      for (std::size_t l = 0; l < layers; ++l) {
        const std::uint64_t size = reader.read_unsigned<std::uint64_t>("sequence size");
        if (size > static_cast<std::uint64_t>(max_size))
          reader.fail("sequence size: expected at most num_blocks * block_size = ", max_size, ", got ", size);
        seq.sizes.push_back(static_cast<Index>(size));
      }
      for (std::size_t l = 0; l < layers; ++l) {
        const Index held = (seq.sizes[l] + h.block_size - 1) / h.block_size;
        std::vector<std::int32_t> table;
        for (Index i = 0; i < held; ++i) {
          const std::int32_t b = block_id(reader.read_unsigned<std::uint32_t>("block table"), "block table");
          const std::size_t slot = l * detail::count(h.num_blocks) + detail::count(b);
          if (seen[slot] == s)
            reader.fail("block table: block ", b, " of layer ", l, " is listed twice by sequence ", id);
          seen[slot] = s;
          ++holders[slot];
          fill[slot] = std::max(fill[slot], std::min(h.block_size, seq.sizes[l] - i * h.block_size));
          table.push_back(b);
        }
        seq.tables.push_back(std::move(table));
      }
      loaded.push_back(std::move(seq));
    }

    std::vector<LoadedNode>& nodes = payload.nodes;
    std::set<std::pair<std::uint32_t, std::vector<std::int32_t>>> edges;
    std::vector<bool> first_blocks(detail::count(h.num_blocks), false);
    std::vector<std::uint32_t> path;  // the previous node and its ancestors (depth-first order)
    for (Index n = 0; n < h.published_blocks; ++n) {
      LoadedNode node;
      node.parent = reader.read_unsigned<std::uint32_t>("prefix parent");
      while (!path.empty() && path.back() != node.parent) path.pop_back();
      if (node.parent != kNoParent && path.empty())
        reader.fail("prefix parent: expected 0xFFFFFFFF or the previous node or one of its "
                    "ancestors (depth-first order), got ", node.parent, " for node ", n);
      path.push_back(static_cast<std::uint32_t>(n));
      node.last_used = reader.read_unsigned<std::uint64_t>("prefix last use");
      for (Index i = 0; i < h.block_size; ++i)
        node.tokens.push_back(static_cast<std::int32_t>(reader.read_unsigned<std::uint32_t>("prefix tokens")));
      for (std::size_t l = 0; l < layers; ++l) {
        const std::int32_t b = block_id(reader.read_unsigned<std::uint32_t>("prefix blocks"), "prefix blocks");
        const std::size_t slot = l * detail::count(h.num_blocks) + detail::count(b);
        ++holders[slot];
        fill[slot] = h.block_size;
        node.blocks.push_back(b);
      }
      if (first_blocks[detail::count(node.blocks[0])])
        reader.fail("prefix blocks: block ", node.blocks[0], " of layer 0 belongs to two nodes");
      first_blocks[detail::count(node.blocks[0])] = true;
      if (!edges.emplace(node.parent, node.tokens).second)
        reader.fail("prefix tokens: node ", n, " repeats a sibling's tokens");
      nodes.push_back(std::move(node));
    }
    const std::uint64_t tick = reader.read_unsigned<std::uint64_t>("prefix use count");
    payload.tick = tick;
    for (const LoadedNode& node : nodes)
      if (node.last_used > tick)
        reader.fail("prefix last use: expected at most the use count ", tick, ", got ", node.last_used);

    std::vector<std::vector<std::int32_t>>& free_lists = payload.free_lists;
    free_lists.resize(layers);
    for (std::size_t l = 0; l < layers; ++l) {
      const std::uint64_t n = reader.read_unsigned<std::uint64_t>("free count");
      Index unheld = 0;
      for (Index b = 0; b < h.num_blocks; ++b)
        unheld += holders[l * detail::count(h.num_blocks) + detail::count(b)] == 0 ? 1 : 0;
      if (n != static_cast<std::uint64_t>(unheld))
        reader.fail("free count of layer ", l, ": expected ", unheld, " (the blocks nothing holds), got ", n);
      for (Index i = 0; i < unheld; ++i) {
        const std::int32_t b = block_id(reader.read_unsigned<std::uint32_t>("free blocks"), "free blocks");
        Index& marker = holders[l * detail::count(h.num_blocks) + detail::count(b)];
        if (marker != 0)
          reader.fail("free blocks: block ", b, " of layer ", l, " is held or listed twice");
        marker = -1;  // listed as free
        free_lists[l].push_back(b);
      }
    }
    Index rows = 0;
    for (Index f : fill) rows += f;  // at most the pool's rows
    payload.keys_and_values =
        reader.read_elements<T>(static_cast<std::uint64_t>(rows * 2 * h.num_heads * h.head_dim), "keys and values");
    return payload;
  }

  static Pool build(const Header& h, Payload&& payload) {
    const std::size_t layers = detail::count(h.num_layers);

    typename Pool::config_type config;
    config.num_layers = h.num_layers;
    config.num_blocks = h.num_blocks;
    config.block_size = h.block_size;
    config.num_heads = h.num_heads;
    config.head_dim = h.head_dim;
    Pool pool(config);
    for (LoadedSequence& seq : payload.sequences) {
      typename Pool::Sequence& sequence = pool.sequences_.emplace(seq.id, typename Pool::Sequence(config)).first->second;
      for (std::size_t l = 0; l < layers; ++l) {
        sequence.sizes[l] = seq.sizes[l];
        std::copy(seq.tables[l].begin(), seq.tables[l].end(), sequence.table(static_cast<Index>(l), config));
        for (std::int32_t b : seq.tables[l]) pool.retain(static_cast<Index>(l), b);
      }
    }
    std::vector<std::int32_t> restored;
    for (const LoadedNode& node : payload.nodes) {
      const std::int32_t parent = node.parent == kNoParent ? PrefixIndex::kNone
                                                           : restored[node.parent];
      restored.push_back(pool.index_.restore(parent, node.tokens.data(), node.blocks.data(), node.last_used));
      assert(restored.back() != PrefixIndex::kNone && "kvcache: checked above");
      for (std::size_t l = 0; l < layers; ++l) pool.retain(static_cast<Index>(l), node.blocks[l]);
    }
    pool.index_.set_tick(payload.tick);
    for (std::size_t l = 0; l < layers; ++l) {
      pool.free_count_[l] = static_cast<Index>(payload.free_lists[l].size());
      std::copy(payload.free_lists[l].begin(), payload.free_lists[l].end(),
                pool.free_.begin() + static_cast<std::ptrdiff_t>(l * detail::count(h.num_blocks)));
    }
    const T* next = payload.keys_and_values.data();
    for (Index layer = 0; layer < h.num_layers; ++layer)
      for (std::int32_t b = 0; b < static_cast<std::int32_t>(h.num_blocks); ++b) {
        const Index filled = payload.fill[detail::count(layer * h.num_blocks + b)];
        const Index at = pool.global_block(layer, b);
        for (T* base : {pool.block_keys(at), pool.block_values(at)})
          for_each_row<Layout>(1, h.num_heads, filled, [&](Index, Index head, Index r) {
            std::copy_n(next, h.head_dim, row_at(base, pool.block_strides(), 0, head, r));
            next += h.head_dim;
          });
      }
    pool.next_id_ = h.next_sequence_id;
    return pool;
  }
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_PAGED_RECORD_HPP
