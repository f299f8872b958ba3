#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/: fuzz_load, fuzz_operations) with clang++-14, AddressSanitizer
# and UndefinedBehaviorSanitizer in build/fuzz (only those two executables), then runs each for
# FUZZ_SECONDS (default 60) on a copy of its committed seed corpus (fuzz/corpus/<target>/; the
# committed corpus is never written). Prints one summary line per target:
#   fuzz <target>: <N> runs in <S> s, 0 findings
# and exits non-zero when a target finds anything (a failed check, a sanitizer report, a crash,
# a timeout, an out-of-memory); the input that did it is kept in build/fuzz/findings/.
#
#   bash scripts/fuzz.sh                          # CI length: 60 s per target
#   FUZZ_SECONDS=3600 bash scripts/fuzz.sh        # a long run
#   FUZZ_TARGETS=fuzz_load bash scripts/fuzz.sh   # one target
#   build/fuzz/fuzz/fuzz_load build/fuzz/findings/fuzz_load-crash-<sha1>   # reproduce a finding
#
# Environment: FUZZ_SECONDS, FUZZ_TARGETS, FUZZ_BUILD_JOBS (default 2), FUZZ_PARALLEL=1 (run the
# targets at the same time, one process each: CI does, on its 2 cores), FUZZ_CXX (default
# clang++-14), FUZZ_FLAGS (extra libFuzzer flags), FUZZ_KEEP_CORPUS=DIR (copy the grown corpora
# there at the end, e.g. to add interesting inputs to the seeds by hand).
# Installs clang-14 and libclang-rt-14-dev (libFuzzer and the sanitizer runtimes) when missing,
# as scripts/deps.sh does for the rest (Debian bookworm, root or sudo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${FUZZ_SECONDS:-60}
read -r -a targets <<<"${FUZZ_TARGETS:-fuzz_load fuzz_operations fuzz_model_files}"
jobs=${FUZZ_BUILD_JOBS:-2}
cxx=${FUZZ_CXX:-clang++-14}
build=build/fuzz
findings=$build/findings
read -r -a extra_flags <<<"${FUZZ_FLAGS:-}"

# --- dependencies --------------------------------------------------------------------------------
bash scripts/deps.sh
bash scripts/deps.sh clang-14 libclang-rt-14-dev

# --- build (only the fuzz targets) ----------------------------------------------------------------
started=$SECONDS
# Debug adds only -g: the targets set -O1 themselves, and assertions stay on.
cmake -S . -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=Debug \
  -DKVCACHE_BUILD_FUZZERS=ON -DKVCACHE_BUILD_TESTS=OFF -DKVCACHE_BUILD_EXAMPLES=OFF \
  -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_INSTALL=OFF -DKVCACHE_DEVELOPER=ON >/dev/null
build_targets=()
for target in "${targets[@]}"; do build_targets+=("kvcache_$target"); done
cmake --build "$build" --target "${build_targets[@]}" -j "$jobs"
echo "fuzz: built ${targets[*]} in $((SECONDS - started)) s"

# --- run ------------------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/kvcache-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$findings"

# run_target <target>: fuzzes a copy of the target's seeds; writes its summary line to
# $work/<target>.summary and prints its log's tail (the whole of it that matters on a finding).
run_target() {
  local target=$1 corpus=$work/$1 log=$work/$1.log status=0 runs took artifact line
  mkdir -p "$corpus"
  cp fuzz/corpus/"$target"/* "$corpus"/
  echo "fuzz: running $target for $seconds s on $(ls "$corpus" | wc -l) seed inputs"
  # -timeout: one input running longer is a finding (a hang); -rss_limit_mb also limits single
  # allocations (-malloc_limit_mb defaults to it).
  "$build/fuzz/$target" "$corpus" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 \
    -print_final_stats=1 -artifact_prefix="$findings/$target-" "${extra_flags[@]}" \
    >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
  if ((status == 0)); then
    grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | sed "s/^/fuzz: $target: /" || true
    line="fuzz $target: ${runs:-?} runs in ${took:-$seconds} s, 0 findings"
  else
    tail -n 80 "$log" | sed "s/^/fuzz: $target: /"
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    line="fuzz $target: FINDING (exit $status) after ${runs:-?} runs; input: ${artifact:-see the log above}; reproduce: $build/fuzz/$target ${artifact:-<input>}"
  fi
  echo "$line" >"$work/$target.summary"
  if [[ -n "${FUZZ_KEEP_CORPUS:-}" ]]; then
    mkdir -p "$FUZZ_KEEP_CORPUS/$target"
    cp "$corpus"/* "$FUZZ_KEEP_CORPUS/$target"/
  fi
  return "$status"
}

failed=0
if [[ "${FUZZ_PARALLEL:-0}" == 1 ]]; then
  # One process per target at once (CI: one per core); each is single-threaded.
  pids=()
  for target in "${targets[@]}"; do
    run_target "$target" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
else
  for target in "${targets[@]}"; do run_target "$target" || failed=1; done
fi

for target in "${targets[@]}"; do cat "$work/$target.summary"; done
echo "fuzz: done in $((SECONDS - started)) s (build and runs)"
exit "$failed"
