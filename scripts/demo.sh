#!/usr/bin/env bash
# Builds the kvcache Llama demo (examples/llama_demo.cpp) in Release (build/release) and runs it:
# a small Llama-style transformer generating through every cache kind. Extra arguments go to
# the demo, e.g. `bash scripts/demo.sh --threads 2` or `bash scripts/demo.sh --help`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release \
  -DKVCACHE_BUILD_EXAMPLES=ON -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF
cmake --build build/release --target kvcache_llama_demo -j2
./build/release/examples/kvcache_llama_demo "$@"
