// Replaces every global operator new and delete of the test executable that includes this
// header (include it in exactly one file of an executable) with malloc/free versions that count
// allocations and can record the largest one. Every form is replaced - plain, array, nothrow,
// aligned - so that each new/delete pair stays one allocator (AddressSanitizer checks that).
#ifndef KVCACHE_TESTS_SUPPORT_COUNTING_ALLOCATOR_HPP
#define KVCACHE_TESTS_SUPPORT_COUNTING_ALLOCATOR_HPP

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>

namespace kvtest {

/// Allocations made through operator new so far.
inline std::atomic<long> allocation_count{0};
/// While true, largest_allocation keeps the largest size requested.
inline std::atomic<bool> tracking_allocations{false};
inline std::atomic<std::size_t> largest_allocation{0};

inline void* counted_allocation(std::size_t size, std::size_t alignment) noexcept {
  allocation_count.fetch_add(1, std::memory_order_relaxed);
  if (tracking_allocations.load(std::memory_order_relaxed)) {
    std::size_t seen = largest_allocation.load(std::memory_order_relaxed);
    while (size > seen && !largest_allocation.compare_exchange_weak(seen, size)) {
    }
  }
  if (size == 0) size = 1;
  if (alignment <= alignof(std::max_align_t)) return std::malloc(size);
  void* p = nullptr;
  return posix_memalign(&p, alignment, size) == 0 ? p : nullptr;
}

inline void* counted_or_throw(std::size_t size, std::size_t alignment) {
  if (void* p = counted_allocation(size, alignment)) return p;
  throw std::bad_alloc();
}

}  // namespace kvtest

// g++ 12 inlines these and then mistakes the malloc/free pair underneath for a new/free
// mismatch (-Wmismatched-new-delete); they do match.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) { return kvtest::counted_or_throw(n, 0); }
void* operator new[](std::size_t n) { return kvtest::counted_or_throw(n, 0); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  return kvtest::counted_allocation(n, 0);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return kvtest::counted_allocation(n, 0);
}
void* operator new(std::size_t n, std::align_val_t a) {
  return kvtest::counted_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return kvtest::counted_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return kvtest::counted_allocation(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return kvtest::counted_allocation(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  std::free(p);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // KVCACHE_TESTS_SUPPORT_COUNTING_ALLOCATOR_HPP
