// kvcache: the prefix index of a paged cache - a radix tree over whole blocks of token ids, so
// that a new sequence can start from the longest block-aligned prefix some earlier sequence
// computed. It stores no K/V: a node names the pool block of every layer that holds its
// tokens' keys and values, and holds one reference on each.
//
// Why a radix tree of blocks rather than a table of chained block hashes (vLLM): a lookup walks
// from the root comparing the token ids themselves, so a hash collision can never hand out the
// wrong keys; the tree says which published blocks are leaves, and eviction takes leaves only,
// so what stays published is always reachable from the root (a chained-hash table can keep a
// block whose parent was evicted: memory held that no lookup can reach). SGLang's
// RadixAttention makes the same choice; ours has block granularity (the unit a paged cache
// shares), so a node's edge is exactly one block of tokens.
//
// Memory: fixed at construction (one node per pool block at most: every node owns a distinct
// layer-0 block), so publishing, matching and evicting never allocate.
#ifndef KVCACHE_DETAIL_PREFIX_INDEX_HPP
#define KVCACHE_DETAIL_PREFIX_INDEX_HPP

#include <kvcache/layout.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace kvcache {
namespace detail {

class PrefixIndex {
 public:
  static constexpr std::int32_t kNone = -1;

  PrefixIndex(Index num_layers, Index num_blocks, Index block_size)
      : num_layers_(num_layers),
        block_size_(block_size),
        nodes_(count(num_blocks)),
        tokens_(count(num_blocks) * count(block_size)),
        blocks_(count(num_blocks) * count(num_layers)),
        node_of_block_(count(num_blocks), kNone),
        pinned_(count(num_blocks)) {
    free_nodes_.reserve(count(num_blocks));
    for (Index n = num_blocks; n-- > 0;) free_nodes_.push_back(static_cast<std::int32_t>(n));
  }

  /// Nodes (published blocks) in the index.
  Index size() const { return static_cast<Index>(nodes_.size() - free_nodes_.size()); }

  /// The pool block of `layer` that node holds.
  std::int32_t block(std::int32_t node, Index layer) const {
    return blocks_[static_cast<std::size_t>(node) * count(num_layers_) + count(layer)];
  }

  /// Walks from the root along the blocks of tokens[0, num_whole_blocks * block_size), calling
  /// on_node(node) for each published block that matches, in order; returns how many matched.
  /// The matched nodes become the most recently used.
  template <class OnNode>
  Index match(const std::int32_t* tokens, Index num_whole_blocks, OnNode&& on_node) {
    ++tick_;
    std::int32_t parent = kNone;
    Index depth = 0;
    for (; depth < num_whole_blocks; ++depth) {
      const std::int32_t child = find_child(parent, tokens + depth * block_size_);
      if (child == kNone) break;
      node(child).last_used = tick_;
      on_node(child);
      parent = child;
    }
    return depth;
  }

  /// Publishes the blocks of tokens[0, num_whole_blocks * block_size): block_of(depth, layer)
  /// names the pool block holding depth's tokens in that layer; retain(layer, block) takes the
  /// index's reference on a newly published one. Blocks already published under the same
  /// tokens are kept (and touched), not replaced. Publishing stops early (nothing is wrong,
  /// less is shared) at a block the index already holds under other tokens: the tokens given
  /// do not describe the sequence's blocks.
  template <class BlockOf, class Retain>
  void publish(const std::int32_t* tokens, Index num_whole_blocks, BlockOf&& block_of,
               Retain&& retain) {
    ++tick_;
    std::int32_t parent = kNone;
    for (Index depth = 0; depth < num_whole_blocks; ++depth) {
      const std::int32_t* edge = tokens + depth * block_size_;
      std::int32_t child = find_child(parent, edge);
      if (child == kNone) {
        child = add_node(parent, edge, [&](Index layer) { return block_of(depth, layer); }, tick_);
        if (child == kNone) return;
        for (Index layer = 0; layer < num_layers_; ++layer) retain(layer, block(child, layer));
      }
      node(child).last_used = tick_;
      parent = child;
    }
  }

  /// Evicts the least recently used leaf that unheld(node) says nothing but the index holds
  /// (ties, the blocks of one publication, go by layer-0 block id: no choice depends on where
  /// a node sits in the arena, so a loaded index evicts as the saved one would), calling
  /// release(layer, block) for its blocks; false when there is none.
  template <class Unheld, class Release>
  bool evict_one(Unheld&& unheld, Release&& release) {
    std::int32_t victim = kNone;
    for (std::int32_t n = 0; n < static_cast<std::int32_t>(nodes_.size()); ++n) {
      const Node& candidate = node(n);
      if (!candidate.in_use || candidate.first_child != kNone || !unheld(n)) continue;
      if (victim == kNone || candidate.last_used < node(victim).last_used ||
          (candidate.last_used == node(victim).last_used && block(n, 0) < block(victim, 0)))
        victim = n;
    }
    if (victim == kNone) return false;
    remove(victim, release);
    return true;
  }

  /// How many nodes evict_one could remove one after another: those whose whole subtree is
  /// unheld (a held node pins itself and its ancestors).
  template <class Unheld>
  Index evictable(Unheld&& unheld) const {
    std::fill(pinned_.begin(), pinned_.end(), false);
    Index pinned = 0;
    for (std::int32_t n = 0; n < static_cast<std::int32_t>(nodes_.size()); ++n) {
      if (!node(n).in_use || unheld(n)) continue;
      for (std::int32_t up = n; up != kNone && !pinned_[static_cast<std::size_t>(up)];
           up = node(up).parent) {
        pinned_[static_cast<std::size_t>(up)] = true;
        ++pinned;
      }
    }
    return size() - pinned;
  }

  /// Calls f(node, parent, tokens) for every node, parents before children.
  template <class F>
  void for_each_node(F&& f) const {
    visit_children(kNone, f);
  }

  /// Calls f(node, parent, tokens) for every node in the order restore() rebuilds the index
  /// from: depth first, parents before children, each node's children in the reverse of their
  /// list order (restore() puts each new child first). So saving in this order, restoring and
  /// saving again writes the same bytes.
  template <class F>
  void for_each_node_to_restore(F&& f) const {
    std::int32_t n = last_child_of(kNone);
    while (n != kNone) {
      f(n, node(n).parent, tokens_.data() + n * block_size_);
      if (node(n).first_child != kNone) {
        n = last_child_of(n);
        continue;
      }
      while (n != kNone && node(n).prev_sibling == kNone) n = node(n).parent;
      if (n != kNone) n = node(n).prev_sibling;
    }
  }

  /// The use count of the last match or publication that touched node, and the latest.
  std::uint64_t last_used(std::int32_t n) const { return node(n).last_used; }
  std::uint64_t tick() const { return tick_; }

  /// Adds a node as a loader found it (persistence): the child of parent (kNone: the root)
  /// with these tokens, blocks (one per layer) and use count. Returns the node, or kNone when
  /// the parent has a child of the same tokens or the layer-0 block is already a node's: such
  /// an index was not written by this class. Takes no references (the caller counts them).
  std::int32_t restore(std::int32_t parent, const std::int32_t* tokens, const std::int32_t* blocks,
                       std::uint64_t last_used) {
    if (find_child(parent, tokens) != kNone) return kNone;
    tick_ = std::max(tick_, last_used);
    return add_node(parent, tokens, [&](Index layer) { return blocks[layer]; }, last_used);
  }

  /// Sets the use count (persistence; at least every node's).
  void set_tick(std::uint64_t tick) { tick_ = std::max(tick_, tick); }

 private:
  struct Node {
    std::int32_t parent = kNone;
    std::int32_t first_child = kNone;
    std::int32_t next_sibling = kNone;
    std::int32_t prev_sibling = kNone;
    std::uint64_t hash = 0;
    std::uint64_t last_used = 0;
    bool in_use = false;
  };

  Node& node(std::int32_t n) { return nodes_[static_cast<std::size_t>(n)]; }
  const Node& node(std::int32_t n) const { return nodes_[static_cast<std::size_t>(n)]; }
  std::int32_t& first_child_of(std::int32_t parent) {
    return parent == kNone ? root_first_child_ : node(parent).first_child;
  }
  std::int32_t first_child_of(std::int32_t parent) const {
    return parent == kNone ? root_first_child_ : node(parent).first_child;
  }

  /// A new child of parent (no sibling has these tokens) holding block_of(layer) in each
  /// layer; kNone when the layer-0 block is already a node's (or, never while that holds, no
  /// node is free).
  template <class BlockOf>
  std::int32_t add_node(std::int32_t parent, const std::int32_t* tokens, BlockOf&& block_of,
                        std::uint64_t last_used) {
    const std::int32_t first = block_of(Index(0));
    if (node_of_block_[static_cast<std::size_t>(first)] != kNone || free_nodes_.empty())
      return kNone;
    const std::int32_t n = free_nodes_.back();
    free_nodes_.pop_back();
    Node& added = node(n);
    added = Node{};
    added.in_use = true;
    added.parent = parent;
    added.hash = hash_of(tokens);
    added.last_used = last_used;
    std::copy_n(tokens, block_size_, tokens_.begin() + n * block_size_);
    for (Index layer = 0; layer < num_layers_; ++layer)
      blocks_[static_cast<std::size_t>(n) * count(num_layers_) + count(layer)] = block_of(layer);
    node_of_block_[static_cast<std::size_t>(first)] = n;
    link(parent, n);
    return n;
  }

  std::int32_t last_child_of(std::int32_t parent) const {
    std::int32_t c = first_child_of(parent);
    while (c != kNone && node(c).next_sibling != kNone) c = node(c).next_sibling;
    return c;
  }

  /// FNV-1a over the block's token ids: a quick filter before comparing the ids themselves.
  std::uint64_t hash_of(const std::int32_t* edge) const {
    std::uint64_t h = 14695981039346656037ull;
    for (Index i = 0; i < block_size_; ++i) {
      h ^= static_cast<std::uint32_t>(edge[i]);
      h *= 1099511628211ull;
    }
    return h;
  }

  std::int32_t find_child(std::int32_t parent, const std::int32_t* edge) const {
    const std::uint64_t h = hash_of(edge);
    for (std::int32_t c = first_child_of(parent); c != kNone; c = node(c).next_sibling)
      if (node(c).hash == h &&
          std::equal(edge, edge + block_size_, tokens_.begin() + c * block_size_))
        return c;
    return kNone;
  }

  void link(std::int32_t parent, std::int32_t child) {
    std::int32_t& head = first_child_of(parent);
    node(child).next_sibling = head;
    if (head != kNone) node(head).prev_sibling = child;
    head = child;
  }

  template <class Release>
  void remove(std::int32_t n, Release&& release) {
    Node& gone = node(n);
    if (gone.prev_sibling != kNone)
      node(gone.prev_sibling).next_sibling = gone.next_sibling;
    else
      first_child_of(gone.parent) = gone.next_sibling;
    if (gone.next_sibling != kNone) node(gone.next_sibling).prev_sibling = gone.prev_sibling;
    node_of_block_[static_cast<std::size_t>(block(n, 0))] = kNone;
    for (Index layer = 0; layer < num_layers_; ++layer) release(layer, block(n, layer));
    gone.in_use = false;
    free_nodes_.push_back(n);
  }

  template <class F>
  void visit_children(std::int32_t parent, F& f) const {
    // Iterative depth-first walk (a long prompt makes a deep chain).
    std::int32_t n = first_child_of(parent);
    while (n != kNone) {
      f(n, node(n).parent, tokens_.data() + n * block_size_);
      if (node(n).first_child != kNone) {
        n = node(n).first_child;
        continue;
      }
      while (n != kNone && node(n).next_sibling == kNone) n = node(n).parent;
      if (n != kNone) n = node(n).next_sibling;
    }
  }

  Index num_layers_;
  Index block_size_;
  std::vector<Node> nodes_;
  std::vector<std::int32_t> tokens_;        ///< (node, block_size): the edge's token ids
  std::vector<std::int32_t> blocks_;        ///< (node, layer): pool blocks held
  std::vector<std::int32_t> node_of_block_; ///< layer-0 block -> the node that holds it
  std::vector<std::int32_t> free_nodes_;
  mutable std::vector<bool> pinned_;        ///< scratch of evictable()
  std::int32_t root_first_child_ = kNone;
  std::uint64_t tick_ = 0;
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_PREFIX_INDEX_HPP
