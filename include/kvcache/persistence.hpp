// kvcache: the saved-cache format (docs/persistence_format.md) - its version and the limits
// load() enforces. The record header is detail/record_header.hpp; the codec every kind's save()
// and load() run is detail/record_codec.hpp, with each kind's RecordTraits next to the kind.
#ifndef KVCACHE_PERSISTENCE_HPP
#define KVCACHE_PERSISTENCE_HPP

#include <cstdint>

namespace kvcache {

/// \brief The version of the saved-cache format that save() writes. Any change to the format
/// increments it (docs/persistence_format.md, "Compatibility"). load() reads it and every older
/// version: 2 changed only the order of the key codes inside a quantized block (channel quads),
/// so load() converts a version 1 quantized block as it reads it.
inline constexpr std::uint32_t persistence_format_version = 2;
/// \brief The oldest version load() reads.
inline constexpr std::uint32_t oldest_persistence_format_version = 1;

/// \brief What load() is willing to allocate for one record.
///
/// load() reads the payload into memory that grows as the bytes arrive and allocates the
/// cache itself only once the record's checksum has matched; this limit bounds that last
/// allocation for records that are intact but declare a huge cache (crafted, or from a bigger
/// machine). For ModelKVCache it bounds all layers together.
struct LoadLimits {
  /// The largest memory_bytes() a loaded cache may have; a record declaring more is rejected
  /// with FormatError before anything is allocated for it. Default 16 GiB.
  std::uint64_t max_memory_bytes = std::uint64_t{16} << 30;
};

}  // namespace kvcache

#endif  // KVCACHE_PERSISTENCE_HPP
