#!/usr/bin/env bash
# Compile time of a translation unit with one DynamicKVCache, one update and one attend, against
# one that includes Eigen's Tensor module and sums a tensor (issue 13, item 5): header-only, and
# with the kernels compiled once (KVCACHE_COMPILED_KERNELS, docs/kernel.md "Compiled kernels").
# Prints a Markdown table: the best of three runs, seconds and peak memory, per compiler (-O2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/eigen_only.cpp" <<'CPP'
#include <unsupported/Eigen/CXX11/Tensor>
int main() {
  Eigen::Tensor<float, 4, Eigen::RowMajor, long> t(1, 8, 4, 64);
  t.setRandom();
  Eigen::Tensor<float, 0, Eigen::RowMajor, long> s = t.sum();
  return s() > 100.0f;
}
CPP
cat > "$work/one_cache.cpp" <<'CPP'
#include <kvcache/kvcache.hpp>
int main() {
  kvcache::DynamicKVCache<float> cache(1, 8, 64);
  kvcache::Tensor4<float> k(1, 8, 4, 64), v(1, 8, 4, 64), q(1, 32, 1, 64);
  k.setRandom();
  v.setRandom();
  q.setRandom();
  cache.update(k, v);
  kvcache::Tensor4<float> out = kvcache::attend(q, cache);
  return out(0, 0, 0, 0) > 100.0f;
}
CPP
measure() {  # compiler, file, extra flags...: "seconds MB", best of three
  local cxx=$1 file=$2
  shift 2
  local best=""
  for _ in 1 2 3; do
    /usr/bin/time -f "%e %M" -o "$work/time" "$cxx" -std=c++17 -O2 -Iinclude -isystem /usr/include/eigen3 \
      "$@" -c "$work/$file" -o "$work/out.o"
    read -r seconds kb < "$work/time"
    if [[ -z "$best" ]] || awk -v a="$seconds" -v b="${best%% *}" 'BEGIN{exit !(a < b)}'; then
      best="$seconds $((kb / 1024))"
    fi
  done
  echo "$best"
}
echo "| compiler | Eigen-only TU | one cache + attend, header-only | ratio | same, compiled kernels | ratio |"
echo "|---|---:|---:|---:|---:|---:|"
for cxx in ${CXX_LIST:-g++ clang++-14}; do
  command -v "$cxx" > /dev/null || continue
  read -r e_s e_mb <<<"$(measure "$cxx" eigen_only.cpp)"
  read -r h_s h_mb <<<"$(measure "$cxx" one_cache.cpp)"
  read -r c_s c_mb <<<"$(measure "$cxx" one_cache.cpp -DKVCACHE_COMPILED_KERNELS)"
  echo "| $cxx | $e_s s, $e_mb MB | $h_s s, $h_mb MB | $(awk -v a="$h_s" -v b="$e_s" 'BEGIN{printf "%.2fx", a/b}') | $c_s s, $c_mb MB | $(awk -v a="$c_s" -v b="$e_s" 'BEGIN{printf "%.2fx", a/b}') |"
done
