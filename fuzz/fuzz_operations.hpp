// The driver of the fuzz_operations target: random operation sequences on one cache, checked
// against a naive model.
//
// The first input byte picks the kind, the layout and the element type: StaticKVCache,
// DynamicKVCache, SlidingWindowKVCache (with sinks), Int8KVCache, Int4KVCache or PrefixKVCache
// over a frozen prefix, each of float in BHSD or BSHD; static, sliding and int8 also of
// Eigen::half and Eigen::bfloat16. The next bytes pick the shape (batch <= 2, heads <= 4,
// head_dim <= 16, capacity <= 64; or, in "long" mode, one head of head_dim <= 4 and up to 5000
// positions, so that split-K and the kernel's 64-row/64-key blocks are reached), then
// constructor arguments that may be invalid, then up to kMaxOps operations: update (valid and
// wrong shapes, lengths past the capacity, TensorMap inputs, NaN/infinite/huge values), crop
// (inside and outside [0, size()]), reset, reserve, freeze, save + load, copy, and attend with
// random q shapes and options (causal, window, softcap, scale, key_mask, a thread pool, the
// caller-output overload), valid and invalid.
//
// The model (a std::vector<float> of every token appended, per position; its own capacity,
// ring and quantization bookkeeping, written from README/API.md) predicts, for every call:
//  * the exception type (none, std::invalid_argument, std::length_error) - API.md's table;
//  * after a throw, a cache exactly as before (strong guarantee; bitwise snapshot, the raw
//    quantized bytes included);
//  * after every operation: size(), position(), capacity(), memory_bytes(), the shape, and
//    keys()/values() - bit for bit for the exact kinds (sliding window: sinks + last window);
//    for int8/int4 the unquantized tail bit for bit and the rest within the quantization error
//    of the times each position was quantized, and quantized_size();
//  * attend() against tests/support/reference.hpp (naive double attention over the model's
//    tokens; for int8/int4 over the cache's own keys()/values(), as the unit tests do), within
//    a tolerance scaled by the score magnitude (for int8/int4 plus the integer scores' query
//    rounding); a thread pool's result bit for bit the serial
//    one.
// Any difference aborts (a finding). Run with --write-seeds=DIR to write the seed corpus.
//
// This header holds the driver; fuzz_operations.cpp instantiates it for float and is the
// target, fuzz_operations_16bit.cpp for Eigen::half and Eigen::bfloat16 (two translation units
// build in parallel).
#ifndef KVCACHE_FUZZ_OPERATIONS_HPP
#define KVCACHE_FUZZ_OPERATIONS_HPP

#include "fuzz_common.hpp"
#include "support/reference.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace kvfuzz {
namespace ops {

using kvcache::AttendOptions;
using kvcache::AttendWorkspace;
using kvcache::BHSD;
using kvcache::BSHD;
using kvcache::QuantConfig;
using Mask = Eigen::Tensor<bool, 2, Eigen::RowMajor, Index>;

enum class Kind { static_cache, dynamic_cache, sliding_window, int8, int4, prefix };
inline constexpr int kNumKinds = 6;

template <Kind K, class L, class T>
struct CacheOf;
template <class L, class T>
struct CacheOf<Kind::static_cache, L, T> {
  using type = kvcache::StaticKVCache<T, L>;
};
template <class L, class T>
struct CacheOf<Kind::dynamic_cache, L, T> {
  using type = kvcache::DynamicKVCache<T, L>;
};
template <class L, class T>
struct CacheOf<Kind::sliding_window, L, T> {
  using type = kvcache::SlidingWindowKVCache<T, L>;
};
template <class L, class T>
struct CacheOf<Kind::int8, L, T> {
  using type = kvcache::Int8KVCache<T, L>;
};
template <class L, class T>
struct CacheOf<Kind::int4, L, T> {
  using type = kvcache::Int4KVCache<T, L>;
};
template <class L, class T>
struct CacheOf<Kind::prefix, L, T> {
  using type = kvcache::PrefixKVCache<T, L>;
};

inline constexpr int kMaxOps = 48;
/// Key elements appended per run at most (values as many): keeps a run fast.
inline constexpr Index kElementBudget = Index(1) << 17;

/// The pool for attend(options.device), made on first use and kept (threads are expensive).
inline const Eigen::ThreadPoolDevice* pool_device() {
  static Eigen::ThreadPool pool(2);
  static Eigen::ThreadPoolDevice device(&pool, 2);
  return &device;
}

/// The unquantized tail length of a quantized cache holding `size` positions, from the README:
/// the tail keeps C = max(residual_length, group_size - 1) positions at most; whole blocks of
/// group_size leave it (oldest first) while it holds more.
inline Index tail_length(Index size, const QuantConfig& c) {
  const Index capacity = std::max(c.residual_length, c.group_size - 1);
  Index tail = size;
  while (tail > capacity) tail -= c.group_size;
  return tail;
}

template <Kind K, class L, class T>
class Driver {
  using Cache = typename CacheOf<K, L, T>::type;
  using Frozen = kvcache::FrozenKVCache<T, L>;
  static constexpr bool kQuantized = K == Kind::int8 || K == Kind::int4;
  static constexpr int kBits = K == Kind::int4 ? 4 : 8;
  static constexpr bool kSliding = K == Kind::sliding_window;
  static constexpr bool kPrefix = K == Kind::prefix;
  static constexpr bool kDynamic = K == Kind::dynamic_cache;
  static constexpr bool kHasCrop = !kSliding;
  static constexpr bool kHasFreeze = K == Kind::static_cache || K == Kind::dynamic_cache;
  static constexpr bool kHasSave = !kPrefix;

 public:
  explicit Driver(ByteReader& in) : in_(in) {}

  void run() {
    choose_shape();
    check_constructor_errors();
    construct();
    check_state("construction");
    for (int op = 0; op < kMaxOps && !in_.empty(); ++op) {
      switch (in_.range(0, 15)) {
        case 0: case 1: case 2: case 3: case 4: op_update(); break;
        case 5: case 6: case 7: case 8: case 9: op_attend(); break;
        case 10: op_crop(); break;
        case 11: op_reset(); break;
        case 12: op_freeze_or_reserve(); break;
        case 13: op_save_load(); break;
        case 14: op_copy(); break;
        default: op_update(); break;
      }
      check_state(last_op_);
    }
  }

 private:
  // --- setup ----------------------------------------------------------------------------------

  void choose_shape() {
    long_ = in_.chance(24);
    B_ = long_ ? 1 : in_.range(1, 2);
    H_ = long_ ? 1 : in_.range(1, 4);
    if constexpr (K == Kind::int4) {
      D_ = 2 * (long_ ? in_.range(1, 2) : in_.range(1, 8));
    } else {
      D_ = long_ ? in_.range(1, 4) : in_.range(1, 16);
    }
    const Index max_len = long_ ? 5000 : 64;
    if constexpr (kQuantized) {
      std::vector<Index> divisors;
      for (Index g = 1; g <= D_; ++g)
        if (D_ % g == 0 && (kBits == 8 || g % 2 == 0)) divisors.push_back(g);
      config_.group_size = divisors[static_cast<std::size_t>(in_.range(0, Index(divisors.size()) - 1))];
      config_.residual_length = in_.chance(128) ? in_.range(0, config_.group_size + 1) : in_.range(0, 64);
    }
    if constexpr (kSliding) {
      window_ = in_.chance(200) ? in_.range(1, 16) : in_.range(1, long_ ? 4800 : 40);
      sinks_ = in_.range(0, 4);
      ring_ = window_;
    } else if constexpr (kDynamic) {
      cap_ = in_.chance(128) ? 0 : in_.range(0, long_ ? 600 : 64);
    } else if constexpr (kPrefix) {
      prefix_tokens_ = in_.range(0, long_ ? 4800 : 16);
      cap_ = in_.range(1, max_len);
    } else {
      cap_ = in_.range(1, max_len);
    }
    row_ = B_ * H_ * D_;
  }

  /// Constructor arguments, some invalid: the constructor throws std::invalid_argument exactly
  /// when one is (API.md: zero or negative extents, group_size not dividing head_dim, odd
  /// group for int4, residual outside [0, 64], negative sinks or initial capacity).
  void check_constructor_errors() {
    if (!in_.chance(64)) return;
    auto maybe_bad = [&](Index good) -> Index {
      switch (in_.range(0, 7)) {
        case 0: return 0;
        case 1: return -1;
        case 2: return std::numeric_limits<Index>::min();
        default: return good;
      }
    };
    const Index b = maybe_bad(B_), h = maybe_bad(H_), d = maybe_bad(D_);
    bool valid = b > 0 && h > 0 && d > 0;
    std::string what;
    Outcome got;
    if constexpr (K == Kind::static_cache) {
      const Index cap = maybe_bad(cap_);
      valid = valid && cap > 0;
      got = outcome_of([&] { Cache c(b, cap, h, d); }, &what);
    } else if constexpr (kDynamic) {
      const Index cap = in_.chance(128) ? -in_.range(1, 3) : cap_;
      valid = valid && cap >= 0;
      got = outcome_of([&] { Cache c(b, h, d, cap); }, &what);
    } else if constexpr (kSliding) {
      const Index w = maybe_bad(window_);
      const Index s = in_.chance(64) ? -1 : sinks_;
      valid = valid && w > 0 && s >= 0;
      got = outcome_of([&] { Cache c(b, w, h, d, s); }, &what);
    } else if constexpr (kQuantized) {
      const Index cap = maybe_bad(cap_);
      QuantConfig config = config_;
      switch (in_.range(0, 7)) {
        case 0: config.group_size = in_.range(-1, D_ + 1); break;
        case 1: config.residual_length = in_.chance(128) ? -1 : 65; break;
        default: break;
      }
      const bool config_ok = config.group_size > 0 && d > 0 && d % config.group_size == 0 &&
                             (kBits == 8 || config.group_size % 2 == 0) &&
                             config.residual_length >= 0 && config.residual_length <= 64;
      valid = valid && cap > 0 && config_ok;
      got = outcome_of([&] { Cache c(b, cap, h, d, config); }, &what);
    } else {
      // PrefixKVCache: a null prefix or max_new_tokens <= 0 (the prefix's shape is valid).
      const bool null_prefix = in_.chance(64);
      const Index max_new = maybe_bad(cap_);
      valid = !null_prefix && max_new > 0;
      auto prefix = null_prefix ? nullptr
                                : std::make_shared<const Frozen>(Tensor4<T>(kvtest::dims<L>(1, 1, 0, 1)),
                                                                 Tensor4<T>(kvtest::dims<L>(1, 1, 0, 1)));
      got = outcome_of([&] { Cache c(prefix, max_new); }, &what);
    }
    const Outcome want = valid ? Outcome::ok : Outcome::invalid_argument;
    FUZZ_CHECK(got == want, "constructor: expected ", name(want), ", got ", name(got), " ", what);
  }

  void construct() {
    std::string what;
    const Outcome got = outcome_of(
        [&] {
          if constexpr (K == Kind::static_cache) {
            cache_.emplace(B_, cap_, H_, D_);
          } else if constexpr (kDynamic) {
            cache_.emplace(B_, H_, D_, cap_);
          } else if constexpr (kSliding) {
            cache_.emplace(B_, window_, H_, D_, sinks_);
          } else if constexpr (kQuantized) {
            cache_.emplace(B_, cap_, H_, D_, config_);
          } else {
            // The prefix: prefix_tokens_ tokens through a StaticKVCache, frozen.
            kvcache::StaticKVCache<T, L> base(B_, std::max<Index>(1, prefix_tokens_), H_, D_);
            Tensor4<T> k = make_tensor(B_, H_, prefix_tokens_, D_, in_.u16(), 0);
            Tensor4<T> v = make_tensor(B_, H_, prefix_tokens_, D_, in_.u16(), 0);
            base.update(k, v);
            frozen_ = base.freeze();
            append_to_model(k, v, B_, prefix_tokens_);
            frozen_k_ = k_;
            frozen_v_ = v_;
            prefix_len_ = prefix_tokens_;
            cache_.emplace(frozen_, cap_);
          }
        },
        &what);
    FUZZ_CHECK(got == Outcome::ok, "constructing a valid cache threw ", name(got), ": ", what);
  }

  // --- the model -------------------------------------------------------------------------------

  Index pos() const { return static_cast<Index>(k_.size()) / row_; }

  Index expected_size() const {
    if constexpr (kSliding) return std::min(pos(), sinks_ + window_);
    return pos();
  }

  Index expected_capacity() const {
    if constexpr (kSliding) return sinks_ + window_;
    if constexpr (kPrefix) return prefix_len_ + cap_;
    return cap_;
  }

  std::size_t expected_memory() const {
    const auto per_position = static_cast<std::size_t>(2 * row_) * sizeof(T);
    if constexpr (kSliding) return per_position * static_cast<std::size_t>(sinks_ + ring_);
    if constexpr (kQuantized) {
      const Index tail_slots = std::max<Index>(
          1, std::min(std::max(config_.residual_length, config_.group_size - 1), cap_));
      const Index max_blocks = (cap_ - tail_length(cap_, config_)) / config_.group_size;
      // Key codes in channel quads (4 bytes per quad of channels and row of tokens, int4 two
      // tokens a row), value codes as token rows padded to even, 8 bytes of scales a channel.
      const Index key_codes = (D_ + 3) / 4 * (config_.group_size * kBits / 8) * 4;
      const Index raw = config_.group_size * D_ * kBits / 8;
      const Index block_bytes = key_codes + (raw + raw % 2) + 8 * D_;
      return static_cast<std::size_t>(B_ * H_ * max_blocks * block_bytes) +
             per_position * static_cast<std::size_t>(tail_slots);
    }
    return per_position * static_cast<std::size_t>(cap_);
  }

  /// The positions keys() shows, oldest first.
  std::vector<Index> held_positions() const {
    std::vector<Index> out;
    const Index p = pos();
    if constexpr (kSliding) {
      for (Index i = 0; i < std::min(p, sinks_); ++i) out.push_back(i);
      for (Index i = std::max(sinks_, p - window_); i < p; ++i) out.push_back(i);
    } else {
      for (Index i = 0; i < p; ++i) out.push_back(i);
    }
    return out;
  }

  /// The model's keys or values at `positions`, as a (B, H, n, D) tensor in L.
  Tensor4<T> model_tensor(const std::vector<Index>& positions, bool keys) const {
    const auto n = static_cast<Index>(positions.size());
    Tensor4<T> out(kvtest::dims<L>(B_, H_, n, D_));
    const std::vector<float>& src = keys ? k_ : v_;
    for (Index i = 0; i < n; ++i) {
      const float* at = src.data() + positions[static_cast<std::size_t>(i)] * row_;
      for (Index b = 0; b < B_; ++b)
        for (Index h = 0; h < H_; ++h) {
          const float* from = at + (b * H_ + h) * D_;
          T* to = kvtest::row<L>(out, b, h, i);
          for (Index d = 0; d < D_; ++d) to[d] = static_cast<T>(from[d]);
        }
    }
    return out;
  }

  Tensor4<T> make_tensor(Index b, Index h, Index n, Index d, std::uint16_t seed, int mode) {
    Tensor4<T> x(kvtest::dims<L>(b, h, n, d));
    Numbers numbers(seed * 0x100000001ull + 12345);
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(numbers.element(mode));
    return x;
  }

  static bool has_non_finite(const Tensor4<T>& x) {
    for (Index i = 0; i < x.size(); ++i)
      if (!std::isfinite(static_cast<float>(x.data()[i]))) return true;
    return false;
  }

  /// Appends n tokens of k, v (b batch rows; the others zero) to the model.
  void append_to_model(const Tensor4<T>& k, const Tensor4<T>& v, Index b, Index n) {
    for (Index i = 0; i < n; ++i)
      for (Index bb = 0; bb < B_; ++bb)
        for (Index h = 0; h < H_; ++h) {
          const T* k_row = bb < b ? kvtest::row<L>(k, bb, h, i) : nullptr;
          const T* v_row = bb < b ? kvtest::row<L>(v, bb, h, i) : nullptr;
          for (Index d = 0; d < D_; ++d) {
            k_.push_back(k_row != nullptr ? static_cast<float>(k_row[d]) : 0.0f);
            v_.push_back(v_row != nullptr ? static_cast<float>(v_row[d]) : 0.0f);
          }
        }
  }

  void truncate_model(Index n) {
    k_.resize(static_cast<std::size_t>(n * row_));
    v_.resize(static_cast<std::size_t>(n * row_));
    if constexpr (kQuantized) times_quantized_.resize(static_cast<std::size_t>(n));
  }

  // --- checks ------------------------------------------------------------------------------------

  /// "int4<half>/BSHD": for the statistics.
  static const std::string& kind_name() {
    static const std::string name = [] {
      const char* kinds[] = {"static", "dynamic", "sliding", "int8", "int4", "prefix"};
      const char* type = std::is_same_v<T, float> ? "" : std::is_same_v<T, Eigen::half> ? "<half>" : "<bfloat16>";
      return text(kinds[static_cast<int>(K)], type, "/", L::name);
    }();
    return name;
  }

  void check_state(const std::string& after) {
    const Cache& c = *cache_;
    FUZZ_CHECK(c.size() == expected_size(), after, ": size() ", c.size(), ", model ", expected_size());
    FUZZ_CHECK(c.position() == pos(), after, ": position() ", c.position(), ", model ", pos());
    FUZZ_CHECK(c.capacity() == expected_capacity(), after, ": capacity() ", c.capacity(),
               ", model ", expected_capacity());
    FUZZ_CHECK(c.memory_bytes() == expected_memory(), after, ": memory_bytes() ", c.memory_bytes(),
               ", model ", expected_memory());
    FUZZ_CHECK(c.batch_size() == B_ && c.num_heads() == H_ && c.head_dim() == D_, after,
               ": shape changed");
    if constexpr (kSliding) {
      FUZZ_CHECK(c.window() == window_ && c.num_sink_tokens() == sinks_, after,
                 ": window/sinks changed");
    }
    if constexpr (kPrefix) {
      FUZZ_CHECK(c.prefix_length() == prefix_len_ && c.max_new_tokens() == cap_, after,
                 ": prefix_length() ", c.prefix_length(), " (model ", prefix_len_,
                 "), max_new_tokens() ", c.max_new_tokens());
    }
    const std::vector<Index> held = held_positions();
    const Tensor4<T> keys = c.keys(), values = c.values();
    const Tensor4<T> want_keys = model_tensor(held, true), want_values = model_tensor(held, false);
    if constexpr (!kQuantized) {
      FUZZ_CHECK(bit_equal(keys, want_keys), after, ": keys() differ from the model (", dims_of(keys),
                 " vs ", dims_of(want_keys), ")");
      FUZZ_CHECK(bit_equal(values, want_values), after, ": values() differ from the model");
    } else {
      const Index quantized = pos() - tail_length(pos(), config_);
      FUZZ_CHECK(c.quantized_size() == quantized, after, ": quantized_size() ", c.quantized_size(),
                 ", model ", quantized);
      FUZZ_CHECK(keys.dimensions() == want_keys.dimensions() &&
                     values.dimensions() == want_values.dimensions(),
                 after, ": keys()/values() shape ", dims_of(keys), ", model ", dims_of(want_keys));
      check_quantized_contents(keys, want_keys, after, "keys");
      check_quantized_contents(values, want_values, after, "values");
    }
  }

  /// Positions never quantized must be exact; a position quantized q times is within q
  /// quantization errors (scale / 2 each, scale <= range / levels rounded up to bfloat16) of the
  /// input, for inputs in [-1, 1].
  void check_quantized_contents(const Tensor4<T>& got, const Tensor4<T>& want,
                                const std::string& after, const char* what) {
    const double levels = (1 << kBits) - 1;
    for (Index p = 0; p < pos(); ++p) {
      const int q = times_quantized_[static_cast<std::size_t>(p)];
      if (q > 0 && wild_) continue;
      // Plus the rounding of the dequantized value to T.
      const double tol = q * 1.1 * (1.0 + q * 1.1 / levels) / levels + 1e-6 +
                         (q > 0 ? 2.0 * double(Eigen::NumTraits<T>::epsilon()) : 0.0);
      for (Index b = 0; b < B_; ++b)
        for (Index h = 0; h < H_; ++h) {
          const T* got_row = kvtest::row<L>(got, b, h, p);
          const T* want_row = kvtest::row<L>(want, b, h, p);
          for (Index d = 0; d < D_; ++d) {
            const T x = got_row[d], y = want_row[d];
            if (q == 0) {
              FUZZ_CHECK(std::memcmp(&x, &y, sizeof x) == 0, after, ": ", what, "() at position ",
                         p, " (unquantized tail) is ", float(x), ", appended ", float(y));
            } else {
              FUZZ_CHECK(std::abs(double(float(x)) - double(float(y))) <= tol, after, ": ", what,
                         "() at position ", p, " (quantized ", q, " times) is ", float(x),
                         ", appended ", float(y), ", tolerance ", tol);
            }
          }
        }
    }
  }

  /// Calls f (a mutating call), checks the exception type and, after a throw, an unchanged
  /// cache. Returns true when f succeeded.
  template <class F>
  bool expect(Outcome want, const std::string& what_call, F&& f) {
    last_op_ = what_call;
    const Snapshot<Cache> before(*cache_);
    std::string message;
    const Outcome got = outcome_of(f, &message);
    if (counting()) count(text(kind_name(), " ", what_call.substr(0, what_call.find('(')), ": ", name(got)));
    FUZZ_CHECK(got == want, what_call, ": expected ", name(want), ", got ", name(got), " ", message);
    if (got != Outcome::ok) {
      const std::string diff = before.diff(Snapshot<Cache>(*cache_));
      FUZZ_CHECK(diff.empty(), what_call, " threw ", name(got), " but changed the cache: ", diff);
    }
    return got == Outcome::ok;
  }

  // --- operations ------------------------------------------------------------------------------

  Index choose_length(Index room) {
    switch (in_.range(0, 9)) {
      case 0: return 0;
      case 1: case 2: case 3: case 4: return in_.range(1, 4);
      case 5: return in_.range(1, 16);
      case 6: return in_.range(1, 70);
      case 7: return long_ ? in_.range(1, 5000) : in_.range(1, 70);
      default:  // exactly fill, or one past, a fixed capacity
        return std::max<Index>(0, room + in_.range(0, 1));
    }
  }

  Index room() const {
    if constexpr (kPrefix) return cap_ - (pos() - prefix_len_);
    if constexpr (K == Kind::static_cache || kQuantized) return cap_ - pos();
    return 64;
  }

  void op_update() {
    Index b = in_.range(1, B_), h = H_, d = D_;
    bool mismatch = false;
    if (in_.chance(24)) {
      switch (in_.range(0, 3)) {
        case 0: b = in_.chance(128) ? 0 : B_ + 1; break;
        case 1: h = in_.chance(128) && H_ > 1 ? H_ - 1 : H_ + 1; break;
        case 2: d = in_.chance(128) && D_ > 1 ? D_ - 1 : D_ + 1; break;
        default: mismatch = true;
      }
    }
    Index n = choose_length(room());
    const bool shape_ok = b >= 1 && b <= B_ && h == H_ && d == D_ && !mismatch;
    if (shape_ok && n * row_ > kElementBudget - appended_) n = 0;  // the run's budget is spent
    const int mode = in_.chance(12) ? 3 : static_cast<int>(in_.range(0, 2));
    const Tensor4<T> k = make_tensor(b, h, n, d, in_.u16(), mode);
    const Tensor4<T> v = mismatch ? make_tensor(b, h, n + 1, d, in_.u16(), mode)
                                      : make_tensor(b, h, n, d, in_.u16(), mode);
    const bool as_map = in_.chance(64);

    Outcome want = Outcome::ok;
    if (!shape_ok)
      want = Outcome::invalid_argument;
    else if (n > 0 && (K == Kind::static_cache || kQuantized || kPrefix) && n > room())
      want = Outcome::length_error;
    else if (kQuantized && (has_non_finite(k) || has_non_finite(v)))
      want = Outcome::invalid_argument;  // a quantized cache stores finite values only
    const bool ok = expect(want, text("update(", dims_of(k), ")"), [&] {
      if (as_map) {
        Eigen::TensorMap<const Tensor4<T>> km(k.data(), k.dimensions());
        Eigen::TensorMap<const Tensor4<T>> vm(v.data(), v.dimensions());
        cache_->update(km, vm);
      } else {
        cache_->update(k, v);
      }
    });
    if (!ok || n == 0) return;

    const Index old_pos = pos();
    appended_ += n * row_;
    if (mode == 3) wild_ = true;
    if constexpr (kDynamic) {
      if (n > cap_ - old_pos) cap_ = std::max({old_pos + n, 2 * cap_, Index(16)});
    }
    if constexpr (kSliding) ring_ = std::max(ring_, n + window_ - 1);
    append_to_model(k, v, b, n);
    if constexpr (kQuantized) {
      times_quantized_.resize(static_cast<std::size_t>(pos()), 0);
      const Index from = old_pos - tail_length(old_pos, config_);
      const Index to = pos() - tail_length(pos(), config_);
      for (Index p = from; p < to; ++p) ++times_quantized_[static_cast<std::size_t>(p)];
    }
  }

  void op_crop() {
    if constexpr (kHasCrop) {
      const Index size = pos();
      Index n;
      switch (in_.range(0, 7)) {
        case 0: n = -in_.range(1, 2); break;
        case 1: n = size + in_.range(1, 2); break;
        case 2: n = in_.chance(128) ? std::numeric_limits<Index>::min() : std::numeric_limits<Index>::max(); break;
        default: n = in_.range(0, size);
      }
      const Outcome want = (n < 0 || n > size) ? Outcome::invalid_argument : Outcome::ok;
      if (!expect(want, text("crop(", n, ")"), [&] { cache_->crop(n); })) return;
      if constexpr (kPrefix) prefix_len_ = std::min(prefix_len_, n);
      truncate_model(n);
    } else {
      op_update();
    }
  }

  void op_reset() {
    expect(Outcome::ok, "reset()", [&] { cache_->reset(); });
    if constexpr (kPrefix) {
      k_ = frozen_k_;
      v_ = frozen_v_;
      prefix_len_ = prefix_tokens_;
    } else {
      truncate_model(0);
    }
    if constexpr (kSliding) ring_ = window_;
    wild_ = false;
  }

  void op_freeze_or_reserve() {
    if constexpr (kDynamic) {
      if (in_.chance(128)) {
        const Index n = in_.chance(32) ? -in_.range(0, 5) : in_.range(0, long_ ? 6000 : 200);
        expect(Outcome::ok, text("reserve(", n, ")"), [&] { cache_->reserve(n); });
        cap_ = std::max(cap_, n);
        return;
      }
    }
    if constexpr (kHasFreeze) {
      last_op_ = "freeze()";
      count(text(kind_name(), " freeze"));
      const std::shared_ptr<const Frozen> frozen = cache_->freeze();
      FUZZ_CHECK(frozen->size() == pos() && frozen->position() == pos() &&
                     frozen->capacity() == pos() && frozen->batch_size() == B_ &&
                     frozen->num_heads() == H_ && frozen->head_dim() == D_,
                 "freeze(): the snapshot's size/shape differ");
      FUZZ_CHECK(frozen->memory_bytes() == static_cast<std::size_t>(2 * row_ * pos()) * sizeof(T),
                 "freeze(): memory_bytes() ", frozen->memory_bytes());
      FUZZ_CHECK(bit_equal(frozen->keys(), cache_->keys()) &&
                     bit_equal(frozen->values(), cache_->values()),
                 "freeze(): the snapshot's keys()/values() differ from the cache's");
      attend_on(*frozen, /*is_frozen=*/true);
    } else {
      op_attend();
    }
  }

  void op_save_load() {
    if constexpr (kHasSave) {
      last_op_ = "save()/load()";
      count(text(kind_name(), " save/load"));
      std::stringstream stream;
      std::string what;
      Outcome got = outcome_of([&] { cache_->save(stream); }, &what);
      FUZZ_CHECK(got == Outcome::ok, "save() threw ", name(got), ": ", what);
      const std::string bytes = stream.str();
      std::optional<Cache> loaded;
      got = outcome_of([&] { loaded.emplace(Cache::load(stream)); }, &what);
      FUZZ_CHECK(got == Outcome::ok, "load() of a fresh save() threw ", name(got), ": ", what);
      FUZZ_CHECK(stream.tellg() == static_cast<std::streamoff>(bytes.size()),
                 "load() did not stop right after the record");
      const std::string diff = Snapshot<Cache>(*cache_).diff(Snapshot<Cache>(*loaded));
      FUZZ_CHECK(diff.empty(), "load(save(cache)) differs: ", diff);
      if constexpr (kQuantized) {
        FUZZ_CHECK(loaded->quantized_size() == cache_->quantized_size() &&
                       loaded->config().group_size == config_.group_size &&
                       loaded->config().residual_length == config_.residual_length,
                   "load(save(cache)): quantization state differs");
      }
      if constexpr (kSliding) {
        FUZZ_CHECK(loaded->window() == window_ && loaded->num_sink_tokens() == sinks_,
                   "load(save(cache)): window/sinks differ");
      }
      std::stringstream again;
      loaded->save(again);
      FUZZ_CHECK(again.str() == bytes, "save(load(save(cache))) differs from save(cache)");
      // Go on with the loaded cache: it must behave exactly as the original from here on.
      cache_.reset();
      cache_.emplace(std::move(*loaded));
    } else {
      op_copy();
    }
  }

  void op_copy() {
    last_op_ = "copy";
    count(text(kind_name(), " copy"));
    Cache copy(*cache_);
    const std::string diff = Snapshot<Cache>(*cache_).diff(Snapshot<Cache>(copy));
    FUZZ_CHECK(diff.empty(), "a copy differs: ", diff);
    if (in_.chance(128)) {
      *cache_ = copy;  // copy assignment
    } else {
      cache_.reset();
      cache_.emplace(std::move(copy));  // move construction
    }
  }

  void op_attend() { attend_on(*cache_, /*is_frozen=*/false); }

  /// attend() over `c` (the cache, or a snapshot of it) with a random, maybe invalid, query.
  template <class C>
  void attend_on(const C& c, bool is_frozen) {
    const Index position = c.position();
    Index qb = in_.range(1, B_), hq = H_ * in_.range(1, 3), d = D_;
    // Mostly decode-sized queries (cheap for the reference), sometimes prefill-sized ones
    // (beyond the kernel's 64-row items).
    Index q_len;
    switch (in_.range(0, 7)) {
      case 0: case 1: case 2: case 3: q_len = std::min<Index>(1, position); break;
      case 4: case 5: q_len = in_.range(0, std::min<Index>(position, 8)); break;
      default: q_len = in_.range(0, std::min<Index>(position, long_ ? 8 : 80));
    }
    if (in_.chance(20)) {
      switch (in_.range(0, 4)) {
        case 0: qb = in_.chance(128) ? 0 : B_ + 1; break;
        case 1: hq = in_.chance(128) ? 0 : H_ + 1; break;
        case 2: d = D_ + 1; break;
        default: q_len = position + in_.range(1, 3);
      }
    }
    AttendOptions options;
    // q_len > position is valid for non-causal, unwindowed queries (cross-attention): keep
    // those small, a long cache's would cost the reference q_len x position x head_dim.
    options.causal = !in_.chance(48) || (q_len > position && q_len > 96);
    if (in_.chance(48)) options.window = in_.chance(16) ? -1 : in_.range(1, position + 2);
    if (in_.chance(40)) {
      switch (in_.range(0, 7)) {
        case 0: options.softcap = -1.0f; break;
        case 1: options.softcap = std::numeric_limits<float>::infinity(); break;
        case 2: options.softcap = std::numeric_limits<float>::quiet_NaN(); break;
        default: options.softcap = 0.5f + static_cast<float>(in_.u8()) / 5.0f;
      }
    }
    if (in_.chance(40)) {
      switch (in_.range(0, 7)) {
        case 0: options.scale = std::numeric_limits<float>::infinity(); break;
        case 1: options.scale = std::numeric_limits<float>::quiet_NaN(); break;
        default: options.scale = (static_cast<float>(in_.u8()) - 128.0f) / 64.0f;
      }
    }
    Mask mask;
    bool mask_ok = true;
    if (in_.chance(40)) {
      Index rows = qb + in_.range(0, 1), cols = position;
      if (in_.chance(16)) {
        if (in_.chance(128)) rows = qb - 1; else cols = position + (in_.chance(128) ? 1 : -1);
      }
      rows = std::max<Index>(rows, 0);
      cols = std::max<Index>(cols, 0);
      mask_ok = rows >= qb && cols == position;
      mask.resize(rows, cols);
      Numbers bits(in_.u16());
      const std::uint64_t density = in_.range(0, 3);  // 0: all false ... 3: mostly true
      for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = bits.next() % 4 < density + (density == 3);
      options.key_mask = &mask;
    }
    const bool use_device = in_.chance(24);
    const int overload = in_.chance(48) ? (in_.chance(32) ? 2 : 1) : 0;  // 1: out overload; 2: with a wrong out
    const int mode = in_.chance(10) ? 3 : static_cast<int>(in_.range(0, 2));
    const Tensor4<T> q = make_tensor(qb, hq, q_len, d, in_.u16(), mode);

    // What API.md says about this call.
    const Index cache_window = kSliding && !is_frozen ? window_ : 0;
    const Index sinks = kSliding && !is_frozen ? sinks_ : 0;
    const Index effective_window =
        options.window > 0 && cache_window > 0 ? std::min(options.window, cache_window)
                                               : std::max<Index>(options.window, cache_window);
    bool valid = qb >= 1 && qb <= B_ && hq >= 1 && hq % H_ == 0 && d == D_ && options.window >= 0 &&
                 options.softcap >= 0 && std::isfinite(options.softcap) &&
                 (!options.scale || std::isfinite(*options.scale)) && mask_ok &&
                 !((options.causal || effective_window > 0) && q_len > position) && overload != 2;
    if (valid && kSliding && !is_frozen && q_len > 0) {
      // The ring holds the last ring_ non-sink positions; the first query row needs the keys of
      // its window (t - w, t], sinks apart.
      const Index first_held = std::max(sinks_, position - ring_);
      const Index needed_from = std::max(sinks_, position - q_len - effective_window + 1);
      if (first_held > sinks_ && needed_from < first_held) valid = false;
    }
    const std::string call = text("attend(q ", dims_of(q), ", causal ", options.causal, ", window ",
                                  options.window, ", softcap ", options.softcap, ", scale ",
                                  options.scale ? *options.scale : 0.0f, options.key_mask ? ", mask" : "",
                                  use_device ? ", device" : "", overload ? ", out" : "",
                                  ") at position ", position, is_frozen ? " (frozen)" : "");
    last_op_ = call;

    // The caller-output overload writes into `target`, which a failing call must not touch.
    const T kSentinel = static_cast<T>(12345.0f);
    Tensor4<T> out;
    Tensor4<T> target(kvtest::dims<L>(qb, hq, q_len + (overload == 2 ? 1 : 0), d));
    target.setConstant(kSentinel);
    std::string what;
    const Outcome got = outcome_of(
        [&] {
          if (overload == 0)
            out = kvcache::attend(q, c, options);
          else
            kvcache::attend(q, c, target, workspace_, options);
        },
        &what);
    const Outcome want = valid ? Outcome::ok : Outcome::invalid_argument;
    if (counting()) count(text(kind_name(), is_frozen ? " attend (frozen): " : " attend: ", name(got)));
    FUZZ_CHECK(got == want, call, ": expected ", name(want), ", got ", name(got), " ", what);
    if (got != Outcome::ok) {
      for (Index i = 0; i < target.size(); ++i)
        FUZZ_CHECK(bits_equal(target.data()[i], kSentinel), call, ": a failing attend wrote into out");
      return;
    }
    if (overload != 0) out = target;
    FUZZ_CHECK(out.dimensions() == q.dimensions(), call, ": output shape ", dims_of(out));

    if (use_device) {
      AttendOptions parallel = options;
      parallel.device = pool_device();
      const Tensor4<T> threaded = kvcache::attend(q, c, parallel);
      FUZZ_CHECK(bit_equal(threaded, out), call, ": the thread pool's result differs from the serial one");
    }

    // The reference: exact kinds over the model's tokens (every position since reset: what is
    // visible follows from the rules); quantized over what the cache holds.
    Tensor4<T> keys, values;
    std::vector<Index> positions;
    if constexpr (kQuantized) {
      keys = c.keys();
      values = c.values();
      positions = kvtest::iota_positions(position);
    } else {
      // A sliding window's queries see the sinks and their windows only; the other kinds'
      // every position. (Passing only those keeps long streams cheap; the rules mask the rest.)
      Index from = 0;
      if (kSliding && !is_frozen) {
        for (Index i = 0; i < std::min(sinks_, position); ++i) positions.push_back(i);
        from = std::max(sinks_, position - q_len - window_ + 1);
      }
      for (Index i = from; i < position; ++i) positions.push_back(i);
      keys = model_tensor(positions, true);
      values = model_tensor(positions, false);
    }
    auto max_abs = [](const Tensor4<T>& x) {
      double m = 0;
      for (Index i = 0; i < x.size(); ++i) {
        const double e = static_cast<float>(x.data()[i]);
        if (!tame(e)) return std::numeric_limits<double>::infinity();
        m = std::max(m, std::abs(e));
      }
      return m;
    };
    const double mq = max_abs(q), mk = max_abs(keys), mv = max_abs(values);
    if (!std::isfinite(mq) || !std::isfinite(mk) || !std::isfinite(mv)) return;
    kvtest::ReferenceRules rules = kvtest::rules_from(options);
    rules.cache_window = cache_window;
    rules.num_sink_tokens = sinks;
    const auto want_out =
        kvtest::reference_attention<L>(q, keys, values, positions, position - q_len, rules);
    const double scale = options.scale ? std::abs(double(*options.scale)) : 1.0 / std::sqrt(double(D_));
    const double score_bound = scale * double(D_) * mq * mk;
    double tol = kvtest::tolerance<T>() * std::max(1.0, score_bound) * std::max(1.0, mv);
    if constexpr (kQuantized && !std::is_same_v<T, double>) {
      // The kernel rounds the key-scale-folded query to steps of max(max|f| / 32512,
      // sum|f| * levels / 2^30) per row and block (docs/kernel.md, "Integer scores"), and
      // |f| <= scale * mq * 2 mk / levels: a score moves by at most half a step times the sum of
      // its codes, score_bound * max(2 / 65024, D * levels / 2^30), an output by twice that
      // times the largest value.
      const double levels = K == Kind::int8 ? 255.0 : 15.0;
      const double rounding = std::max(2.0 / 65024.0, double(D_) * levels / 1073741824.0);
      tol += 2.2 * rounding * std::max(1.0, score_bound) * std::max(1.0, mv);
    }
    const double err = kvtest::max_abs_diff(out, want_out);
    if (counting()) {
      count(text(kind_name(), " attend compared with the reference", q_len > 1 ? " (q_len > 1)" : "",
                 q_len > 64 ? " (q_len > 64)" : "", position >= 4096 ? " (>= 4096 keys: split-K)" : ""));
      if (options.key_mask || options.window > 0 || options.softcap > 0 || !options.causal || use_device)
        count(text(kind_name(), " attend compared with the reference, with options"));
    }
    FUZZ_CHECK(err <= tol, call, ": differs from the reference by ", err, " (tolerance ", tol, ")");
  }

  ByteReader& in_;
  bool long_ = false;
  Index B_ = 1, H_ = 1, D_ = 1, row_ = 1;
  Index cap_ = 0;  // static/quantized: max_seq_len; dynamic: capacity; prefix: max_new_tokens
  Index window_ = 0, sinks_ = 0, ring_ = 0;
  QuantConfig config_;
  Index prefix_tokens_ = 0, prefix_len_ = 0;
  std::vector<float> frozen_k_, frozen_v_;
  std::vector<float> k_, v_;              // every token held, [position][batch][head][dim]
  std::vector<int> times_quantized_;      // int8/int4: per position
  bool wild_ = false;                     // non-tame values appended since the last reset
  Index appended_ = 0;
  std::optional<Cache> cache_;
  std::shared_ptr<const Frozen> frozen_;
  AttendWorkspace workspace_;
  std::string last_op_ = "construction";
};

template <class L, class T>
void run_kind(int kind, ByteReader& in) {
  switch (kind) {
    case 0: Driver<Kind::static_cache, L, T>(in).run(); break;
    case 1: Driver<Kind::dynamic_cache, L, T>(in).run(); break;
    case 2: Driver<Kind::sliding_window, L, T>(in).run(); break;
    case 3: Driver<Kind::int8, L, T>(in).run(); break;
    case 4: Driver<Kind::int4, L, T>(in).run(); break;
    default: Driver<Kind::prefix, L, T>(in).run(); break;
  }
}

/// Runs kind (0-5) in BHSD (layout 0) or BSHD of float (fuzz_operations.cpp).
void run_float(int kind, int layout, ByteReader& in);
/// Runs kind 0 (static), 2 (sliding) or 3 (int8) in BHSD (layout 0) or BSHD of Eigen::half
/// (type 1) or Eigen::bfloat16 (type 2) (fuzz_operations_16bit.cpp).
void run_16bit(int kind, int layout, int type, ByteReader& in);

}  // namespace ops
}  // namespace kvfuzz

#endif  // KVCACHE_FUZZ_OPERATIONS_HPP
