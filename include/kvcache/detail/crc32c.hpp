// kvcache: CRC-32C (Castagnoli), the checksum of saved caches, and CRC-32 (IEEE 802.3, zlib's),
// the outer checksum of a model of mixed layers. Table-driven (slicing by 8), tables computed at
// compile time; no dependency beyond the standard library.
#ifndef KVCACHE_DETAIL_CRC32C_HPP
#define KVCACHE_DETAIL_CRC32C_HPP

#include <array>
#include <cstddef>
#include <cstdint>

namespace kvcache {
namespace detail {

/// The CRC-32C polynomial 0x1EDC6F41, bit-reflected (the form a least-significant-bit-first
/// implementation uses). CRC-32C is the checksum of iSCSI, ext4 and SSE4.2's crc32 instruction;
/// it detects every burst of up to 32 flipped bits and every odd number of flipped bits.
inline constexpr std::uint32_t kCrc32cPolynomialReflected = 0x82F63B78u;

/// The CRC-32 polynomial 0x04C11DB7 of IEEE 802.3 and zlib, bit-reflected. A model of mixed
/// layers checksums its layer records with it: a CRC over records that end in their own CRC of
/// the same polynomial does not depend on their contents (CRC(m, CRC(m)) is a constant), so
/// the outer one must use another.
inline constexpr std::uint32_t kCrc32IeeePolynomialReflected = 0xEDB88320u;

/// table[0] is the classic byte-at-a-time table: the CRC register after shifting byte i
/// through it. table[k][i] = the register after byte i followed by k zero bytes, which lets
/// the loop below fold eight input bytes per step ("slicing by 8", Intel 2006).
using Crc32Tables = std::array<std::array<std::uint32_t, 256>, 8>;

template <std::uint32_t PolynomialReflected>
constexpr Crc32Tables make_crc32_tables() {
  Crc32Tables tables{};
  for (std::uint32_t byte = 0; byte < 256; ++byte) {
    std::uint32_t crc = byte;
    for (int bit = 0; bit < 8; ++bit)
      crc = (crc & 1u) != 0 ? (crc >> 1) ^ PolynomialReflected : crc >> 1;
    tables[0][byte] = crc;
  }
  for (std::size_t k = 1; k < 8; ++k)
    for (std::size_t byte = 0; byte < 256; ++byte) {
      const std::uint32_t previous = tables[k - 1][byte];
      tables[k][byte] = (previous >> 8) ^ tables[0][previous & 0xFFu];
    }
  return tables;
}

template <std::uint32_t PolynomialReflected>
inline constexpr Crc32Tables kCrc32Tables = make_crc32_tables<PolynomialReflected>();

/// Continues a CRC-32 of the given (reflected) polynomial over `size` more bytes; see
/// crc32c_update.
template <std::uint32_t PolynomialReflected>
std::uint32_t crc32_update(std::uint32_t crc, const std::uint8_t* data, std::size_t size) {
  const Crc32Tables& t = kCrc32Tables<PolynomialReflected>;
  crc = ~crc;  // the register starts at all ones and is inverted at the end (the standard)
  while (size >= 8) {
    // The register is little-endian: its low byte meets the first input byte.
    const std::uint32_t low = crc ^ (std::uint32_t{data[0]} | std::uint32_t{data[1]} << 8 |
                                     std::uint32_t{data[2]} << 16 | std::uint32_t{data[3]} << 24);
    crc = t[7][low & 0xFFu] ^ t[6][(low >> 8) & 0xFFu] ^ t[5][(low >> 16) & 0xFFu] ^
          t[4][low >> 24] ^ t[3][data[4]] ^ t[2][data[5]] ^ t[1][data[6]] ^ t[0][data[7]];
    data += 8;
    size -= 8;
  }
  for (; size > 0; --size, ++data) crc = (crc >> 8) ^ t[0][(crc ^ *data) & 0xFFu];
  return ~crc;
}

/// \brief Continues a CRC-32C over `size` more bytes: `crc` is the checksum of the bytes so far
/// (0 for none), the result the checksum of those bytes followed by these. So
/// crc32c_update(crc32c_update(0, a), b) == crc32c(a followed by b).
inline std::uint32_t crc32c_update(std::uint32_t crc, const std::uint8_t* data,
                                   std::size_t size) {
  return crc32_update<kCrc32cPolynomialReflected>(crc, data, size);
}

/// Continues a CRC-32 (IEEE 802.3) the same way; crc32_ieee of "123456789" is 0xCBF43926.
inline std::uint32_t crc32_ieee_update(std::uint32_t crc, const std::uint8_t* data,
                                       std::size_t size) {
  return crc32_update<kCrc32IeeePolynomialReflected>(crc, data, size);
}

/// \brief The CRC-32C of `size` bytes; crc32c of the ASCII "123456789" is 0xE3069283.
inline std::uint32_t crc32c(const std::uint8_t* data, std::size_t size) {
  return crc32c_update(0, data, size);
}

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_CRC32C_HPP
