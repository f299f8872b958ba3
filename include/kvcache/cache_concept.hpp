// kvcache: the cache concept - what attend(), the model container and the persistence layer
// ask of a cache, written once, with one compile-time check that names what is missing.
//
// A type C is a KV cache when it has
//   typename C::element_type   the stored element: float, double, Eigen::half, Eigen::bfloat16
//   typename C::layout_type    BHSD or BSHD (layout.hpp): the axis order of its tensors
//   C::attention_view() const  returning detail::KVView<element_type> (detail/kv_view.hpp): the
//                              runs of held positions the kernel reads in place, with the rules
//                              the cache imposes (a window, sinks); valid until the next
//                              modification of the cache
// Every cache of the library also has the members API.md lists for all caches (update, size,
// position, batch_size, num_heads, head_dim, memory_bytes, ...); attend() needs only the three
// above, so a user's own storage can be attended over by providing them.
#ifndef KVCACHE_CACHE_CONCEPT_HPP
#define KVCACHE_CACHE_CONCEPT_HPP

#include <kvcache/detail/kv_view.hpp>

#include <type_traits>
#include <utility>

namespace kvcache {

/// \brief Whether C models the cache concept (see the top of cache_concept.hpp).
template <class C, class = void>
struct is_kv_cache : std::false_type {};
template <class C>
struct is_kv_cache<C, std::void_t<typename C::layout_type, typename C::element_type,
                                  decltype(std::declval<const C&>().attention_view())>>
    : std::is_same<decltype(std::declval<const C&>().attention_view()),
                   detail::KVView<typename C::element_type>> {};

template <class C>
inline constexpr bool is_kv_cache_v = is_kv_cache<C>::value;

/// \brief Whether C's views may hold quantized blocks: C says so with a static member
/// `quantized_blocks = true` (QuantizedKVCache does). The kernel's quantized path is compiled
/// only for such caches (it is about 40% of an attend() instantiation's compile time);
/// attend() over a view with quantized blocks from any other type throws std::logic_error.
template <class C, class = void>
struct holds_quantized_blocks : std::false_type {};
template <class C>
struct holds_quantized_blocks<C, std::void_t<decltype(C::quantized_blocks)>>
    : std::bool_constant<C::quantized_blocks> {};

template <class C>
inline constexpr bool holds_quantized_blocks_v = holds_quantized_blocks<C>::value;

namespace detail {

/// One clear message where a cache is expected and C is not one.
template <class C>
constexpr void check_kv_cache() {
  static_assert(is_kv_cache_v<C>,
                "kvcache: expected a cache (StaticKVCache, DynamicKVCache, SlidingWindowKVCache, "
                "QuantizedKVCache, FrozenKVCache, PrefixKVCache, a layer of ModelKVCache, or a "
                "type with element_type, layout_type and attention_view() returning "
                "detail::KVView<element_type>: see kvcache/cache_concept.hpp)");
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_CACHE_CONCEPT_HPP
