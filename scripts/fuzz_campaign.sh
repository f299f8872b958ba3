#!/usr/bin/env bash
# A fuzzing campaign: runs each fuzz target for CAMPAIGN_SECONDS (default 3600) on a copy of its
# seeds (scripts/fuzz.sh, both targets at once), minimises the old and new inputs back into
# fuzz/corpus/<target> (libFuzzer -merge=1 over edges; named seeds kept), measures the
# clang source-based line and branch coverage of include/ that the merged corpus reaches, and
# appends a record to docs/fuzzing.md: date, CPU, seconds and executions per target, findings,
# coverage. Commit the corpus and the record afterwards.
#
#   bash scripts/fuzz_campaign.sh                        # one hour per target
#   CAMPAIGN_SECONDS=600 bash scripts/fuzz_campaign.sh   # ten minutes
#   CAMPAIGN_COVERAGE_ONLY=1 bash scripts/fuzz_campaign.sh   # measure the committed corpus
#   CAMPAIGN_TARGETS=fuzz_operations bash scripts/fuzz_campaign.sh   # one target, one core
#
# A finding stops nothing: its input stays in build/fuzz/findings/ and the record counts it.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${CAMPAIGN_SECONDS:-3600}
# fuzz_model_files (the demo's readers) runs in CI only: its inputs are small and it is not part
# of the persistence goal. A target left out records 0 executions.
read -r -a targets <<<"${CAMPAIGN_TARGETS:-fuzz_load fuzz_operations}"
grown=$(mktemp -d "${TMPDIR:-/tmp}/kvcache-campaign.XXXXXX")
trap 'rm -rf "$grown"' EXIT
declare -A runs findings

if [[ "${CAMPAIGN_COVERAGE_ONLY:-0}" != 1 ]]; then
  FUZZ_SECONDS=$seconds FUZZ_PARALLEL=1 FUZZ_KEEP_CORPUS="$grown" FUZZ_TARGETS="${targets[*]}" \
    bash scripts/fuzz.sh \
    >"$grown/fuzz.log" 2>&1
  for target in "${targets[@]}"; do
    line=$(grep "^fuzz $target: " "$grown/fuzz.log" | tail -n 1)
    echo "$line"
    runs[$target]=$(echo "$line" | sed -n 's/.*: \([0-9]*\) runs.*/\1/p; s/.*after \([0-9]*\) runs.*/\1/p')
    if [[ "$line" == *FINDING* ]]; then findings[$target]=1; else findings[$target]=0; fi
    # The committed corpus becomes: its named seeds (type*, regression-*: kept whatever they
    # cover), plus a minimal set of the old and new inputs that covers every edge they reach
    # (-use_counters=0: edges, not hit counts, else it keeps thousands of files).
    minimized=$grown/$target.minimized
    mkdir -p "$minimized"
    find fuzz/corpus/"$target" -type f -regextype posix-extended ! -regex '.*/[0-9a-f]{40}' \
      -exec cp {} "$minimized"/ \;
    build/fuzz/fuzz/"$target" -merge=1 -use_counters=0 "$minimized" fuzz/corpus/"$target" \
      "$grown/$target" >"$grown/$target.merge.log" 2>&1 || echo "campaign: merge of $target failed"
    grep -E "MERGE-OUTER: [0-9]+ new files" "$grown/$target.merge.log" | sed "s/^/campaign: $target: /"
    rm -rf fuzz/corpus/"$target"
    cp -r "$minimized" fuzz/corpus/"$target"
  done
fi

# --- coverage of include/ by the corpus -----------------------------------------------------------
bash scripts/deps.sh clang-14 libclang-rt-14-dev llvm-14 >/dev/null
coverage=build/fuzz-coverage
cmake -S . -B "$coverage" -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=Debug \
  -DKVCACHE_BUILD_FUZZERS=ON -DKVCACHE_FUZZ_COVERAGE=ON -DKVCACHE_BUILD_TESTS=OFF \
  -DKVCACHE_BUILD_EXAMPLES=OFF -DKVCACHE_BUILD_BENCHMARKS=OFF -DKVCACHE_INSTALL=OFF >/dev/null
cmake --build "$coverage" --target kvcache_fuzz_load kvcache_fuzz_operations -j 2 >/dev/null
profiles=()
objects=()
# Both corpora, whichever targets ran: the figure is what the committed corpus reaches.
for target in fuzz_load fuzz_operations; do
  LLVM_PROFILE_FILE="$grown/$target.profraw" "$coverage/fuzz/$target" -runs=0 \
    fuzz/corpus/"$target" >"$grown/$target.coverage.log" 2>&1
  profiles+=("$grown/$target.profraw")
  objects+=(-object "$coverage/fuzz/$target")
done
llvm-profdata-14 merge -sparse "${profiles[@]}" -o "$grown/all.profdata"
# One line per header; the totals of the persistence and cache code come after.
llvm-cov-14 report "${objects[@]:1}" -instr-profile="$grown/all.profdata" \
  "$(pwd)/include/kvcache" >"$grown/report.txt" 2>/dev/null
cat "$grown/report.txt"
# Persistence and cache code: persistence, serialization, crc32c, kv_storage, contiguous_cache
# and the cache kinds. Columns of llvm-cov report: lines total/missed at 8/9, branches 11/12.
read -r lines_total lines_missed branches_total branches_missed < <(
  grep -E "(persistence|serialization|crc32c|kv_storage|contiguous_cache|_cache)\.hpp" \
    "$grown/report.txt" |
    awk '{lt += $8; lm += $9; bt += $11; bm += $12} END {print lt, lm, bt, bm}')
percent() { awk -v t="$1" -v m="$2" 'BEGIN { if (t > 0) printf "%.1f", 100 * (t - m) / t; else print "-" }'; }
lines=$(percent "$lines_total" "$lines_missed")
branches=$(percent "$branches_total" "$branches_missed")
read -r all_lt all_lm all_bt all_bm < <(grep -E "^TOTAL" "$grown/report.txt" | awk '{print $8, $9, $11, $12}')
echo "campaign: persistence and cache code: lines $lines%, branches $branches%;" \
     "all of include/: lines $(percent "$all_lt" "$all_lm")%, branches $(percent "$all_bt" "$all_bm")%"

# --- the record -----------------------------------------------------------------------------------
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
duration=$seconds
[[ "${CAMPAIGN_COVERAGE_ONLY:-0}" == 1 ]] && duration=0
row="| $(date +%Y-%m-%d) | $cpu | $duration s | ${runs[fuzz_load]:-0} | ${runs[fuzz_operations]:-0} | ${findings[fuzz_load]:-0} + ${findings[fuzz_operations]:-0} | $lines% / $branches% | $(percent "$all_lt" "$all_lm")% / $(percent "$all_bt" "$all_bm")% |"
echo "$row" >>docs/fuzzing.md
echo "campaign: appended to docs/fuzzing.md: $row"
awk -F'|' '/^## Campaigns/ {on = 1} on && $5 ~ /^ *[0-9]+ *$/ {load += $5; ops += $6} END {
  printf "campaign: executions recorded in docs/fuzzing.md: fuzz_load %d, fuzz_operations %d\n", load, ops }' docs/fuzzing.md
