// Fuzzing support shared by the libFuzzer targets: a byte reader that turns the fuzzer's input
// into choices, the check that aborts on a finding, exception classification, bitwise
// comparisons and a snapshot of everything a cache shows. No Catch2: the targets include
// tests/support/reference.hpp (the naive double attention) and this header only.
#ifndef KVCACHE_FUZZ_COMMON_HPP
#define KVCACHE_FUZZ_COMMON_HPP

#include <kvcache/kvcache.hpp>

#include "support/reference.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <vector>

namespace kvfuzz {

using kvcache::Index;
using kvcache::Tensor4;

/// Builds a message from streamable pieces.
template <class... Parts>
std::string text(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

/// A finding: print what was expected and abort (libFuzzer saves the input as crash-*).
[[noreturn]] inline void fail(const char* file, int line, const char* condition,
                              const std::string& detail) {
  std::fprintf(stderr, "\n==== kvcache fuzz finding at %s:%d\n  check: %s\n  %s\n", file, line,
               condition, detail.c_str());
  std::fflush(stderr);
  std::abort();
}

#define FUZZ_CHECK(condition, ...)                                                      \
  do {                                                                                  \
    if (!(condition)) ::kvfuzz::fail(__FILE__, __LINE__, #condition, ::kvfuzz::text(__VA_ARGS__)); \
  } while (0)

/// Consumes the fuzzer's bytes front to back; past the end every read is 0, so any input is a
/// complete program (and a short seed is easy to write by hand).
class ByteReader {
 public:
  ByteReader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  bool empty() const { return at_ >= size_; }
  std::size_t remaining() const { return empty() ? 0 : size_ - at_; }

  std::uint8_t u8() { return empty() ? 0 : data_[at_++]; }
  std::uint16_t u16() { return static_cast<std::uint16_t>(u8() | (u8() << 8)); }
  std::uint32_t u32() { return static_cast<std::uint32_t>(u16()) | (std::uint32_t{u16()} << 16); }

  /// An integer in [lo, hi] (hi - lo < 65536).
  Index range(Index lo, Index hi) {
    const Index span = hi - lo + 1;
    return lo + (span <= 256 ? Index(u8()) % span : Index(u16()) % span);
  }
  /// True with probability about num / 256.
  bool chance(unsigned num) { return u8() < num; }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t at_ = 0;
};

/// A small deterministic generator (splitmix64) for tensor contents: the input chooses the seed
/// and the kind of numbers, not every element, so inputs stay short.
class Numbers {
 public:
  explicit Numbers(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [-1, 1).
  float uniform() { return static_cast<float>(static_cast<double>(next() >> 11) * 0x1p-52 - 1.0); }

  /// One element. mode 0: uniform [-1, 1); 1: a few exact values; 2: uniform with signed zeros
  /// and subnormals mixed in (all "tame"); 3: anything, NaN, infinities and huge values
  /// included (not tame: outputs are then only checked for crashes and exception types).
  float element(int mode) {
    switch (mode) {
      case 1: {
        static constexpr float few[] = {-1.0f, -0.5f, 0.0f, 0.25f, 0.5f, 1.0f};
        return few[next() % 6];
      }
      case 2: {
        const std::uint64_t r = next() % 8;
        if (r == 0) return 0.0f;
        if (r == 1) return -0.0f;
        if (r == 2) return 1e-40f * uniform();
        return uniform();
      }
      case 3: {
        const std::uint64_t r = next() % 16;
        if (r == 0) return std::numeric_limits<float>::quiet_NaN();
        if (r == 1) return std::numeric_limits<float>::infinity();
        if (r == 2) return -std::numeric_limits<float>::infinity();
        if (r == 3) return 3.0e38f * uniform();
        if (r == 4) return std::numeric_limits<float>::max();
        if (r == 5) {
          std::uint32_t bits = static_cast<std::uint32_t>(next());
          float x;
          std::memcpy(&x, &bits, sizeof x);
          return x;
        }
        return uniform();
      }
      default:
        return uniform();
    }
  }

 private:
  std::uint64_t state_;
};

/// Finite and at most 1e3 in magnitude: what the reference comparisons need.
inline bool tame(double x) { return std::isfinite(x) && std::abs(x) <= 1e3; }

/// What a call threw, as the API distinguishes it.
enum class Outcome { ok, invalid_argument, length_error, out_of_range, format_error, other };

inline const char* name(Outcome o) {
  switch (o) {
    case Outcome::ok: return "no exception";
    case Outcome::invalid_argument: return "std::invalid_argument";
    case Outcome::length_error: return "std::length_error";
    case Outcome::out_of_range: return "std::out_of_range";
    case Outcome::format_error: return "kvcache::FormatError";
    case Outcome::other: return "another exception";
  }
  return "?";
}

/// Runs f and classifies what it threw; the message goes to *what.
template <class F>
Outcome outcome_of(F&& f, std::string* what = nullptr) {
  auto note = [&](const std::exception& e) {
    if (what != nullptr) *what = e.what();
  };
  try {
    f();
    return Outcome::ok;
  } catch (const kvcache::FormatError& e) {
    note(e);
    return Outcome::format_error;
  } catch (const std::invalid_argument& e) {
    note(e);
    return Outcome::invalid_argument;
  } catch (const std::length_error& e) {
    note(e);
    return Outcome::length_error;
  } catch (const std::out_of_range& e) {
    note(e);
    return Outcome::out_of_range;
  } catch (const std::exception& e) {
    note(e);
    if (what != nullptr) *what = text("(", typeid(e).name(), ") ", e.what());
    return Outcome::other;
  } catch (...) {
    if (what != nullptr) *what = "a non-std exception";
    return Outcome::other;
  }
}

/// Same dimensions and the same bits in every element (NaN payloads and signed zeros count).
template <class T>
bool bit_equal(const Tensor4<T>& a, const Tensor4<T>& b) {
  return a.dimensions() == b.dimensions() &&
         (a.size() == 0 ||
          std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(T)) == 0);
}

/// The same bits (NaN payloads and signed zeros count).
template <class T>
bool bits_equal(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
std::string dims_of(const Tensor4<T>& x) {
  return text("[", x.dimension(0), ", ", x.dimension(1), ", ", x.dimension(2), ", ",
              x.dimension(3), "]");
}

using kvtest::quantized_bytes;  // tests/support/reference.hpp

/// Everything a cache shows, to check that a failing call changed nothing.
template <class Cache>
struct Snapshot {
  using T = typename Cache::element_type;
  explicit Snapshot(const Cache& c)
      : size(c.size()), position(c.position()), capacity(c.capacity()), bytes(c.memory_bytes()),
        keys(c.keys()), values(c.values()), blocks(quantized_bytes(c)) {}

  /// "" when equal, else what differs.
  std::string diff(const Snapshot& o) const {
    std::string out;
    if (size != o.size) out += text("size ", size, " -> ", o.size, "; ");
    if (position != o.position) out += text("position ", position, " -> ", o.position, "; ");
    if (capacity != o.capacity) out += text("capacity ", capacity, " -> ", o.capacity, "; ");
    if (bytes != o.bytes) out += text("memory_bytes ", bytes, " -> ", o.bytes, "; ");
    if (!bit_equal(keys, o.keys)) out += "keys() differ; ";
    if (!bit_equal(values, o.values)) out += "values() differ; ";
    if (blocks != o.blocks) out += "quantized blocks differ; ";
    return out;
  }

  Index size, position, capacity;
  std::size_t bytes;
  Tensor4<T> keys, values;
  std::vector<std::uint8_t> blocks;
};

/// Counters of what the checks saw (which calls, which outcomes, how many reference
/// comparisons), printed at exit when KVFUZZ_STATS is set: to see that a corpus exercises what
/// it should (e.g. `KVFUZZ_STATS=1 fuzz_operations -runs=0 corpus/`).
class Stats {
 public:
  static Stats& get() {
    static Stats stats;
    return stats;
  }
  bool enabled() const { return enabled_; }
  void count(const std::string& what) {
    if (enabled_) ++counts_[what];
  }
  ~Stats() {
    for (const auto& [what, n] : counts_) std::fprintf(stderr, "stats: %10ld  %s\n", n, what.c_str());
  }

 private:
  Stats() : enabled_(std::getenv("KVFUZZ_STATS") != nullptr) {}
  bool enabled_;
  std::map<std::string, long> counts_;
};

inline void count(const std::string& what) { Stats::get().count(what); }
inline bool counting() { return Stats::get().enabled(); }

/// The value of `--write-seeds=DIR` among libFuzzer's arguments, or "".
inline std::string write_seeds_dir(int argc, char** argv) {
  const std::string flag = "--write-seeds=";
  for (int i = 1; i < argc; ++i)
    if (std::strncmp(argv[i], flag.c_str(), flag.size()) == 0) return argv[i] + flag.size();
  return "";
}

inline void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

}  // namespace kvfuzz

#endif  // KVCACHE_FUZZ_COMMON_HPP
