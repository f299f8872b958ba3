// kvcache: the kernel variants compiled once (the CMake target kvcache::compiled). Every other
// translation unit of a program linking it is compiled with KVCACHE_COMPILED_KERNELS and only
// calls them, which roughly halves its compile time (docs/kernel.md, "Compiled kernels").
#ifdef KVCACHE_DETAIL_KERNEL_VARIANTS_HPP
#error "src/kernels.cpp: kvcache was included before (a forced include or a precompiled header?); KVCACHE_DEFINE_KERNELS must come first"
#endif
#define KVCACHE_DEFINE_KERNELS
#include <kvcache/kvcache.hpp>
