// The memory of the caches' K/V (detail/kv_buffer.hpp): alignment, the huge-page advice and
// its switch (ctest runs this file twice: as is, and with KVCACHE_HUGE_PAGES=0), deep copies,
// moves; and that the caches' storage is such a buffer.
#include "support/catch.hpp"

#include <kvcache/kvcache.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace {

using kvcache::Index;
using kvcache::detail::KVBuffer;

constexpr std::size_t kHuge = kvcache::detail::kHugePageBytes;
constexpr std::size_t kAdvised = kvcache::detail::kHugePageAdviceBytes;

std::uintptr_t address_of(const void* p) { return reinterpret_cast<std::uintptr_t>(p); }

bool environment_turns_huge_pages_off() {
  const char* setting = std::getenv("KVCACHE_HUGE_PAGES");
  return setting != nullptr && std::strcmp(setting, "0") == 0;
}

/// The VmFlags line of the mapping of this process that holds `p` ("" when there is no
/// /proc/self/smaps, or no such line).
std::string mapping_flags(const void* p) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    unsigned long long start = 0, end = 0;
    char dash = 0;
    std::istringstream header(line);
    // A mapping's first line: "start-end perms ..." in hex.
    if (header >> std::hex >> start >> dash >> end && dash == '-') {
      inside = start <= address_of(p) && address_of(p) < end;
      continue;
    }
    if (inside && line.rfind("VmFlags:", 0) == 0) return line;
  }
  return "";
}

/// Whether this kernel has transparent huge pages (then madvise(MADV_HUGEPAGE) succeeds and
/// marks the mapping "hg" whatever the enabled setting).
bool kernel_has_thp() {
  std::ifstream enabled("/sys/kernel/mm/transparent_hugepage/enabled");
  return enabled.good();
}

}  // namespace

TEST_CASE("KVBuffer: the switch is read from the environment", "[kv_buffer]") {
  CHECK(kvcache::detail::huge_pages_wanted() == !environment_turns_huge_pages_off());
}

TEST_CASE("KVBuffer: small buffers start on a cache line", "[kv_buffer]") {
  for (std::size_t count : {std::size_t(1), std::size_t(3), std::size_t(100), std::size_t(4097)}) {
    KVBuffer<float> floats(count);
    KVBuffer<Eigen::half> halves(count);
    KVBuffer<std::uint8_t> bytes(count);
    CHECK(floats.size() == count);
    CHECK(address_of(floats.data()) % 64 == 0);
    CHECK(address_of(halves.data()) % 64 == 0);
    CHECK(address_of(bytes.data()) % 64 == 0);
  }
  KVBuffer<float> empty(0);
  CHECK(empty.size() == 0);
  CHECK(empty.data() == nullptr);
}

TEST_CASE("KVBuffer: buffers of 32 MiB or more on huge pages unless switched off", "[kv_buffer]") {
  const std::size_t count = kAdvised / sizeof(float) + 5;  // not a whole number of huge pages
  KVBuffer<float> buffer(count);
  for (std::size_t i = 0; i < count; ++i) buffer.data()[i] = static_cast<float>(i % 251);
  CHECK(buffer.data()[count - 1] == static_cast<float>((count - 1) % 251));
  const std::string flags = mapping_flags(buffer.data());
  CAPTURE(flags);
#if defined(__linux__)
  CHECK(kvcache::detail::advises_huge_pages(kAdvised) == kvcache::detail::huge_pages_wanted());
#else
  CHECK_FALSE(kvcache::detail::advises_huge_pages(kAdvised));
#endif
  CHECK_FALSE(kvcache::detail::advises_huge_pages(kAdvised - 1));
  if (kvcache::detail::advises_huge_pages(count * sizeof(float))) {
    CHECK(address_of(buffer.data()) % kHuge == 0);
#if defined(__linux__)
    if (kernel_has_thp() && !flags.empty()) CHECK(flags.find(" hg") != std::string::npos);
#endif
  } else {
    CHECK(address_of(buffer.data()) % 64 == 0);
    if (!flags.empty()) CHECK(flags.find(" hg") == std::string::npos);
  }
  // Just below the threshold: a cache line, no advice.
  KVBuffer<std::uint8_t> below(kAdvised - 1);
  below.data()[0] = 1;
  CHECK(address_of(below.data()) % 64 == 0);
  const std::string below_flags = mapping_flags(below.data());
  CAPTURE(below_flags);
  if (!below_flags.empty()) CHECK(below_flags.find(" hg") == std::string::npos);
}

TEST_CASE("KVBuffer: copies are deep, moves leave an empty buffer", "[kv_buffer]") {
  KVBuffer<double> original(37);
  for (std::size_t i = 0; i < original.size(); ++i) original.data()[i] = 0.5 * static_cast<double>(i);
  KVBuffer<double> copy(original);
  REQUIRE(copy.size() == 37);
  CHECK(copy.data() != original.data());
  for (std::size_t i = 0; i < copy.size(); ++i) CHECK(copy.data()[i] == 0.5 * static_cast<double>(i));
  copy.data()[3] = -1.0;
  CHECK(original.data()[3] == 1.5);

  KVBuffer<double> assigned(2);
  assigned = original;
  REQUIRE(assigned.size() == 37);
  CHECK(assigned.data()[36] == 18.0);
  const KVBuffer<double>& same = assigned;
  assigned = same;  // self-assignment keeps the contents
  REQUIRE(assigned.size() == 37);
  CHECK(assigned.data()[36] == 18.0);

  const double* storage = original.data();
  KVBuffer<double> moved(std::move(original));
  CHECK(moved.data() == storage);
  CHECK(moved.size() == 37);
  CHECK(original.size() == 0);  // NOLINT(bugprone-use-after-move): the moved-from state is the point
  CHECK(original.data() == nullptr);
}

TEST_CASE("KVBuffer: a cache's K/V storage is one", "[kv_buffer]") {
  // 4 heads x 32768 positions x 64 floats: 32 MiB per part, the threshold.
  kvcache::StaticKVCache<float> cache(1, 32768, 4, 64);
  kvcache::Tensor4<float> k(1, 4, 1, 64), v(1, 4, 1, 64);
  k.setConstant(1.0f);
  v.setConstant(2.0f);
  cache.update(k, v);
  const kvcache::detail::KVView<float> view = cache.attention_view();
  REQUIRE(view.num_segments == 1);
  const std::size_t alignment =
      kvcache::detail::advises_huge_pages(32768u * 64u * sizeof(float)) ? kHuge : 64;
  CHECK(address_of(view.segments[0].keys) % alignment == 0);
  CHECK(address_of(view.segments[0].values) % alignment == 0);
  // A copy of the cache owns its own storage, with the same contents.
  kvcache::StaticKVCache<float> copy = cache;
  const kvcache::detail::KVView<float> copied = copy.attention_view();
  CHECK(copied.segments[0].keys != view.segments[0].keys);
  CHECK(copied.segments[0].keys[63] == 1.0f);
  CHECK(copied.segments[0].values[0] == 2.0f);
  CHECK(cache.memory_bytes() == 2u * 4u * 32768u * 64u * sizeof(float));
}

TEST_CASE("KVBuffer: a moved-from storage is empty, and its cache refuses updates", "[kv_buffer]") {
  kvcache::DynamicKVCache<float> cache(1, 2, 8, 32);
  kvcache::Tensor4<float> k(1, 2, 3, 8);
  k.setConstant(0.25f);
  cache.update(k, k);
  kvcache::DynamicKVCache<float> moved(std::move(cache));
  CHECK(moved.size() == 3);
  CHECK(moved.memory_bytes() == 2u * 2u * 32u * 8u * sizeof(float));
  // NOLINTNEXTLINE(bugprone-use-after-move): what a moved-from cache does is the point
  CHECK(cache.memory_bytes() == 0);
  CHECK_THROWS_AS(cache.update(k, k), std::invalid_argument);

  kvcache::detail::KVStorage<float, kvcache::BHSD> storage(1, 2, 16, 8);
  kvcache::detail::KVStorage<float, kvcache::BHSD> taken(std::move(storage));
  CHECK(taken.capacity() == 16);
  CHECK(storage.capacity() == 0);  // NOLINT(bugprone-use-after-move)
  CHECK(storage.memory_bytes() == 0);
}
