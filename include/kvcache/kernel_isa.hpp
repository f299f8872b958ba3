// kvcache: which attention kernel variant runs - chosen once, at run time, from the CPU.
//
// One build for a baseline target (plain -O2, no -march) carries every variant its compiler
// can emit (detail/kernel/variants.hpp) and runs the best one the CPU has; KVCACHE_ISA caps it.
// Why functions compiled for a target per region, not Google Highway: docs/kernel.md.
#ifndef KVCACHE_KERNEL_ISA_HPP
#define KVCACHE_KERNEL_ISA_HPP

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define KVCACHE_X86 1
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
// g++, clang and MSVC compile the AVX2 and AVX-512 variants in any build (detail/kernel/variants.hpp).
#if defined(__GNUC__) || defined(__clang__) || defined(_MSC_VER)
#define KVCACHE_HAS_X86_VARIANTS 1
#endif
#endif

namespace kvcache {
namespace detail {

/// The kernel variants, weakest first. Each is a complete copy of the kernel's inner loops
/// compiled for that instruction set (detail/kernel/variants.hpp):
/// * kScalar: portable C++ (the compiler's baseline vector code: SSE2 on x86-64, NEON on
///   AArch64), no intrinsics;
/// * kAvx2: AVX2 + FMA + F16C (Haswell, Zen 1 and later);
/// * kAvx512: AVX-512 F/BW/VL/DQ + AVX2/FMA/F16C (Skylake-SP, Zen 4 and later);
/// * kAvx512Vnni: the same plus AVX-512 VNNI (Cascade Lake, Ice Lake, Zen 4 and later), whose
///   vpdpbusd the scores of quantized blocks use.
enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Vnni: return "avx512-vnni";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2-fma";
    case Isa::kScalar: break;
  }
#if defined(__ARM_NEON) || defined(__aarch64__)
  return "neon";
#else
  return "scalar";
#endif
}

#if defined(KVCACHE_X86)
/// cpuid leaf `leaf`, subleaf `sub`: {eax, ebx, ecx, edx}.
inline void cpuid(unsigned leaf, unsigned sub, unsigned (&regs)[4]) {
#if defined(_MSC_VER) && !defined(__clang__)
  int out[4];
  __cpuidex(out, static_cast<int>(leaf), static_cast<int>(sub));
  for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned>(out[i]);
#else
  regs[0] = regs[1] = regs[2] = regs[3] = 0;
  __cpuid_count(leaf, sub, regs[0], regs[1], regs[2], regs[3]);
#endif
}

/// The register states the operating system saves on a context switch (XCR0).
inline unsigned long long os_saved_states() {
#if defined(_MSC_VER) && !defined(__clang__)
  return _xgetbv(0);
#else
  unsigned eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
#endif
}
#endif

/// The best variant this build holds.
constexpr Isa best_compiled_isa() {
#if defined(KVCACHE_HAS_X86_VARIANTS)
  return Isa::kAvx512Vnni;
#else
  return Isa::kScalar;
#endif
}

/// The best variant this CPU and operating system can run (cpuid; XCR0 for the register
/// state: an OS that does not save the AVX-512 registers cannot run AVX-512 code).
inline Isa detect_isa() {
#if defined(KVCACHE_X86)
  unsigned leaf0[4], leaf1[4], leaf7[4] = {0, 0, 0, 0};
  cpuid(0, 0, leaf0);
  if (leaf0[0] < 1) return Isa::kScalar;
  cpuid(1, 0, leaf1);
  if (leaf0[0] >= 7) cpuid(7, 0, leaf7);
  const bool osxsave = (leaf1[2] >> 27) & 1;
  if (!osxsave) return Isa::kScalar;
  const unsigned long long xcr0 = os_saved_states();
  const bool ymm_saved = (xcr0 & 0x6) == 0x6;     // SSE and AVX state
  const bool zmm_saved = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool fma = (leaf1[2] >> 12) & 1, avx = (leaf1[2] >> 28) & 1, f16c = (leaf1[2] >> 29) & 1;
  const bool avx2 = (leaf7[1] >> 5) & 1;
  const bool avx512f = (leaf7[1] >> 16) & 1, avx512dq = (leaf7[1] >> 17) & 1;
  const bool avx512bw = (leaf7[1] >> 30) & 1, avx512vl = (leaf7[1] >> 31) & 1;
  const bool has_avx2 = ymm_saved && avx && avx2 && fma && f16c;
  const bool avx512vnni = (leaf7[2] >> 11) & 1;
  if (has_avx2 && zmm_saved && avx512f && avx512dq && avx512bw && avx512vl)
    return avx512vnni ? Isa::kAvx512Vnni : Isa::kAvx512;
  if (has_avx2) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

/// The cap named by a KVCACHE_ISA value: "scalar", "avx2", "avx512-novnni" (AVX-512 without
/// its VNNI extension: the path of CPUs that lack it), "avx512" (all of it); anything else
/// (unset, "best", an unknown word) caps nothing.
inline Isa isa_cap(const char* value) {
  if (value == nullptr) return Isa::kAvx512Vnni;
  if (std::strcmp(value, "scalar") == 0) return Isa::kScalar;
  if (std::strcmp(value, "avx2") == 0) return Isa::kAvx2;
  if (std::strcmp(value, "avx512-novnni") == 0) return Isa::kAvx512;
  return Isa::kAvx512Vnni;
}

/// The variant attend() runs: the best the CPU has, capped by KVCACHE_ISA, decided once (the
/// environment is read on the first call; later changes to it have no effect).
inline Isa selected_isa() {
  static const Isa selected = [] {
    const Isa best = detect_isa();
    const Isa cap = isa_cap(std::getenv("KVCACHE_ISA"));
    const int chosen = std::min({static_cast<int>(best), static_cast<int>(cap),
                                 static_cast<int>(best_compiled_isa())});
    return static_cast<Isa>(chosen);
  }();
  return selected;
}

}  // namespace detail

/// \brief The kernel variant attend() uses in this process: "avx512-vnni", "avx512",
/// "avx2-fma", or "scalar" ("neon" on ARM, where the portable variant compiles to NEON).
///
/// The best the CPU has, capped by the environment variable KVCACHE_ISA (read once, before
/// the first attend): "scalar", "avx2", "avx512-novnni" (AVX-512 without VNNI) or "avx512";
/// unset, "best", an unknown word or a cap
/// above what the CPU has select the best available. Every variant gives the scalar
/// reference's results within the documented tolerance, deterministically.
inline std::string kernel_isa() { return detail::isa_name(detail::selected_isa()); }

}  // namespace kvcache

#endif  // KVCACHE_KERNEL_ISA_HPP
