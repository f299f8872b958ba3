#!/usr/bin/env bash
# Configures (build/test), builds and runs kvcache's tests and examples: unit tests, API
# conformance, the demo and the find_package / add_subdirectory / FetchContent package tests;
# first, that no header includes one of a higher floor (scripts/include_floors.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/include_floors.sh > /dev/null
bash scripts/deps.sh
cmake -S . -B build/test -DCMAKE_BUILD_TYPE=Release \
  -DKVCACHE_BUILD_TESTS=ON -DKVCACHE_BUILD_EXAMPLES=ON -DKVCACHE_BUILD_BENCHMARKS=ON \
  -DKVCACHE_CONFORMANCE_SECTIONS="KVCACHE_CONFORMANCE_KINDS;KVCACHE_CONFORMANCE_PERSISTENCE;KVCACHE_CONFORMANCE_ISA;KVCACHE_CONFORMANCE_PAGED"
cmake --build build/test -j2
ctest --test-dir build/test --output-on-failure -j2
