// kvcache: key/value caches for transformer inference and the attention kernel that reads
// them. The one header users include.
//
// Define EIGEN_USE_THREADS before any Eigen include, or include this header first: attend()
// takes an Eigen::ThreadPoolDevice (see config.hpp).
#ifndef KVCACHE_KVCACHE_HPP
#define KVCACHE_KVCACHE_HPP

#include <kvcache/config.hpp>
#include <kvcache/version.hpp>
#include <kvcache/layout.hpp>
#include <kvcache/errors.hpp>
#include <kvcache/cache_concept.hpp>
#include <kvcache/persistence.hpp>
#include <kvcache/static_cache.hpp>
#include <kvcache/dynamic_cache.hpp>
#include <kvcache/frozen_cache.hpp>
#include <kvcache/prefix_cache.hpp>
#include <kvcache/sliding_window_cache.hpp>
#include <kvcache/quantization.hpp>
#include <kvcache/quantized_cache.hpp>
#include <kvcache/paged_cache.hpp>
#include <kvcache/attend_options.hpp>
#include <kvcache/attend_workspace.hpp>
#include <kvcache/kernel_isa.hpp>
#include <kvcache/attend.hpp>
#include <kvcache/paged_attend.hpp>
#include <kvcache/model_cache.hpp>

#endif  // KVCACHE_KVCACHE_HPP
