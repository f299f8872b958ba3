// kvcache: AttendWorkspace - the scratch memory of attend(), kept between calls.
#ifndef KVCACHE_ATTEND_WORKSPACE_HPP
#define KVCACHE_ATTEND_WORKSPACE_HPP

#include <cstddef>
#include <vector>

namespace kvcache {

/// \brief Scratch memory for attend(q, cache, out, workspace, options): the per-thread tiles,
/// accumulators and softmax states of the kernel, and the partial states of a sequence split
/// across threads. It grows to the largest call it has served and never shrinks, so a decode
/// loop that reuses one workspace allocates nothing after its first step.
///
/// Not thread-safe: one workspace per thread that calls attend() (the thread pool inside one
/// call is fine). Moving is cheap; copying copies the bytes.
class AttendWorkspace {
 public:
  AttendWorkspace() = default;

  /// Bytes held now.
  std::size_t capacity_bytes() const noexcept { return storage_.size() * sizeof(Line); }

  /// Grows to at least `bytes` (never shrinks). attend() grows it as needed; calling this
  /// first with the largest step to come moves that allocation out of the loop.
  void reserve(std::size_t bytes) {
    const std::size_t lines = (bytes + sizeof(Line) - 1) / sizeof(Line);
    if (lines > storage_.size()) {
      storage_.clear();
      storage_.shrink_to_fit();
      storage_.resize(lines);
    }
  }

  /// Frees the memory.
  void release() noexcept {
    storage_.clear();
    storage_.shrink_to_fit();
  }

  /// The start of capacity_bytes() bytes aligned to 64, for the kernel.
  unsigned char* data() noexcept { return storage_.empty() ? nullptr : storage_.front().bytes; }

 private:
  struct alignas(64) Line {
    unsigned char bytes[64];
  };
  std::vector<Line> storage_;
};

}  // namespace kvcache

#endif  // KVCACHE_ATTEND_WORKSPACE_HPP
