#!/usr/bin/env bash
# Configures (the `bench` preset: Release, no -march: the kernel variant is chosen at run time
# and named in every header; KVCACHE_ISA=scalar|avx2|avx512 caps it), builds and runs
# kvcache's Google Benchmark suites, writes their JSON into build/bench/results/ and turns the
# decode results into a PNG and markdown tables (scripts/plot_bench.py).
#
#   bash scripts/bench.sh                      # reduced default parameter sets (minutes)
#   bash scripts/bench.sh --full               # the full decode set (D 64/128, n_kv 512..65536)
#   bash scripts/bench.sh --benchmark_min_time=1 --benchmark_repetitions=3
#
# Every argument goes to every suite (Google Benchmark flags, and --full). Environment:
#   KVCACHE_BENCH_SUITES      suites to run, default "decode prefill append"
#   KVCACHE_BENCH_BUILD_DIR   build there (plain cmake with the preset's settings) instead of
#                             the preset's build/bench
#   KVCACHE_BENCH_RESULTS     output directory, default build/bench/results
#
# Run it on a quiet machine: decode numbers are bandwidth numbers. The "roofline" counters
# divide by a read bandwidth measured in the same process, which keeps them comparable
# between runs on a noisy machine; the absolute GB/s are not.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh

build_dir=${KVCACHE_BENCH_BUILD_DIR:-}
if [[ -z "$build_dir" ]]; then
  cmake --preset bench
  cmake --build --preset bench
  build_dir=build/bench
else
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DKVCACHE_BUILD_TESTS=OFF \
    -DKVCACHE_BUILD_EXAMPLES=OFF -DKVCACHE_BUILD_BENCHMARKS=ON -DKVCACHE_NATIVE=ON
  cmake --build "$build_dir" -j2
fi

results=${KVCACHE_BENCH_RESULTS:-build/bench/results}
mkdir -p "$results"
for suite in ${KVCACHE_BENCH_SUITES:-decode prefill append}; do
  echo "bench: $suite -> $results/$suite.json"
  "$build_dir/benchmarks/kvcache_bench_$suite" \
    --benchmark_out="$results/$suite.json" --benchmark_out_format=json "$@"
done

# A python3 with matplotlib for the PNG (Debian's python3-matplotlib lives in /usr/bin/python3,
# which a pyenv or venv python3 earlier on PATH does not see); the tables need none.
python=python3
if ! python3 -c 'import matplotlib' 2>/dev/null && [[ -x /usr/bin/python3 ]] &&
  /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
  python=/usr/bin/python3
fi
if [[ -f "$results/decode.json" ]]; then
  plot_args=("$results/decode.json" --png "$results/decode.png")
  [[ -f "$results/prefill.json" ]] && plot_args+=(--prefill "$results/prefill.json")
  [[ -f "$results/append.json" ]] && plot_args+=(--append "$results/append.json")
  "$python" scripts/plot_bench.py "${plot_args[@]}" | tee "$results/summary.md"
fi
