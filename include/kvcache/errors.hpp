// kvcache: exception types and the messages that name expected and received values.
#ifndef KVCACHE_ERRORS_HPP
#define KVCACHE_ERRORS_HPP

#include <kvcache/layout.hpp>

#include <cstddef>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace kvcache {

/// \brief Thrown by load() for a stream that is not a valid saved cache of the asked-for type.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// \brief Thrown by a PagedKVCache when an update needs more blocks than the pool has free,
/// after evicting every published prefix block that no sequence holds; the pool is unchanged.
class OutOfBlocks : public std::length_error {
 public:
  using std::length_error::length_error;
};

/// \brief The largest position() any cache reaches: 2^48 (2.8e14 tokens, far beyond any
/// context). An update that would go past it throws std::length_error; load() rejects a record
/// whose positions, sizes or capacities exceed it (FormatError). The bound keeps every position
/// arithmetic of the caches and the kernel (t - window, position + chunk) far from overflow.
inline constexpr Index max_position = Index(1) << 48;

namespace detail {

/// "[1, 8, 16, 64] (BHSD)": a tensor's dimensions as given, with the layout that names them.
template <class Layout>
std::string describe_dims(const std::array<Index, 4>& dims) {
  std::ostringstream out;
  out << '[' << dims[0] << ", " << dims[1] << ", " << dims[2] << ", " << dims[3] << "] ("
      << Layout::name << ')';
  return out.str();
}

/// "[b <= 2, 8, *, 64] (BHSD)": an expected shape, each axis described in words, in the
/// layout's axis order.
template <class Layout>
std::string describe_expected(const std::string& batch, const std::string& heads,
                              const std::string& seq, const std::string& head_dim) {
  std::array<std::string, 4> axes;
  axes[0] = batch;
  axes[Layout::head_axis] = heads;
  axes[Layout::seq_axis] = seq;
  axes[3] = head_dim;
  return "[" + axes[0] + ", " + axes[1] + ", " + axes[2] + ", " + axes[3] + "] (" + Layout::name +
         ")";
}

/// Builds a message from any streamable pieces.
template <class... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

template <class... Parts>
[[noreturn]] void throw_invalid_argument(const Parts&... parts) {
  throw std::invalid_argument(message("kvcache: ", parts...));
}

template <class... Parts>
[[noreturn]] void throw_length_error(const Parts&... parts) {
  throw std::length_error(message("kvcache: ", parts...));
}

/// "2 x 8 x 4096 x 128": extents as a product.
inline std::string message_of_extents(std::initializer_list<Index> extents) {
  std::string out;
  for (const Index extent : extents) out += (out.empty() ? "" : " x ") + std::to_string(extent);
  return out;
}

/// Constructor arguments are extents: zero or negative is a caller's mistake.
inline void require_positive(const char* where, const char* what, Index value) {
  if (value <= 0) throw_invalid_argument(where, ": ", what, " must be positive, got ", value);
}

/// The number of elements of a buffer with these (non-negative) extents, checked: a product
/// that overflows, or a buffer of more bytes than a pointer difference can span, throws
/// std::length_error instead of wrapping around into a too-small allocation.
inline Index checked_element_count(const char* where, std::initializer_list<Index> extents,
                                   std::size_t element_bytes) {
  const Index limit =
      std::numeric_limits<std::ptrdiff_t>::max() / static_cast<Index>(element_bytes);
  Index count = 1;
  for (const Index extent : extents) {
    if (extent != 0 && count > limit / extent)
      throw_length_error(where, ": a buffer of ", message_of_extents(extents), " elements of ",
                         element_bytes, " bytes exceeds the addressable size");
    count *= extent;
  }
  return count;
}

/// An append of new_len >= 0 positions after `position` (<= max_position) must end at or
/// before max_position, and (plus `reach` >= 0 more positions the append needs beyond them,
/// e.g. a window) leave every position an Index: a longer one throws std::length_error rather
/// than overflowing into a negative or wrapped count.
inline void require_representable_append(const char* where, Index position, Index new_len,
                                         Index reach = 0) {
  if (new_len > max_position - position)
    throw_length_error(where, ": appending ", new_len, " positions at position ", position,
                       " exceeds max_position = 2^48 = ", max_position);
  if (new_len > std::numeric_limits<Index>::max() - position - reach)
    throw_length_error(where, ": appending ", new_len, " positions at position ", position,
                       " with a reach of ", reach, " exceeds the largest Index, ",
                       std::numeric_limits<Index>::max());
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_ERRORS_HPP
