// kvcache: the memory of a cache's keys or of its values. Every buffer starts on a cache line
// (64 bytes: a head_dim that is a multiple of 16 floats keeps every row on whole lines, so no
// vector load of the kernel straddles two). On Linux a buffer of 32 MiB or more also starts on a
// 2 MiB boundary and is advised as transparent huge pages (madvise MADV_HUGEPAGE; the system's
// /sys/kernel/mm/transparent_hugepage setting decides whether it is honoured): a 1 GiB cache
// then needs 512 TLB entries instead of 262144, and how fast it streams no longer depends on
// where its 4 KiB pages happened to land (measured: a paged pool read 15-20% slower than a
// contiguous cache of the same shape allocated after it; with huge pages the two are within 4%;
// docs/kernel.md). Smaller buffers gain little TLB reach and would pay for zeroing whole 2 MiB
// pages of which a cache may touch a corner per head (the persistence fuzzer, loading caches of
// a few MiB, ran at half speed with a 2 MiB threshold). The environment variable
// KVCACHE_HUGE_PAGES=0 turns the advice off (read once): the memory is then backed page by
// page as positions are written, as before.
#ifndef KVCACHE_DETAIL_KV_BUFFER_HPP
#define KVCACHE_DETAIL_KV_BUFFER_HPP

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kvcache {
namespace detail {

/// Bytes of a transparent huge page on x86-64 and on AArch64 with 4 KiB base pages.
inline constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;
/// Buffers of at least this many bytes are advised as huge pages.
inline constexpr std::size_t kHugePageAdviceBytes = std::size_t(32) << 20;

/// Whether buffers of kHugePageAdviceBytes or more are advised as huge pages: yes, unless the
/// environment sets KVCACHE_HUGE_PAGES=0 (read at the first large allocation).
inline bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* setting = std::getenv("KVCACHE_HUGE_PAGES");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  return wanted;
}

/// Whether a buffer of `bytes` is advised as huge pages (and aligned for them) on this system.
/// Only where madvise(MADV_HUGEPAGE) exists: elsewhere a 2 MiB alignment would only cost. A
/// buffer this large is always a mapping of its own (glibc serves requests above its largest
/// mmap threshold, 32 MiB, with mmap), so the advice never reaches other allocations.
inline bool advises_huge_pages(std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return bytes >= kHugePageAdviceBytes && huge_pages_wanted();
#else
  (void)bytes;
  return false;
#endif
}

/// `count` elements of T, uninitialised (as Eigen's tensors leave them: no page is touched
/// before a position is written), aligned as the header comment says. Copies are deep.
template <class T>
class KVBuffer {
  static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>,
                "kvcache: a KVBuffer holds trivially copyable elements (float, double, half, "
                "bfloat16, bytes)");

 public:
  KVBuffer() = default;
  /// Throws std::bad_alloc when the memory is not there (std::bad_array_new_length when
  /// count elements cannot be addressed).
  explicit KVBuffer(std::size_t count) : data_(allocate(count)), count_(count) {}
  KVBuffer(const KVBuffer& other) : KVBuffer(other.count_) {
    if (count_ > 0) std::memcpy(data_.get(), other.data_.get(), count_ * sizeof(T));
  }
  KVBuffer(KVBuffer&& other) noexcept
      : data_(std::move(other.data_)), count_(std::exchange(other.count_, 0)) {}
  KVBuffer& operator=(KVBuffer other) noexcept {
    swap(other);
    return *this;
  }
  ~KVBuffer() = default;

  void swap(KVBuffer& other) noexcept {
    data_.swap(other.data_);
    std::swap(count_, other.count_);
  }

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  std::size_t size() const { return count_; }

 private:
  struct Release {
    std::align_val_t alignment{alignof(T)};
    void operator()(T* elements) const { ::operator delete(elements, alignment); }
  };
  using Owner = std::unique_ptr<T, Release>;

  static Owner allocate(std::size_t count) {
    if (count == 0) return Owner(nullptr, Release{});
    if (count > static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max()) / sizeof(T))
      throw std::bad_array_new_length();
    const std::size_t bytes = count * sizeof(T);
    const bool huge = advises_huge_pages(bytes);
    const std::align_val_t alignment{huge ? kHugePageBytes : std::max<std::size_t>(64, alignof(T))};
    void* memory = ::operator new(bytes, alignment);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advice only: a kernel without THP (or with it set to "never") refuses, and nothing
    // changes. The length is rounded up to whole 4 KiB pages, all inside the mapping.
    if (huge) (void)madvise(memory, (bytes + 4095) / 4096 * 4096, MADV_HUGEPAGE);
#endif
    // The elements are trivially copyable: they live once written (as in Eigen's tensors of
    // them, which skip construction too).
    return Owner(static_cast<T*>(memory), Release{alignment});
  }

  Owner data_{nullptr, Release{}};
  std::size_t count_ = 0;
};

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KV_BUFFER_HPP
