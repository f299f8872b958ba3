// kvcache: basic types, layout tags and the stride arithmetic every other header shares.
#ifndef KVCACHE_LAYOUT_HPP
#define KVCACHE_LAYOUT_HPP

#include <kvcache/config.hpp>

#include <array>
#include <cstddef>
#include <type_traits>

namespace kvcache {

/// \brief Signed extent and index type, the same as Eigen's.
using Index = Eigen::Index;

/// \brief The 4-d, row-major tensor every API call takes and returns.
template <class T>
using Tensor4 = Eigen::Tensor<T, 4, Eigen::RowMajor, Index>;

/// \brief Distances, in elements, between neighbours along each axis of a 4-d tensor.
/// head_dim is always the innermost axis, so its stride is 1 and is not stored.
struct Strides {
  Index batch;
  Index head;
  Index seq;
};

/// \brief A 4-d extent named by meaning rather than by axis number.
struct Shape {
  Index batch;
  Index heads;
  Index seq;
  Index head_dim;
};

/// \brief Layout tag: [batch, heads, seq, head_dim] (torchtune, Hugging Face). The default.
///
/// A head's positions are contiguous, so one (batch, head) pair of a cache is a single run of
/// seq * head_dim elements: the best order for streaming a head's keys.
struct BHSD {
  static constexpr const char* name = "BHSD";
  static constexpr int seq_axis = 2;
  static constexpr int head_axis = 1;
  static constexpr std::array<Index, 4> dims(const Shape& s) {
    return {s.batch, s.heads, s.seq, s.head_dim};
  }
  static constexpr Shape shape(const std::array<Index, 4>& d) { return {d[0], d[1], d[2], d[3]}; }
  static constexpr Strides strides(const Shape& s) {
    return {s.heads * s.seq * s.head_dim, s.seq * s.head_dim, s.head_dim};
  }
};

/// \brief Layout tag: [batch, seq, heads, head_dim] (TransformerLens, FlashAttention).
///
/// A position's heads are contiguous, so appending a token writes one run per batch row; a
/// head's keys are strided by heads * head_dim.
struct BSHD {
  static constexpr const char* name = "BSHD";
  static constexpr int seq_axis = 1;
  static constexpr int head_axis = 2;
  static constexpr std::array<Index, 4> dims(const Shape& s) {
    return {s.batch, s.seq, s.heads, s.head_dim};
  }
  static constexpr Shape shape(const std::array<Index, 4>& d) { return {d[0], d[2], d[1], d[3]}; }
  static constexpr Strides strides(const Shape& s) {
    return {s.seq * s.heads * s.head_dim, s.head_dim, s.heads * s.head_dim};
  }
};

/// \brief True for the two layout tags.
template <class L>
inline constexpr bool is_layout_v = std::is_same_v<L, BHSD> || std::is_same_v<L, BSHD>;

/// \brief True for the element types a cache may store.
template <class T>
inline constexpr bool is_kv_element_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, Eigen::half> ||
    std::is_same_v<T, Eigen::bfloat16>;

/// \brief The type arithmetic accumulates in: double for double, float for everything else.
template <class T>
using accumulator_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

namespace detail {

template <class T, class Layout>
constexpr void check_cache_parameters() {
  static_assert(is_kv_element_v<T>,
                "kvcache: the element type must be float, double, Eigen::half or Eigen::bfloat16");
  static_assert(is_layout_v<Layout>, "kvcache: the layout must be kvcache::BHSD or kvcache::BSHD");
}

/// A read-only view of a 4-d row-major tensor (a Tensor4 or a TensorMap of one).
template <class T>
struct ConstView4 {
  const T* data;
  std::array<Index, 4> dims;
};

/// A non-negative count as a std::size_t: sizes in bytes, and array extents given by int
/// template parameters (which -Wsign-conversion flags otherwise).
constexpr std::size_t count(Index n) { return static_cast<std::size_t>(n); }

/// Which input types the API takes as a 4-d tensor of T: Tensor4<T> and TensorMaps of it.
template <class X>
struct tensor4_traits : std::false_type {};
template <class T>
struct tensor4_traits<Eigen::Tensor<T, 4, Eigen::RowMajor, Index>> : std::true_type {
  using element_type = T;
};
template <class T, int Options, template <class> class MakePointer>
struct tensor4_traits<Eigen::TensorMap<Eigen::Tensor<T, 4, Eigen::RowMajor, Index>, Options,
                                       MakePointer>> : std::true_type {
  using element_type = T;
};
template <class T, int Options, template <class> class MakePointer>
struct tensor4_traits<Eigen::TensorMap<const Eigen::Tensor<T, 4, Eigen::RowMajor, Index>,
                                       Options, MakePointer>> : std::true_type {
  using element_type = T;
};

template <class X>
inline constexpr bool is_tensor4_v = tensor4_traits<std::remove_cv_t<X>>::value;

template <class X>
using tensor4_element_t = typename tensor4_traits<std::remove_cv_t<X>>::element_type;

template <class X>
ConstView4<tensor4_element_t<X>> view_of(const X& x) {
  return {x.data(), {x.dimension(0), x.dimension(1), x.dimension(2), x.dimension(3)}};
}

template <class T, class X>
constexpr void check_input_tensor() {
  static_assert(is_tensor4_v<X>,
                "kvcache: tensors must be kvcache::Tensor4<T> (4-d, row-major, Eigen::Index) or an "
                "Eigen::TensorMap of one");
  if constexpr (is_tensor4_v<X>) {
    static_assert(std::is_same_v<tensor4_element_t<X>, T>,
                  "kvcache: the tensor's element type must be the cache's element type T");
  }
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_LAYOUT_HPP
