#!/usr/bin/env bash
# Builds the kvcache demo in Release (build/release) and runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release \
  -DKVCACHE_BUILD_EXAMPLES=ON -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF
cmake --build build/release --target kvcache_demo -j2
./build/release/examples/kvcache_demo
