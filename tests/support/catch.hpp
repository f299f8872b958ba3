// Catch2 shim: the tests include "support/catch.hpp" and build with Catch2 v3 (when
// tests/CMakeLists.txt finds it and defines KVCACHE_CATCH2_V3) or with Debian's Catch2 v2.
#ifndef KVCACHE_TESTS_SUPPORT_CATCH_HPP
#define KVCACHE_TESTS_SUPPORT_CATCH_HPP

#if defined(KVCACHE_CATCH2_V3)
#include <catch2/catch_all.hpp>
#else
#include <catch2/catch.hpp>
#endif

#endif  // KVCACHE_TESTS_SUPPORT_CATCH_HPP
