// kvcache: the byte level of saved caches. Fields are little-endian and are written and read a
// byte at a time, so a file means the same on every host. A Writer and a Reader keep the
// CRC-32C of every byte that passes through them and turn every stream problem into an
// exception that names the field (docs/persistence_format.md).
#ifndef KVCACHE_DETAIL_SERIALIZATION_HPP
#define KVCACHE_DETAIL_SERIALIZATION_HPP

#include <kvcache/detail/crc32c.hpp>
#include <kvcache/errors.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <ios>
#include <istream>
#include <ostream>
#include <streambuf>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace kvcache {
namespace detail {

/// The unsigned integer of `Bytes` bytes (1, 2, 4 or 8).
template <std::size_t Bytes>
struct unsigned_of_size;
template <>
struct unsigned_of_size<1> {
  using type = std::uint8_t;
};
template <>
struct unsigned_of_size<2> {
  using type = std::uint16_t;
};
template <>
struct unsigned_of_size<4> {
  using type = std::uint32_t;
};
template <>
struct unsigned_of_size<8> {
  using type = std::uint64_t;
};
template <std::size_t Bytes>
using unsigned_of_size_t = typename unsigned_of_size<Bytes>::type;

/// Writes `value` as sizeof(U) bytes, least significant first.
template <class U>
void store_little_endian(std::uint8_t* at, U value) {
  static_assert(std::is_unsigned_v<U>, "kvcache: little-endian fields are unsigned integers");
  for (std::size_t i = 0; i < sizeof(U); ++i)
    at[i] = static_cast<std::uint8_t>(static_cast<std::uintmax_t>(value) >> (8 * i));
}

/// Reads sizeof(U) bytes, least significant first.
template <class U>
U load_little_endian(const std::uint8_t* at) {
  static_assert(std::is_unsigned_v<U>, "kvcache: little-endian fields are unsigned integers");
  U value = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i)
    value = static_cast<U>(value | static_cast<U>(static_cast<U>(at[i]) << (8 * i)));
  return value;
}

/// An element's bit pattern as an unsigned integer of its size: float 32 bits, double 64,
/// Eigen::half and Eigen::bfloat16 16. Saving bit patterns keeps every value exactly, NaN
/// payloads and signed zeros included.
template <class T>
using element_bits_t = unsigned_of_size_t<sizeof(T)>;

template <class T>
element_bits_t<T> bits_of(const T& x) {
  return Eigen::numext::bit_cast<element_bits_t<T>>(x);
}

template <class T>
T from_bits(element_bits_t<T> bits) {
  return Eigen::numext::bit_cast<T>(bits);
}

/// "0x7FC0" for (0x7FC0, 4): the low `nibbles` hexadecimal digits of value.
inline std::string hex_digits(std::uint32_t value, int nibbles) {
  static constexpr char digits[] = "0123456789ABCDEF";
  std::string out = "0x";
  for (int shift = 4 * (nibbles - 1); shift >= 0; shift -= 4) out += digits[(value >> shift) & 0xFu];
  return out;
}

/// "0x1A2B3C4D"
inline std::string hex32(std::uint32_t value) { return hex_digits(value, 8); }

/// "89 4B 56 43": bytes in hexadecimal, separated by spaces.
inline std::string hex_bytes(const std::uint8_t* bytes, std::size_t size) {
  static constexpr char digits[] = "0123456789ABCDEF";
  std::string out;
  for (std::size_t i = 0; i < size; ++i) {
    if (i > 0) out += ' ';
    out += digits[bytes[i] >> 4];
    out += digits[bytes[i] & 0xFu];
  }
  return out;
}

/// Bytes a Writer buffers before handing them to the stream, and the most a Reader asks the
/// stream for (and allocates ahead of what it has received) at once.
inline constexpr std::size_t kSerializationChunkBytes = std::size_t{1} << 16;

/// Writes bytes to a std::ostream through a buffer of kSerializationChunkBytes, keeping the
/// CRC-32C of everything written.
///
/// Errors: a stream already failed (failbit or badbit) when the Writer is made, a write that
/// fails, or a failing flush in finish() throw std::ios_base::failure whose message names the
/// owner (`where`), the offset and the field being written. A stream with exceptions() enabled
/// throws its own std::ios_base::failure first. Either way the stream may hold a partial
/// record, which load() rejects.
class Writer {
 public:
  Writer(std::ostream& out, std::string where)
      : out_(out), where_(std::move(where)), buffer_(kSerializationChunkBytes) {
    if (!out_)
      fail("the output stream is in a failed state (failbit or badbit set) before anything was "
           "written");
  }

  /// Appends `size` bytes of `field`.
  void write_bytes(const std::uint8_t* data, std::size_t size, const char* field) {
    field_ = field;
    while (size > 0) {
      const std::size_t piece = std::min(size, buffer_.size() - used_);
      std::copy_n(data, piece, buffer_.data() + used_);
      used_ += piece;
      data += piece;
      size -= piece;
      if (used_ == buffer_.size()) flush_buffer();
    }
  }

  /// Appends an unsigned integer, little-endian.
  template <class U>
  void write_unsigned(U value, const char* field) {
    std::uint8_t bytes[sizeof(U)];
    store_little_endian(bytes, value);
    write_bytes(bytes, sizeof(U), field);
  }

  /// Appends `count` elements as their bit patterns, little-endian.
  template <class T>
  void write_elements(const T* data, std::size_t count, const char* field) {
    field_ = field;
    for (std::size_t i = 0; i < count; ++i) {
      if (buffer_.size() - used_ < sizeof(T)) flush_buffer();
      store_little_endian(buffer_.data() + used_, bits_of(data[i]));
      used_ += sizeof(T);
    }
  }

  /// The CRC-32C of every byte appended so far.
  std::uint32_t checksum() const { return crc32c_update(crc_, buffer_.data(), used_); }

  /// Hands the buffered bytes to the stream and flushes it, so that a failing device is
  /// reported here rather than lost in a later flush.
  void finish() {
    flush_buffer();
    out_.flush();
    if (!out_) fail("flushing the output stream failed after ", written_, " bytes");
  }

 private:
  void flush_buffer() {
    if (used_ == 0) return;
    crc_ = crc32c_update(crc_, buffer_.data(), used_);
    out_.write(reinterpret_cast<const char*>(buffer_.data()), static_cast<std::streamsize>(used_));
    if (!out_)
      fail("the output stream failed while writing bytes [", written_, ", ", written_ + used_,
           ") of the record (up to ", field_, ")");
    written_ += used_;
    used_ = 0;
  }

  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    throw std::ios_base::failure(message("kvcache: ", where_, ": ", parts...));
  }

  std::ostream& out_;
  std::string where_;
  std::vector<std::uint8_t> buffer_;
  std::size_t used_ = 0;
  std::uint64_t written_ = 0;
  std::uint32_t crc_ = 0;
  const char* field_ = "";
};

/// Reads exactly the bytes asked for from a std::istream (never ahead: the stream is left
/// right after the last byte read), keeping the CRC-32C of everything read.
///
/// Every failure throws kvcache::FormatError naming the owner (`where`), the field, the
/// expected and the received byte counts: a stream already failed when the Reader is made,
/// a stream that ends early ("truncated"), a read error (badbit). A stream with exceptions()
/// enabled is handled the same way (its std::ios_base::failure becomes a FormatError).
class Reader {
 public:
  Reader(std::istream& in, std::string where) : in_(in), where_(std::move(where)) {
    if (!in_)
      fail("stream error: the input stream is in a failed state (failbit or badbit set) before "
           "anything was read");
  }

  /// Reads exactly `size` bytes of `field` into `to`.
  void read_bytes(std::uint8_t* to, std::size_t size, const char* field) {
    const std::size_t got = read_some(to, size);
    if (got != size) fail_short(field, size, got);
  }

  /// Reads an unsigned integer, little-endian.
  template <class U>
  U read_unsigned(const char* field) {
    std::uint8_t bytes[sizeof(U)];
    read_bytes(bytes, sizeof(U), field);
    return load_little_endian<U>(bytes);
  }

  /// Reads `count` elements written by Writer::write_elements. The vector grows as the bytes
  /// arrive, at most kSerializationChunkBytes at a time: a count larger than what the stream
  /// holds fails as truncated, having allocated at most about twice what it did hold.
  /// Requires: count * sizeof(T) fits in std::size_t (the caller has bounded it).
  template <class T>
  std::vector<T> read_elements(std::uint64_t count, const char* field) {
    constexpr std::size_t per_chunk = kSerializationChunkBytes / sizeof(T);
    std::vector<T> out;
    out.reserve(static_cast<std::size_t>(std::min<std::uint64_t>(count, per_chunk)));
    std::vector<std::uint8_t> chunk(
        static_cast<std::size_t>(std::min<std::uint64_t>(count, per_chunk)) * sizeof(T));
    while (out.size() < count) {
      const std::size_t n =
          static_cast<std::size_t>(std::min<std::uint64_t>(count - out.size(), per_chunk));
      const std::size_t got = read_some(chunk.data(), n * sizeof(T));
      if (got != n * sizeof(T))
        fail_short(field, count * sizeof(T), out.size() * sizeof(T) + got);
      for (std::size_t i = 0; i < n; ++i)
        out.push_back(from_bits<T>(load_little_endian<element_bits_t<T>>(chunk.data() + i * sizeof(T))));
    }
    return out;
  }

  /// Reads `count` bytes, growing the vector as they arrive (like read_elements).
  std::vector<std::uint8_t> read_byte_array(std::uint64_t count, const char* field) {
    std::vector<std::uint8_t> out;
    while (out.size() < count) {
      const std::size_t n = static_cast<std::size_t>(
          std::min<std::uint64_t>(count - out.size(), kSerializationChunkBytes));
      const std::size_t before = out.size();
      out.resize(before + n);
      const std::size_t got = read_some(out.data() + before, n);
      if (got != n) fail_short(field, count, before + got);
    }
    return out;
  }

  /// The CRC-32C of every byte read so far.
  std::uint32_t checksum() const { return crc_; }
  /// Bytes read so far.
  std::uint64_t offset() const { return offset_; }

  /// Throws FormatError("kvcache: <where>: <parts>").
  template <class... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    throw FormatError(message("kvcache: ", where_, ": ", parts...));
  }

  /// Reads up to `size` bytes; returns how many arrived (fewer only at the end of the stream
  /// or on a read error, which the caller reports with fail_short).
  std::size_t read_some(std::uint8_t* to, std::size_t size) {
    if (size == 0) return 0;
    std::streamsize got = 0;
    try {
      in_.read(reinterpret_cast<char*>(to), static_cast<std::streamsize>(size));
      got = in_.gcount();
    } catch (const std::ios_base::failure&) {  // exceptions() enabled: judged below
      got = in_.gcount();
    }
    const auto received = static_cast<std::size_t>(std::max<std::streamsize>(got, 0));
    crc_ = crc32c_update(crc_, to, received);
    offset_ += received;
    return received;
  }

  /// The format version of the record being read: its header's (read_record_header sets it);
  /// a kind whose bytes changed between versions reads the older layout by it.
  std::uint32_t format_version() const { return format_version_; }
  void set_format_version(std::uint32_t version) { format_version_ = version; }

  /// Throws the FormatError for `received` of the `expected` bytes of `field`: a stream error
  /// when the stream's badbit is set, else "truncated".
  [[noreturn]] void fail_short(const char* field, std::uint64_t expected,
                               std::uint64_t received) const {
    if (in_.bad())
      fail("stream error: reading ", field, " failed (badbit set) after ", received, " of its ",
           expected, " bytes, at byte ", offset_, " of the record");
    fail("truncated: expected ", expected, " bytes of ", field, ", the stream ended after ",
         received, " (at byte ", offset_, " of the record)");
  }

 private:
  std::istream& in_;
  std::string where_;
  std::uint64_t offset_ = 0;
  std::uint32_t format_version_ = 0;  // none read yet
  std::uint32_t crc_ = 0;
};

/// A stream buffer that passes every byte written to `target` and keeps their CRC-32 (IEEE,
/// not the records' CRC-32C: see kCrc32IeeePolynomialReflected): a record made of other
/// records (a model of mixed layers) checksums them all, while each keeps its own.
class ChecksummingOutputBuffer : public std::streambuf {
 public:
  explicit ChecksummingOutputBuffer(std::streambuf* target) : target_(target) {}
  /// The CRC-32 (IEEE) of every byte the target accepted.
  std::uint32_t checksum() const { return crc_; }

 protected:
  int_type overflow(int_type ch) override {
    if (traits_type::eq_int_type(ch, traits_type::eof())) return traits_type::not_eof(ch);
    const char c = traits_type::to_char_type(ch);
    if (traits_type::eq_int_type(target_->sputc(c), traits_type::eof())) return traits_type::eof();
    crc_ = crc32_ieee_update(crc_, reinterpret_cast<const std::uint8_t*>(&c), 1);
    return ch;
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    const std::streamsize written = target_->sputn(s, n);
    if (written > 0)
      crc_ = crc32_ieee_update(crc_, reinterpret_cast<const std::uint8_t*>(s),
                               static_cast<std::size_t>(written));
    return written;
  }
  int sync() override { return target_->pubsync(); }

 private:
  std::streambuf* target_;
  std::uint32_t crc_ = 0;
};

/// A stream buffer that reads from `source` exactly the bytes asked for (it holds no buffer of
/// its own, so `source` is left right after the last byte consumed) and keeps their CRC-32
/// (IEEE).
class ChecksummingInputBuffer : public std::streambuf {
 public:
  explicit ChecksummingInputBuffer(std::streambuf* source) : source_(source) {}
  /// The CRC-32 (IEEE) of every byte consumed.
  std::uint32_t checksum() const { return crc_; }

 protected:
  int_type underflow() override { return source_->sgetc(); }  // a peek: nothing consumed
  int_type uflow() override {
    const int_type ch = source_->sbumpc();
    if (!traits_type::eq_int_type(ch, traits_type::eof())) {
      const char c = traits_type::to_char_type(ch);
      crc_ = crc32_ieee_update(crc_, reinterpret_cast<const std::uint8_t*>(&c), 1);
    }
    return ch;
  }
  std::streamsize xsgetn(char* s, std::streamsize n) override {
    const std::streamsize got = source_->sgetn(s, n);
    if (got > 0)
      crc_ = crc32_ieee_update(crc_, reinterpret_cast<const std::uint8_t*>(s),
                               static_cast<std::size_t>(got));
    return got;
  }

 private:
  std::streambuf* source_;
  std::uint32_t crc_ = 0;
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_SERIALIZATION_HPP
