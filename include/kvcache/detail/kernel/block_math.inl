// kvcache: the vector loops of the kernel - dot products, exponentials, value sums - written once
// over the variant's vector type (FloatVec, or PortableVec for double) and compiled once per
// variant: detail/kernel/variants.hpp includes this file inside each variant's namespace and
// target region. No include guard and no includes, for that reason.
//
// Every loop adds in an order fixed by the code (lane l of an accumulator holds the terms of
// the elements with index % width == l; lanes are added in a fixed tree by V::reduce), never by
// where the data sits: the same inputs give the same bits on every call, in any grouping.

/// The variant's vector of Acc: FloatVec for float, the portable vector for double.
template <class Acc>
struct VecFor {
  using type = PortableVec<Acc, 2>;
};
template <>
struct VecFor<float> {
  using type = FloatVec;
};
template <class Acc>
using VecOf = typename VecFor<Acc>::type;

/// The largest (Largest) or smallest x[j], j in [0, n), ignoring NaN; `none` when there is no
/// such element. A vector at a time: one max (min) chain per lane instead of one through n.
template <bool Largest, class Acc>
Acc extreme_of(const Acc* x, Index n, Acc none) {
  using V = VecOf<Acc>;
  // std::max / std::min keep their first argument when the second is NaN.
  auto pick = [](Acc kept, Acc next) { return Largest ? std::max(kept, next) : std::min(kept, next); };
  Acc result = none;
  Index j = 0;
  if (n >= V::width) {
    V lane = V::broadcast(none);
    // Invariant: lane l = the extreme non-NaN x[i], i < j, i % width == l (where a lane of
    // either operand is NaN, vmaxps / vminps yield the second operand, lane).
    for (; j + V::width <= n; j += V::width)
      lane = Largest ? V::max(V::load(x + j), lane) : V::min(V::load(x + j), lane);
    // No lane is NaN (none is not): the lanes' extreme is the same in any order.
    result = Largest ? V::max_lanes(lane) : V::min_lanes(lane);
  }
  for (; j < n; ++j) result = pick(result, x[j]);
  return result;
}

/// Whether some w[j], j in [0, n), is 0, for weights w[j] >= 0 (exponentials times a
/// positive scale) or NaN (ignored: a NaN weight makes its row NaN anyway).
template <class Acc>
bool any_zero_weight(const Acc* w, Index n) {
  return extreme_of<false>(w, n, std::numeric_limits<Acc>::infinity()) == Acc(0);
}

/// The largest s[j], j in [0, n), ignoring NaN (-inf when n is 0 or every s[j] is -inf or
/// NaN).
template <class Acc>
Acc max_score(const Acc* s, Index n) {
  return extreme_of<true>(s, n, -std::numeric_limits<Acc>::infinity());
}

/// out[r * row_stride + k] += the terms i in [from, head_dim) of rows[r] . keys[k]: the
/// channels past the last whole vector, one by one (kept out of dot_tile so its accumulators
/// stay in registers).
template <int Rows, int Keys, class Source, class Acc>
void dot_tail(const Acc* const* rows, const typename Source::Element* const* keys, Index from,
              Index head_dim, Acc* out, Index row_stride) {
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
    #pragma GCC unroll 16
    for (int k = 0; k < Keys; ++k) {
      Acc tail = 0;
      for (Index i = from; i < head_dim; ++i)
        tail += rows[r][i] * Source::template scalar<Acc>(keys[k], i);
      out[r * row_stride + k] += tail;
    }
}

/// Whether the vector loops read rows of Element two vectors at a time, split by parity
/// (V::load_pairs: lane i of the first vector holds element c + 2i, of the second c + 2i + 1):
/// bfloat16, which a shift and a mask widen that way at half the instructions of widening in
/// order. The scores then need each query row in the same order (to_score_order); the value
/// sums hold their accumulators by parity within a strip (accumulate_pair_strip).
template <class Element>
inline constexpr bool kLoadsByParity = std::is_same_v<Element, Eigen::bfloat16>;

/// Puts a query row (head_dim elements) in the order dot_tile reads it against keys of
/// Element: with kLoadsByParity, each whole chunk of 2 * width channels deinterleaved (its even
/// channels, then its odd ones); the channels past the last whole chunk, and rows against other
/// elements, stay in order.
template <class Element, class Acc>
void to_score_order(Acc* row, Index head_dim) {
  using V = VecOf<Acc>;
  if constexpr (kLoadsByParity<Element>) {
    for (Index c = 0; c + 2 * V::width <= head_dim; c += 2 * V::width) {
      V even, odd;
      V::deinterleave(V::load(row + c), V::load(row + c + V::width), even, odd);
      even.store(row + c);
      odd.store(row + c + V::width);
    }
  } else {
    (void)row;
    (void)head_dim;
  }
}

/// One vector of elements c .. c + width - 1 of a row of the source (Stored<T>), converted to
/// Acc in registers.
template <class Source, class V>
KVCACHE_ALWAYS_INLINE V load_from(const typename Source::Element* row, Index c) {
  return V::load(row + c);
}

/// A tile of dot products: out[r * row_stride + k] = rows[r] . keys[k] for Rows query rows and
/// Keys keys, Rows * Keys = V::tile_dots (4 x 4 or 1 x 16 with AVX-512). Each key chunk is loaded
/// (and widened) once for every row, each query chunk once for every key; every dot product
/// has its own accumulator (Rows * Keys independent FMA chains), and V::reduce adds the lanes
/// of all of them at once by one fixed tree per dot product. So a score gets the same
/// operations whatever tile it is computed in: a caller may fill unused places of a tile with
/// copies of a used row or key. Inlined into its caller: the accumulators stay in registers.
/// Keys of kLoadsByParity elements are read 2 * width channels at a time by parity, against
/// query rows in to_score_order; the rest of the channels a vector at a time in order.
template <int Rows, int Keys, class Source, class Acc>
KVCACHE_ALWAYS_INLINE void dot_tile(const Acc* const* rows,
                                    const typename Source::Element* const* keys, Index head_dim,
                                    Acc* out, Index row_stride) {
  using V = VecOf<Acc>;
  static_assert(Rows * Keys == V::tile_dots, "kvcache: a tile holds V::tile_dots dot products");
  constexpr Index kWidth = V::width;
  V acc[count(Rows * Keys)];
  #pragma GCC unroll 16
  for (int i = 0; i < Rows * Keys; ++i) acc[i] = V::zero();
  Index c = 0;
  if constexpr (kLoadsByParity<typename Source::Element>) {
    // Invariant: lane l of acc[r * Keys + k] = the sum, chunk by chunk in order, of
    // rows[r] . keys[k] over the channels 2l and 2l + 1 of each chunk of 2 * kWidth below c
    // (the even one added first). The query rows stay in registers; keys come one at a time.
    for (; c + 2 * kWidth <= head_dim; c += 2 * kWidth) {
      V query_even[count(Rows)], query_odd[count(Rows)];
      #pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r) {
        query_even[r] = V::load(rows[r] + c);
        query_odd[r] = V::load(rows[r] + c + kWidth);
      }
      #pragma GCC unroll 16
      for (int k = 0; k < Keys; ++k) {
        V even, odd;
        V::load_pairs(keys[k] + c, even, odd);
        #pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          acc[r * Keys + k] = V::mul_add(query_even[r], even, acc[r * Keys + k]);
          acc[r * Keys + k] = V::mul_add(query_odd[r], odd, acc[r * Keys + k]);
        }
      }
    }
  }
  // Invariant: lane l of acc[r * Keys + k] = the chunks' terms (if any), then the sum of
  // rows[r][i] * keys[k][i] over the channels i past them and below c with i % kWidth == l.
  for (; c + kWidth <= head_dim; c += kWidth) {
    V key[count(Keys)];
    #pragma GCC unroll 16
    for (int k = 0; k < Keys; ++k) key[k] = load_from<Source, V>(keys[k], c);
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const V query = V::load(rows[r] + c);
      #pragma GCC unroll 16
      for (int k = 0; k < Keys; ++k) acc[r * Keys + k] = V::mul_add(query, key[k], acc[r * Keys + k]);
    }
  }
  V::template reduce<Rows>(acc, out, row_stride);
  if (c < head_dim) dot_tail<Rows, Keys, Source>(rows, keys, c, head_dim, out, row_stride);
}

/// Scores of n keys (key j at key_rows(j), a RowsOf) for num_rows query rows
/// (row r at queries + r * head_dim): out[r * out_stride + j] = q_r . k_j. Tiles of 4 rows x
/// (tile_dots / 4) keys, or 1 x tile_dots when there is one row; a whole tile is stored
/// straight into `out`, a partial one (it repeats its last row or key) through a small array.
/// `before_key(j)` runs before the tile holding key j is computed (prefetch).
template <class Source, class Acc, class KeyRows, class BeforeKey>
void score_block(const Acc* queries, Index num_rows, Index head_dim, const KeyRows& key_rows,
                 Index n, Acc* out, Index out_stride, BeforeKey&& before_key) {
  using V = VecOf<Acc>;
  using Element = typename Source::Element;
  constexpr int kDots = V::tile_dots;
  auto tiles = [&](auto rows_tag) {
    constexpr int kRows = decltype(rows_tag)::value, kKeys = kDots / kRows;
    for (Index j = 0; j < n; j += kKeys) {
      const Element* key[count(kKeys)];
      #pragma GCC unroll 16
      for (int k = 0; k < kKeys; ++k) {
        const Index at = std::min(j + k, n - 1);
        key[k] = key_rows(at);
        if (j + k < n) before_key(j + k);
      }
      for (Index row = 0; row < num_rows; row += kRows) {
        const Acc* query[count(kRows)];
        #pragma GCC unroll 16
        for (int r = 0; r < kRows; ++r) query[r] = queries + std::min(row + r, num_rows - 1) * head_dim;
        if (row + kRows <= num_rows && j + kKeys <= n) {
          dot_tile<kRows, kKeys, Source>(query, key, head_dim, out + row * out_stride + j, out_stride);
          continue;
        }
        Acc dots[count(kDots)];
        dot_tile<kRows, kKeys, Source>(query, key, head_dim, dots, kKeys);
        for (int r = 0; r < kRows && row + r < num_rows; ++r)
          for (int k = 0; k < kKeys && j + k < n; ++k)
            out[(row + r) * out_stride + j + k] = dots[r * kKeys + k];
      }
    }
  };
  if (num_rows == 1)
    tiles(std::integral_constant<int, 1>{});
  else
    tiles(std::integral_constant<int, 4>{});
}

/// The softmax weights of a row of scores relative to `max`: s[j] = exp(s[j] - max), exactly 0
/// where s[j] is -inf (a masked key); returns their sum. Lanes past the last whole vector use
/// std::exp, by index. The sum adds in an order fixed by n alone (never by where the scores
/// sit): lane l of a vector sums the weights j with j % width == l over the whole vectors, the
/// lanes are added by V::sum_lanes's fixed tree, then the tail one by one.
template <class Acc>
Acc exp_weights(Acc* s, Index n, Acc max) {
  using V = VecOf<Acc>;
  Index j = 0;
  V total = V::zero();
  for (; j + V::width <= n; j += V::width) {
    const V weights = V::exp_shifted(V::load(s + j), max);
    weights.store(s + j);
    total = V::add(total, weights);
  }
  Acc sum = V::sum_lanes(total);
  for (; j < n; ++j) {
    s[j] = s[j] == -std::numeric_limits<Acc>::infinity() ? Acc(0) : std::exp(s[j] - max);
    sum += s[j];
  }
  return sum;
}

/// acc[r][c] += weight[r] * value[c] for `Rows` accumulator rows and one value row: the value
/// chunk is loaded once for all rows. The path that skips single keys uses it.
template <int Rows, class Acc, class T>
void axpy_rows(Acc* const* acc, const Acc* weight, const T* value, Index head_dim) {
  using V = VecOf<Acc>;
  V w[count(Rows)];
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r) w[r] = V::broadcast(weight[r]);
  Index c = 0;
  for (; c + V::width <= head_dim; c += V::width) {
    const V v = V::load(value + c);
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) V::mul_add(w[r], v, V::load(acc[r] + c)).store(acc[r] + c);
  }
  for (; c < head_dim; ++c)
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) acc[r][c] += weight[r] * static_cast<Acc>(value[c]);
}

/// Asks for the cache lines of rows [0, count) of a K/V block (row j at rows(j), `bytes`
/// long) one row at a time, as a loop reaches row j: the memory streams stay busy while the
/// loop computes. count 0: nothing.
template <class T>
struct RowPrefetch {
  RowsOf<T> rows{};
  Index count = 0;
  Index bytes = 0;

  void operator()(Index j) const {
    if (j >= count) return;
    const char* start = reinterpret_cast<const char*>(rows(j));
    for (Index b = 0; b < bytes; b += kCacheLine) FloatVec::prefetch(start + b);
  }
};

/// The prefetch of the rows of a block, head_dim elements each.
template <class T>
RowPrefetch<T> prefetch_rows(const RowsOf<T>& rows, Index count, Index head_dim) {
  return {rows, count, head_dim * Index(sizeof(T))};
}

/// Columns [c, c + Strip * width) of accumulate_rows: Rows * Strip accumulators stay in
/// registers while the n value rows stream past, each weight broadcast once per Strip vectors.
template <int Rows, int Strip, class Source, class Acc, class ValueRows, class Prefetch>
KVCACHE_ALWAYS_INLINE void accumulate_strip(Acc* const* acc, const Acc* weights,
                                            Index weight_stride, const ValueRows& value_rows,
                                            Index n, Index c, const Prefetch& prefetch) {
  using V = VecOf<Acc>;
  constexpr Index kWidth = V::width;
  V lane[count(Rows)][count(Strip)];
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
    #pragma GCC unroll 16
    for (int s = 0; s < Strip; ++s) lane[r][s] = V::load(acc[r] + c + s * kWidth);
  // Invariant: lane[r][s] = acc[r][c + s * kWidth ...] plus the terms of value rows < j.
  for (Index j = 0; j < n; ++j) {
    prefetch(j);
    const auto* value = value_rows(j);
    V v[count(Strip)];
    #pragma GCC unroll 16
    for (int s = 0; s < Strip; ++s) v[s] = load_from<Source, V>(value, c + s * kWidth);
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const V w = V::broadcast(weights[r * weight_stride + j]);
      #pragma GCC unroll 16
      for (int s = 0; s < Strip; ++s) lane[r][s] = V::mul_add(w, v[s], lane[r][s]);
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
    #pragma GCC unroll 16
    for (int s = 0; s < Strip; ++s) lane[r][s].store(acc[r] + c + s * kWidth);
}

/// Columns [c, c + 2 * Pairs * width) of a value sum over n rows, for `Rows` accumulator rows,
/// whose rows are read a pair of vectors at a time by parity: load_pair(j, p, even, odd) gives
/// row j's channels c + 2p * width .. c + (2p + 2) * width - 1, even lane i = the pair's channel
/// 2i, odd lane i = channel 2i + 1. The accumulators are held by parity too: deinterleaved
/// once when loaded, interleaved back once when stored. Each element receives the operations
/// of accumulate_strip, in the same order: only the lane it sits in differs.
template <int Rows, int Pairs, class Acc, class Prefetch, class LoadPair>
KVCACHE_ALWAYS_INLINE void accumulate_pair_strip(Acc* const* acc, const Acc* weights,
                                                 Index weight_stride, Index n, Index c,
                                                 const Prefetch& prefetch, LoadPair&& load_pair) {
  using V = VecOf<Acc>;
  constexpr Index kWidth = V::width;
  V even[count(Rows)][count(Pairs)], odd[count(Rows)][count(Pairs)];
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
    #pragma GCC unroll 16
    for (int p = 0; p < Pairs; ++p)
      V::deinterleave(V::load(acc[r] + c + 2 * p * kWidth), V::load(acc[r] + c + (2 * p + 1) * kWidth),
                      even[r][p], odd[r][p]);
  // Invariant: lane i of even[r][p] (odd[r][p]) = acc[r][c + 2p * kWidth + 2i (+ 1)] plus the
  // terms of rows < j.
  for (Index j = 0; j < n; ++j) {
    prefetch(j);
    V value_even[count(Pairs)], value_odd[count(Pairs)];
    #pragma GCC unroll 16
    for (int p = 0; p < Pairs; ++p) load_pair(j, p, value_even[p], value_odd[p]);
    #pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const V w = V::broadcast(weights[r * weight_stride + j]);
      #pragma GCC unroll 16
      for (int p = 0; p < Pairs; ++p) {
        even[r][p] = V::mul_add(w, value_even[p], even[r][p]);
        odd[r][p] = V::mul_add(w, value_odd[p], odd[r][p]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < Rows; ++r)
    #pragma GCC unroll 16
    for (int p = 0; p < Pairs; ++p) {
      V low, high;
      V::interleave(even[r][p], odd[r][p], low, high);
      low.store(acc[r] + c + 2 * p * kWidth);
      high.store(acc[r] + c + (2 * p + 1) * kWidth);
    }
}

/// acc[r][c] += sum_j weight[r][j] * values[j][c] for `Rows` accumulator rows over `n` value
/// rows (weights of row r at weights + r * weight_stride), a strip of columns at a time
/// (V::accumulator_strip vectors, then 2, then 1: 16 of AVX-512's 32 registers hold
/// accumulators), so each accumulator is loaded and stored once per block; rows of
/// kLoadsByParity elements first by pairs of vectors (accumulate_pair_strip, as many pairs as
/// a strip holds, then one). Element (r, c) receives exactly the operations of n calls of
/// axpy_rows, in the same order, whatever strip it falls in. The first strip runs `prefetch`
/// row by row.
template <int Rows, class Source, class Acc, class ValueRows, class Prefetch>
KVCACHE_ALWAYS_INLINE void accumulate_rows(Acc* const* acc, const Acc* weights, Index weight_stride,
                                           const ValueRows& value_rows, Index n, Index head_dim,
                                           Prefetch prefetch) {
  using V = VecOf<Acc>;
  constexpr Index kWidth = V::width;
  constexpr int kStrip = V::accumulator_strip;
  Index c = 0;
  if constexpr (kLoadsByParity<typename Source::Element>) {
    auto pairs = [&](auto pairs_tag) {
      constexpr int kPairs = decltype(pairs_tag)::value;
      for (; c + 2 * kPairs * kWidth <= head_dim; c += 2 * kPairs * kWidth, prefetch = Prefetch{})
        accumulate_pair_strip<Rows, kPairs>(acc, weights, weight_stride, n, c, prefetch,
                                            [&](Index j, int p, V& even, V& odd) {
                                              V::load_pairs(value_rows(j) + c + 2 * p * kWidth, even, odd);
                                            });
    };
    constexpr int kPairs = kStrip / 2 > 0 ? kStrip / 2 : 1;
    pairs(std::integral_constant<int, kPairs>{});
    if constexpr (kPairs > 1) pairs(std::integral_constant<int, 1>{});
  }
  for (; c + kStrip * kWidth <= head_dim; c += kStrip * kWidth, prefetch = Prefetch{})
    accumulate_strip<Rows, kStrip, Source>(acc, weights, weight_stride, value_rows, n, c, prefetch);
  if constexpr (kStrip > 2) {
    for (; c + 2 * kWidth <= head_dim; c += 2 * kWidth, prefetch = Prefetch{})
      accumulate_strip<Rows, 2, Source>(acc, weights, weight_stride, value_rows, n, c, prefetch);
  }
  for (; c + kWidth <= head_dim; c += kWidth, prefetch = Prefetch{})
    accumulate_strip<Rows, 1, Source>(acc, weights, weight_stride, value_rows, n, c, prefetch);
  for (Index j = 0; j < n; ++j) {
    prefetch(j);
    for (Index cc = c; cc < head_dim; ++cc)
      #pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
        acc[r][cc] += weights[r * weight_stride + j] * Source::template scalar<Acc>(value_rows(j), cc);
  }
}

/// acc += P V for num_rows accumulator rows of `columns` columns (row r at accumulators +
/// r * row_stride, its weights at weights + r * weight_stride) over n value rows (row j at
/// value_rows(j)): four rows at a time through accumulate_rows, the rest one at a time. The
/// first pass over the value rows runs `prefetch` row by row.
template <class Source, class Acc, class ValueRows, class Prefetch = RowPrefetch<Acc>>
void accumulate_all_rows(Acc* accumulators, Index num_rows, Index row_stride, Index columns,
                         const Acc* weights, Index weight_stride, const ValueRows& value_rows,
                         Index n, Prefetch prefetch = {}) {
  for_row_groups<4>(num_rows, [&](auto rows, Index row) {
    constexpr int kRows = decltype(rows)::value;
    Acc* acc[count(kRows)];
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) acc[r] = accumulators + (row + r) * row_stride;
    accumulate_rows<kRows, Source>(acc, weights + row * weight_stride, weight_stride, value_rows,
                                   n, columns, row == 0 ? prefetch : Prefetch{});
  });
}

/// The score tile of a block for many rows (prefill): tile[r][j] = q_r . k_j for num_rows rows
/// and n <= kKeyBlock keys, from the block's keys transposed (keys_t[c][j], kKeyBlock columns,
/// columns n .. padded with zeros to whole vectors). Four rows by two vectors of keys per step:
/// each transposed chunk is loaded once for four rows, each query element broadcast once for
/// two chunks, eight independent FMA chains. A score's additions run over c in order, the same
/// in every grouping.
template <class Acc>
void tile_scores(const Acc* queries, Index num_rows, Index head_dim, const Acc* keys_t, Index n,
                 Acc* tile) {
  using V = VecOf<Acc>;
  constexpr Index kWidth = V::width;
  const Index columns = (n + kWidth - 1) / kWidth * kWidth;
  auto block = [&](auto rows_tag, auto vecs_tag, Index row, Index j) {
    constexpr int kRows = decltype(rows_tag)::value, kVecs = decltype(vecs_tag)::value;
    V lane[count(kRows)][count(kVecs)];
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r)
      #pragma GCC unroll 16
      for (int s = 0; s < kVecs; ++s) lane[r][s] = V::zero();
    // Invariant: lane[r][s] = sum over channels < c of q[row + r][c] * keys_t[c][j + s * W ...].
    for (Index c = 0; c < head_dim; ++c) {
      V k[count(kVecs)];
      #pragma GCC unroll 16
      for (int s = 0; s < kVecs; ++s) k[s] = V::load(keys_t + c * kKeyBlock + j + s * kWidth);
      #pragma GCC unroll 16
      for (int r = 0; r < kRows; ++r) {
        const V q = V::broadcast(queries[(row + r) * head_dim + c]);
        #pragma GCC unroll 16
        for (int s = 0; s < kVecs; ++s) lane[r][s] = V::mul_add(q, k[s], lane[r][s]);
      }
    }
    #pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r)
      #pragma GCC unroll 16
      for (int s = 0; s < kVecs; ++s) lane[r][s].store(tile + (row + r) * kKeyBlock + j + s * kWidth);
  };
  for_row_groups<4>(num_rows, [&](auto rows, Index row) {
    Index j = 0;
    for (; j + 2 * kWidth <= columns; j += 2 * kWidth) block(rows, std::integral_constant<int, 2>{}, row, j);
    for (; j < columns; j += kWidth) block(rows, std::integral_constant<int, 1>{}, row, j);
  });
}

/// keys_t[c][j] = key j's element c, widened to Acc, for the n keys of a block (key j at
/// keys(j)); columns n .. up to a whole vector are zeros. `row` is head_dim scratch.
template <class Acc, class T>
void transpose_keys(const RowsOf<T>& keys, Index n, Index head_dim, Acc* keys_t, Acc* row) {
  using V = VecOf<Acc>;
  for (Index j = 0; j < n; ++j) {
    const T* key = keys(j);
    Index c = 0;
    for (; c + V::width <= head_dim; c += V::width) V::load(key + c).store(row + c);
    for (; c < head_dim; ++c) row[c] = static_cast<Acc>(key[c]);
    for (c = 0; c < head_dim; ++c) keys_t[c * kKeyBlock + j] = row[c];
  }
  const Index columns = std::min<Index>((n + V::width - 1) / V::width * V::width, kKeyBlock);
  for (Index c = 0; c < head_dim; ++c)
    for (Index j = n; j < columns; ++j) keys_t[c * kKeyBlock + j] = Acc(0);
}
