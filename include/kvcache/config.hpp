// kvcache: the single place that includes Eigen.
//
// attend() takes an Eigen::ThreadPoolDevice, which Eigen's Tensor module only declares when
// EIGEN_USE_THREADS is defined before its first inclusion. We define it when the user has not;
// if the Tensor module was already included without it, the device type is missing and no
// later definition can bring it back, so we stop with an explanation instead of a wall of
// template errors.
#ifndef KVCACHE_CONFIG_HPP
#define KVCACHE_CONFIG_HPP

#if defined(EIGEN_CXX11_TENSOR_TENSOR_H) && !defined(EIGEN_CXX11_TENSOR_TENSOR_DEVICE_THREAD_POOL_H)
#error "kvcache: Eigen's Tensor module was included without EIGEN_USE_THREADS. kvcache needs Eigen::ThreadPoolDevice: #define EIGEN_USE_THREADS before the first Eigen include, or include <kvcache/kvcache.hpp> first."
#endif

#ifndef EIGEN_USE_THREADS
#define EIGEN_USE_THREADS
#endif

#include <unsupported/Eigen/CXX11/Tensor>
#include <unsupported/Eigen/CXX11/ThreadPool>

#if !EIGEN_VERSION_AT_LEAST(3, 4, 0)
#error "kvcache requires Eigen 3.4 or newer."
#endif

#if __cplusplus < 201703L && !(defined(_MSVC_LANG) && _MSVC_LANG >= 201703L)
#error "kvcache requires C++17."
#endif

// Bad input is reported by exceptions that leave the cache as it was (README, "Errors"); a build
// without exceptions could only abort instead, so it is refused here rather than half-working.
#if !defined(__cpp_exceptions) && !defined(__EXCEPTIONS) && !defined(_CPPUNWIND)
#error "kvcache reports bad input with exceptions (std::invalid_argument, std::length_error, kvcache::FormatError) and needs them enabled: remove -fno-exceptions (MSVC: /EHsc)."
#endif

#endif  // KVCACHE_CONFIG_HPP
