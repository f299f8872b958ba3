// libFuzzer target: random operation sequences on one cache of any kind, checked against a
// naive model (the driver and what it checks: fuzz_operations.hpp), or on a PagedKVCache
// (tests/support/paged_model.hpp, shared with test_paged_cache). This file is the target's
// entry point and instantiates the float kinds; fuzz_operations_16bit.cpp the Eigen::half and
// Eigen::bfloat16 ones. Run with --write-seeds=DIR to write the seed corpus.
#include "fuzz_operations.hpp"
#include "support/paged_model.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace kvfuzz {
namespace ops {

void run_float(int kind, int layout, ByteReader& in) {
  if (layout == 0)
    run_kind<BHSD, float>(kind, in);
  else
    run_kind<BSHD, float>(kind, in);
}

/// A PagedKVCache under random operations (tests/support/paged_model.hpp, the model and every
/// check of test_paged_cache): the bytes pick the pool's shape (layers <= 3, blocks <= 48 of
/// 1..8 positions, heads <= 3, head_dim <= 9, GQA up to 3) and every choice of the run.
template <class L>
void run_paged(ByteReader& in) {
  kvcache::PagedConfig config;
  config.num_layers = in.range(1, 3);
  config.num_blocks = in.range(1, 48);
  config.block_size = in.range(1, 8);
  config.num_heads = in.range(1, 3);
  config.head_dim = in.range(1, 9);
  const Index q_heads = config.num_heads * in.range(1, 3);
  kvtest::paged::run_operations<float, L>(
      config, q_heads, kMaxOps, /*exact=*/false,
      [&](Index low, Index high) { return in.range(low, high); }, [&] { return in.empty(); },
      [](bool ok, const std::string& what) { FUZZ_CHECK(ok, what); }, pool_device());
}

}  // namespace ops
}  // namespace kvfuzz

namespace {

using namespace kvfuzz;
using namespace kvfuzz::ops;

/// Selector byte: 240 and above, a PagedKVCache (layout = s % 2; run_paged); below, one cache:
/// kind = s % 6, layout = s / 6 % 2, element type = s / 12 % 3 (float, half, bfloat16). The
/// 16-bit types run the kinds whose storage differs (static: contiguous, sliding: ring, int8:
/// quantized blocks and a tail in T), for their own kernel paths (widening in registers) and
/// rounding; the other kinds run as float.
constexpr int kPagedSelector = 240;

void run_selector(int selector, ByteReader& in) {
  if (selector >= kPagedSelector) {
    if (selector % 2 == 0)
      run_paged<BHSD>(in);
    else
      run_paged<BSHD>(in);
    return;
  }
  const int kind = selector % kNumKinds, layout = selector / kNumKinds % 2;
  const int type = selector / (2 * kNumKinds) % 3;
  if (type != 0 && (kind == 0 || kind == 2 || kind == 3))
    run_16bit(kind, layout, type, in);
  else
    run_float(kind, layout, in);
}

void write_seeds(const std::string& dir) {
  // One input per kind, layout and element type, of random bytes (every byte string is a valid
  // program; the choices are biased towards valid calls) from a fixed generator, 128 or 384
  // bytes (libFuzzer grows inputs slowly beyond the longest seed).
  Numbers numbers(2024);
  int written = 0;
  for (int selector = 0; selector < 6 * kNumKinds; ++selector) {
    const int kind = selector % kNumKinds;
    if (selector >= 2 * kNumKinds && kind != 0 && kind != 2 && kind != 3) continue;
    std::vector<std::uint8_t> bytes = {static_cast<std::uint8_t>(selector)};
    const std::size_t length = written % 2 == 0 ? 128 : 384;
    while (bytes.size() < length) bytes.push_back(static_cast<std::uint8_t>(numbers.next()));
    write_file(text(dir, "/seed_", selector), bytes);
    ++written;
  }
  for (int selector = kPagedSelector; selector < kPagedSelector + 2; ++selector) {
    std::vector<std::uint8_t> bytes = {static_cast<std::uint8_t>(selector)};
    while (bytes.size() < 512) bytes.push_back(static_cast<std::uint8_t>(numbers.next()));
    write_file(text(dir, "/seed_paged_", selector), bytes);
    ++written;
  }
  std::printf("fuzz_operations: wrote %d seeds to %s\n", written, dir.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  const std::string dir = write_seeds_dir(*argc, *argv);
  if (!dir.empty()) {
    write_seeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  ByteReader in(data, size);
  run_selector(in.u8(), in);
  return 0;
}
