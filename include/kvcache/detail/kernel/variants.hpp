// kvcache: the compiled variants of the kernel and the choice among them.
//
// The kernel's inner loops (block_math.inl, dense_block.inl, quantized_block.inl, unit.inl) are
// written once over a vector type and included here once per instruction set, each time inside
// its own namespace (isa_scalar, isa_avx2, isa_avx512) and, for the x86 ones, inside a region
// whose functions are compiled for that target (`#pragma GCC target` / `#pragma clang attribute`)
// whatever flags the build uses. So one baseline build (-O2, no -march) holds an AVX2 and an
// AVX-512 kernel, and the CPU it runs on picks one (kernel_isa.hpp). The namespaces keep each
// variant's functions apart: no inline function compiled for AVX-512 can be merged by the linker
// with a baseline one of the same name. Code outside the regions (Eigen, the standard library,
// detail/kernel/unit.hpp) stays baseline; the regions call it, never the other way round.
// docs/kernel.md explains the choice (against Google Highway) and how to add a variant.
#ifndef KVCACHE_DETAIL_KERNEL_VARIANTS_HPP
#define KVCACHE_DETAIL_KERNEL_VARIANTS_HPP

#include <kvcache/detail/kernel/unit.hpp>
#include <kvcache/detail/kernel/vec_portable.hpp>
#include <kvcache/kernel_isa.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(KVCACHE_X86) && (!defined(KVCACHE_COMPILED_KERNELS) || defined(KVCACHE_DEFINE_KERNELS))
#include <immintrin.h>
#endif

namespace kvcache {
namespace detail {

#if defined(KVCACHE_COMPILED_KERNELS) && !defined(KVCACHE_DEFINE_KERNELS)

// The variants are compiled once, elsewhere (docs/kernel.md, "Compiled kernels"): one
// translation unit of the program defines KVCACHE_DEFINE_KERNELS (the CMake target
// kvcache::compiled has it). This one only calls them.
template <class T, class Acc, bool QuantizedBlocks>
UnitFunction<T, Acc> unit_function(Isa isa);

#else

namespace isa_scalar {
using FloatVec = PortableVec<float, 4>;
#include <kvcache/detail/kernel/row_groups.inl>
#include <kvcache/detail/kernel/block_math.inl>
#include <kvcache/detail/kernel/dense_block.inl>
#include <kvcache/detail/kernel/quantized_block.inl>
#include <kvcache/detail/kernel/unit.inl>
}  // namespace isa_scalar

#if defined(KVCACHE_HAS_X86_VARIANTS)
// MSVC needs no region: it accepts every intrinsic in any function.

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace isa_avx2 {
#include <kvcache/detail/kernel/row_groups.inl>
#include <kvcache/detail/kernel/vec_avx2.inl>
#include <kvcache/detail/kernel/block_math.inl>
#include <kvcache/detail/kernel/dense_block.inl>
#include <kvcache/detail/kernel/quantized_block.inl>
#include <kvcache/detail/kernel/unit.inl>
}  // namespace isa_avx2
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// The one function that needs AVX-512 VNNI, in a region of its own: the AVX-512 variant calls
// it only where the CPU has the instruction (Isa::kAvx512Vnni).
#if defined(__clang__)
#pragma clang attribute push(                                                                 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512vnni")
#endif
namespace isa_avx512_vnni {
#include <kvcache/detail/kernel/row_groups.inl>
#include <kvcache/detail/kernel/vec_avx512_vnni.inl>
}  // namespace isa_avx512_vnni
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#if defined(__clang__)
#pragma clang attribute push(                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// g++ 12 reports AVX-512 intrinsics that start from _mm512_undefined_* as uninitialized once
// inlined (a false positive): vec_avx512.inl avoids them, but Eigen's own AVX-512 code, inlined
// here in -march=native builds, uses them. (A precompiled header loses this pragma.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace isa_avx512 {
#include <kvcache/detail/kernel/row_groups.inl>
#include <kvcache/detail/kernel/vec_avx512.inl>
#include <kvcache/detail/kernel/block_math.inl>
#include <kvcache/detail/kernel/dense_block.inl>
#include <kvcache/detail/kernel/quantized_block.inl>
#include <kvcache/detail/kernel/unit.inl>
}  // namespace isa_avx512
#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif  // KVCACHE_HAS_X86_VARIANTS

/// The unit function of the variant `isa` (or the best compiled one below it: a compiler
/// without target regions has only the portable variant), with the quantized path compiled in
/// or not.
template <class T, class Acc, bool QuantizedBlocks>
UnitFunction<T, Acc> unit_function(Isa isa) {
#if defined(KVCACHE_HAS_X86_VARIANTS)
  // VNNI changes one function of the AVX-512 variant, which asks selected_isa() itself.
  if (isa == Isa::kAvx512 || isa == Isa::kAvx512Vnni)
    return &isa_avx512::attend_unit<T, Acc, QuantizedBlocks>;
  if (isa == Isa::kAvx2) return &isa_avx2::attend_unit<T, Acc, QuantizedBlocks>;
#endif
  (void)isa;
  return &isa_scalar::attend_unit<T, Acc, QuantizedBlocks>;
}

#if defined(KVCACHE_DEFINE_KERNELS)
// The definitions the other translation units of a KVCACHE_COMPILED_KERNELS program call:
// every element type, with and without quantized blocks.
template UnitFunction<float, float> unit_function<float, float, false>(Isa);
template UnitFunction<float, float> unit_function<float, float, true>(Isa);
template UnitFunction<double, double> unit_function<double, double, false>(Isa);
template UnitFunction<double, double> unit_function<double, double, true>(Isa);
template UnitFunction<Eigen::half, float> unit_function<Eigen::half, float, false>(Isa);
template UnitFunction<Eigen::half, float> unit_function<Eigen::half, float, true>(Isa);
template UnitFunction<Eigen::bfloat16, float> unit_function<Eigen::bfloat16, float, false>(Isa);
template UnitFunction<Eigen::bfloat16, float> unit_function<Eigen::bfloat16, float, true>(Isa);
#endif

#endif  // KVCACHE_COMPILED_KERNELS && !KVCACHE_DEFINE_KERNELS

}  // namespace detail
}  // namespace kvcache

#endif  // KVCACHE_DETAIL_KERNEL_VARIANTS_HPP
