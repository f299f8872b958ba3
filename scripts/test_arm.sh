#!/usr/bin/env bash
# The kernel tests on AArch64: cross-compiles test_kernel_variants, test_attend and
# test_quantized_cache with g++-aarch64-linux-gnu and runs them under qemu-aarch64 (user mode),
# so the portable variant is tested as ARM builds it (NEON through GCC's vector extensions,
# kernel_isa() == "neon") on an x86 machine. Installs the cross compiler and qemu-user when
# missing (Debian bookworm, root or sudo). CI runs it (.ci/run).
#
# Environment: ARM_TESTS (default "test_kernel_variants test_attend test_quantized_cache"),
# ARM_JOBS (parallel compiles, default 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps.sh
bash scripts/deps.sh g++-aarch64-linux-gnu qemu-user

read -r -a tests <<<"${ARM_TESTS:-test_kernel_variants test_attend test_quantized_cache}"
jobs=${ARM_JOBS:-2}
build=build/arm
mkdir -p "$build"
cxx=aarch64-linux-gnu-g++
# -O1: these run under emulation; the arithmetic is what is tested, not its speed.
flags=(-std=c++17 -O1 -Wall -Wextra -Wpedantic -Werror -Iinclude -Itests -I/usr/include/eigen3
       -I/usr/include)
started=$SECONDS
"$cxx" "${flags[@]}" -c tests/support/catch_main.cpp -o "$build/catch_main.o" -Wno-error &
for test in "${tests[@]}"; do
  while (($(jobs -rp | wc -l) >= jobs)); do wait -n; done
  "$cxx" "${flags[@]}" -c "tests/$test.cpp" -o "$build/$test.o" &
done
while (($(jobs -rp | wc -l) > 0)); do wait -n; done
for test in "${tests[@]}"; do
  "$cxx" "$build/catch_main.o" "$build/$test.o" -o "$build/$test" -lpthread
done
echo "arm: built ${tests[*]} in $((SECONDS - started)) s"

failed=0
for test in "${tests[@]}"; do
  echo "arm: $test (qemu-aarch64)"
  if ! qemu-aarch64 -L /usr/aarch64-linux-gnu "$build/$test"; then failed=1; fi
done
echo "arm: done in $((SECONDS - started)) s"
exit $failed
