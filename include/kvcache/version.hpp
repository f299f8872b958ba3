// kvcache: version of the library. CMake reads the three macros below.
#ifndef KVCACHE_VERSION_HPP
#define KVCACHE_VERSION_HPP

#define KVCACHE_VERSION_MAJOR 0
#define KVCACHE_VERSION_MINOR 1
#define KVCACHE_VERSION_PATCH 0

namespace kvcache {

/// \brief The library version as numbers, for run-time checks.
struct Version {
  int major;
  int minor;
  int patch;
};
inline constexpr Version version{KVCACHE_VERSION_MAJOR, KVCACHE_VERSION_MINOR,
                                 KVCACHE_VERSION_PATCH};

}  // namespace kvcache

#endif  // KVCACHE_VERSION_HPP
