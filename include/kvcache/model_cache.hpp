// kvcache: ModelKVCache - one cache per transformer layer, of one kind or of several.
#ifndef KVCACHE_MODEL_CACHE_HPP
#define KVCACHE_MODEL_CACHE_HPP

#include <kvcache/cache_concept.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/detail/record_codec.hpp>
#include <kvcache/persistence.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <istream>
#include <ostream>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

namespace kvcache {
namespace detail {

template <class C>
struct is_variant : std::false_type {};
template <class... Alternatives>
struct is_variant<std::variant<Alternatives...>> : std::true_type {};

/// Calls f on the cache a layer holds: the layer itself, or the active alternative of a
/// std::variant of caches.
template <class Layer, class F>
decltype(auto) visit_layer(Layer& layer, F&& f) {
  if constexpr (is_variant<std::remove_const_t<Layer>>::value)
    return std::visit(std::forward<F>(f), layer);
  else
    return std::forward<F>(f)(layer);
}

/// True for the cache classes with save() and load(): every kind but PrefixKVCache (and not a
/// std::variant of kinds).
template <class C, class = void>
struct is_persistent_cache : std::false_type {};
template <class C>
struct is_persistent_cache<C, std::void_t<decltype(record_kind<C>::value),
                                          decltype(C::load(std::declval<std::istream&>()))>>
    : std::true_type {};

/// True for a std::variant whose every alternative has save() and load().
template <class C>
struct is_persistent_variant : std::false_type {};
template <class... Alternatives>
struct is_persistent_variant<std::variant<Alternatives...>>
    : std::bool_constant<(is_persistent_cache<Alternatives>::value && ...)> {};

/// The index of the first alternative of Variant whose record type is `type`, or
/// std::variant_npos.
template <class Variant, std::size_t I = 0>
std::size_t alternative_of(const RecordType& type) {
  if constexpr (I < std::variant_size_v<Variant>) {
    if (record_type_of<std::variant_alternative_t<I, Variant>>() == type) return I;
    return alternative_of<Variant, I + 1>(type);
  } else {
    (void)type;
    return std::variant_npos;
  }
}

/// Alternative `index` of Variant, loaded from `in` by its own load().
template <class Variant, std::size_t I = 0>
Variant load_alternative(std::size_t index, std::istream& in, const LoadLimits& limits) {
  if constexpr (I + 1 < std::variant_size_v<Variant>) {
    if (index != I) return load_alternative<Variant, I + 1>(index, in, limits);
  }
  return Variant(std::in_place_index<I>, std::variant_alternative_t<I, Variant>::load(in, limits));
}

/// The record type of the cache a layer holds (the active alternative of a variant).
template <class Layer>
RecordType layer_record_type(const Layer& layer) {
  return visit_layer(layer, [](const auto& cache) {
    return record_type_of<std::decay_t<decltype(cache)>>();
  });
}

}  // namespace detail

/// \brief One cache per transformer layer: layer l's keys and values live in (*this)[l].
///
/// \tparam Cache any cache kind (StaticKVCache<T, L>, DynamicKVCache<T, L>, ...), or a
///         std::variant of cache kinds to mix kinds per layer.
///
/// All layers of one kind, built from the same arguments:
/// \code
///   ModelKVCache<StaticKVCache<float>> caches(32, /*batch*/ 1, /*max_seq_len*/ 4096, 8, 128);
///   caches[layer].update(k, v);                  // or caches.update(layer, k, v)
///   auto out = attend(q, caches[layer]);
/// \endcode
///
/// Mixed kinds (Gemma 2/3, Mistral: sliding-window layers interleaved with full-attention
/// layers): a std::variant of the kinds and a factory that builds layer l. update(), reset(),
/// size() and memory_bytes() work on the active alternative, and attend() accepts the variant
/// (overload below); std::get / std::visit reach the concrete cache.
/// \code
///   using Layer = std::variant<StaticKVCache<float>, SlidingWindowKVCache<float>>;
///   ModelKVCache<Layer> caches(26, [](Index layer) -> Layer {
///     if (layer % 2 == 0) return SlidingWindowKVCache<float>(1, 4096, 8, 256);
///     return StaticKVCache<float>(1, 8192, 8, 256);
///   });
///   caches.update(layer, k, v);
///   auto out = attend(q, caches[layer]);
/// \endcode
/// The factory also serves one kind with per-layer arguments, e.g. PrefixKVCache layers each on
/// its own layer's frozen prefix (see freeze()).
///
/// Every member that takes a layer index checks it first (std::out_of_range naming the index
/// and num_layers()); update() then has the layer's own strong guarantee.
template <class Cache>
class ModelKVCache {
 public:
  using cache_type = Cache;

  /// \brief num_layers caches, each constructed as Cache(args...).
  ///
  /// \param num_layers positive, else std::invalid_argument
  /// \param args       the constructor arguments of one layer's Cache
  template <class... Args,
            std::enable_if_t<std::is_constructible_v<Cache, const Args&...>, int> = 0>
  explicit ModelKVCache(Index num_layers, const Args&... args) {
    detail::require_positive("ModelKVCache", "num_layers", num_layers);
    layers_.reserve(static_cast<std::size_t>(num_layers));
    for (Index layer = 0; layer < num_layers; ++layer) layers_.emplace_back(args...);
  }

  /// \brief num_layers caches, layer l being make_layer(l): per-layer arguments or kinds.
  ///
  /// \param num_layers positive, else std::invalid_argument
  /// \param make_layer callable as Cache(Index layer); called for layers 0, 1, ... in order
  template <class MakeLayer,
            std::enable_if_t<!std::is_constructible_v<Cache, const MakeLayer&> &&
                                 std::is_invocable_r_v<Cache, MakeLayer&, Index>,
                             int> = 0>
  ModelKVCache(Index num_layers, MakeLayer make_layer) {
    detail::require_positive("ModelKVCache", "num_layers", num_layers);
    layers_.reserve(static_cast<std::size_t>(num_layers));
    for (Index layer = 0; layer < num_layers; ++layer) layers_.push_back(make_layer(layer));
  }

  /// \brief The number of layers.
  Index num_layers() const { return static_cast<Index>(layers_.size()); }

  /// \brief Layer `layer`'s cache. Requires 0 <= layer < num_layers(), else std::out_of_range.
  Cache& operator[](Index layer) { return layers_[checked(layer)]; }
  const Cache& operator[](Index layer) const { return layers_[checked(layer)]; }

  /// \brief The same as (*this)[layer].update(k, v), for variants too.
  template <class K, class V>
  void update(Index layer, const K& k, const V& v) {
    detail::visit_layer(layers_[checked(layer)], [&](auto& cache) { cache.update(k, v); });
  }

  /// \brief Layer 0's size() (every layer of a model appends the same tokens).
  Index size() const {
    return detail::visit_layer(layers_.front(), [](const auto& cache) { return cache.size(); });
  }

  /// \brief Resets every layer (each keeps its storage; prefix layers return to their prefix).
  void reset() noexcept {
    for (Cache& layer : layers_) detail::visit_layer(layer, [](auto& cache) { cache.reset(); });
  }

  /// \brief The sum of every layer's memory_bytes().
  std::size_t memory_bytes() const {
    std::size_t total = 0;
    for (const Cache& layer : layers_)
      total += detail::visit_layer(layer, [](const auto& cache) { return cache.memory_bytes(); });
    return total;
  }

  /// \brief Every layer's freeze(), in layer order (for caches that have one): the per-layer
  /// prefixes of a shared prompt, e.g. for ModelKVCache<PrefixKVCache<T, L>> built with a
  /// factory `[&](Index l) { return PrefixKVCache<T, L>(frozen[l], max_new_tokens); }`.
  template <class C = Cache>
  auto freeze() const -> std::vector<decltype(std::declval<const C&>().freeze())> {
    std::vector<decltype(std::declval<const C&>().freeze())> frozen;
    frozen.reserve(layers_.size());
    for (const Cache& layer : layers_) frozen.push_back(layer.freeze());
    return frozen;
  }

  /// \brief Writes every layer to `out` (docs/persistence_format.md): a header naming the
  /// layers' type and num_layers(), with its own CRC-32C, then each layer's save() record.
  /// Offered when Cache is one kind that has save() (not PrefixKVCache); a std::variant of such
  /// kinds has the save() below.
  /// Throws std::ios_base::failure when the stream fails (the stream may then hold a partial
  /// record).
  template <class C = Cache, std::enable_if_t<detail::is_persistent_cache<C>::value, int> = 0>
  void save(std::ostream& out) const {
    detail::Writer writer(out, detail::persistence_owner<ModelKVCache>("save"));
    detail::write_record_header<ModelKVCache>(writer, {num_layers()});
    writer.finish();
    for (const Cache& layer : layers_) layer.save(out);
  }

  /// \brief Reads caches written by save(): every layer as Cache::load reads it. Throws
  /// kvcache::FormatError (naming the layer, the expected and the received value) when the
  /// stream does not hold an intact ModelKVCache<Cache> record or fails; the stream is left
  /// right after the record.
  template <class C = Cache, std::enable_if_t<detail::is_persistent_cache<C>::value, int> = 0>
  static ModelKVCache load(std::istream& in) {
    return load(in, LoadLimits{});
  }
  /// \brief load() with a bound on the memory all the loaded layers together may own.
  template <class C = Cache, std::enable_if_t<detail::is_persistent_cache<C>::value, int> = 0>
  static ModelKVCache load(std::istream& in, const LoadLimits& limits) {
    detail::Reader reader(in, detail::persistence_owner<ModelKVCache>("load"));
    const auto header = detail::read_record_header<ModelKVCache>(reader);
    return load_layers(reader, header.num_layers, limits,
                       [&](Index, const LoadLimits& remaining) { return Cache::load(in, remaining); });
  }

  /// \brief Writes a model of mixed layers (docs/persistence_format.md, kind 7): a header with
  /// num_layers, the record type of every layer in order, each layer's save() record, then one
  /// CRC-32 (IEEE) over all of it (each record also keeps its CRC-32C: the outer checksum
  /// catches a layer resealed with its own checksums, or two layers swapped). Offered when Cache is a
  /// std::variant of kinds that have save(). Throws std::ios_base::failure when the stream fails.
  template <class C = Cache, std::enable_if_t<detail::is_persistent_variant<C>::value, int> = 0>
  void save(std::ostream& out) const {
    const std::string where = detail::persistence_owner<ModelKVCache>("save");
    detail::Writer trailer(out, where);  // checks the stream now; writes the checksum last
    detail::ChecksummingOutputBuffer checksummed(out.rdbuf());
    std::ostream body(&checksummed);
    detail::Writer writer(body, where);
    detail::write_record_header<ModelKVCache>(writer, {num_layers()});
    for (const Cache& layer : layers_) {
      const detail::RecordType t = detail::layer_record_type(layer);
      const std::uint8_t type_bytes[] = {t.kind, t.element, t.layout, t.bits, t.layer_kind};
      writer.write_bytes(type_bytes, sizeof type_bytes, "layer types");
    }
    writer.finish();
    for (const Cache& layer : layers_)
      detail::visit_layer(layer, [&](const auto& cache) { cache.save(body); });
    trailer.write_unsigned(checksummed.checksum(), "checksum");
    trailer.finish();
  }

  /// \brief Reads a model of mixed layers written by save(): each layer as the alternative its
  /// record type names. Throws kvcache::FormatError (naming the layer, the expected and the
  /// received value) for a layer type that is not an alternative of Cache, any layer's own
  /// error, or a mismatch of the checksum over the whole model; the stream is left right after
  /// the record.
  template <class C = Cache, std::enable_if_t<detail::is_persistent_variant<C>::value, int> = 0>
  static ModelKVCache load(std::istream& in) {
    return load(in, LoadLimits{});
  }
  /// \brief load() with a bound on the memory all the loaded layers together may own.
  template <class C = Cache, std::enable_if_t<detail::is_persistent_variant<C>::value, int> = 0>
  static ModelKVCache load(std::istream& in, const LoadLimits& limits) {
    const std::string where = detail::persistence_owner<ModelKVCache>("load");
    detail::Reader trailer(in, where);  // checks the stream now; reads the checksum last
    detail::ChecksummingInputBuffer checksummed(in.rdbuf());
    std::istream body(&checksummed);
    detail::Reader reader(body, where);
    const auto header = detail::read_record_header<ModelKVCache>(reader);
    // Grows as the bytes arrive: a huge num_layers fails as truncated, having allocated about
    // what the stream held.
    const std::vector<std::uint8_t> types = reader.read_byte_array(
        static_cast<std::uint64_t>(header.num_layers) * 5, "layer types");
    std::vector<std::size_t> alternatives;
    for (Index layer = 0; layer < header.num_layers; ++layer) {
      const std::uint8_t* t = types.data() + 5 * layer;
      const detail::RecordType type{t[0], t[1], t[2], t[3], t[4]};
      alternatives.push_back(detail::alternative_of<Cache>(type));
      if (alternatives.back() == std::variant_npos)
        reader.fail("layer ", layer, " of ", header.num_layers, ": expected one of the layer "
                    "kinds of this model, got a ", detail::describe(type));
    }
    ModelKVCache model = load_layers(
        reader, header.num_layers, limits, [&](Index layer, const LoadLimits& remaining) {
          return detail::load_alternative<Cache>(
              alternatives[static_cast<std::size_t>(layer)], body, remaining);
        });
    const std::uint32_t computed = checksummed.checksum();
    const auto stored = trailer.read_unsigned<std::uint32_t>("checksum");
    if (stored != computed)
      trailer.fail("checksum mismatch over the whole model: the record stores ",
                   detail::hex32(stored), ", its layer types and layers give ",
                   detail::hex32(computed), " (the data are corrupt)");
    return model;
  }

  /// \brief The layers, in order.
  auto begin() { return layers_.begin(); }
  auto end() { return layers_.end(); }
  auto begin() const { return layers_.begin(); }
  auto end() const { return layers_.end(); }

 private:
  struct FromLayers {};
  ModelKVCache(std::vector<Cache> layers, FromLayers) : layers_(std::move(layers)) {}

  /// The num_layers layers of a record, each read by load_layer(layer, limits) with what is
  /// left of `limits` after the layers before it (all layers together stay within it); a
  /// layer's FormatError is rethrown through `reader` naming the layer. Layers are added as
  /// they are read: a huge num_layers fails as truncated, not here.
  template <class LoadLayer>
  static ModelKVCache load_layers(const detail::Reader& reader, Index num_layers,
                                  const LoadLimits& limits, LoadLayer&& load_layer) {
    std::vector<Cache> layers;
    layers.reserve(static_cast<std::size_t>(std::min<Index>(num_layers, 1024)));
    std::uint64_t used = 0;  // memory of the layers read so far, <= limits.max_memory_bytes
    for (Index layer = 0; layer < num_layers; ++layer) {
      LoadLimits remaining;
      remaining.max_memory_bytes = limits.max_memory_bytes - used;
      try {
        layers.push_back(load_layer(layer, remaining));
      } catch (const FormatError& e) {
        reader.fail("layer ", layer, " of ", num_layers, ": ",
                    detail::without_library_prefix(e.what()));
      }
      used += std::min<std::uint64_t>(
          detail::visit_layer(layers.back(), [](const auto& cache) { return cache.memory_bytes(); }),
          remaining.max_memory_bytes);
    }
    return ModelKVCache(std::move(layers), FromLayers{});
  }

  std::size_t checked(Index layer) const {
    if (layer < 0 || layer >= num_layers())
      throw std::out_of_range(detail::message("kvcache: ModelKVCache: layer ", layer,
                                              " is out of range; expected 0 <= layer < ",
                                              num_layers(), " (num_layers)"));
    return static_cast<std::size_t>(layer);
  }

  std::vector<Cache> layers_;
};

namespace detail {
/// The header of a model's record: its layer count; the layers' records follow (kinds 6, 7).
template <CacheKind Kind>
struct ModelRecord {
  static constexpr CacheKind kind = Kind;
  struct Header {
    Index num_layers = 0;
  };
  static constexpr std::array<HeaderField<Header>, 1> fields = {{{"num_layers", &Header::num_layers, true}}};
};
template <class Cache>
struct RecordTraits<ModelKVCache<Cache>> : ModelRecord<CacheKind::model_cache> {};
template <class... Caches>
struct RecordTraits<ModelKVCache<std::variant<Caches...>>> : ModelRecord<CacheKind::mixed_model_cache> {};
}  // namespace detail

}  // namespace kvcache

#endif  // KVCACHE_MODEL_CACHE_HPP
