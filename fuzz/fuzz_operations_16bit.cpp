// fuzz_operations for Eigen::half and Eigen::bfloat16 caches (static, sliding window, int8):
// the driver of fuzz_operations.hpp instantiated in a translation unit of its own, so that the
// target's two halves build in parallel.
#include "fuzz_operations.hpp"

namespace kvfuzz {
namespace ops {

namespace {

template <class L, class T>
void run_kind_16(int kind, ByteReader& in) {
  switch (kind) {
    case 0: Driver<Kind::static_cache, L, T>(in).run(); break;
    case 2: Driver<Kind::sliding_window, L, T>(in).run(); break;
    default: Driver<Kind::int8, L, T>(in).run(); break;
  }
}

template <class T>
void run_type(int kind, int layout, ByteReader& in) {
  if (layout == 0)
    run_kind_16<BHSD, T>(kind, in);
  else
    run_kind_16<BSHD, T>(kind, in);
}

}  // namespace

void run_16bit(int kind, int layout, int type, ByteReader& in) {
  if (type == 1)
    run_type<Eigen::half>(kind, layout, in);
  else
    run_type<Eigen::bfloat16>(kind, layout, in);
}

}  // namespace ops
}  // namespace kvfuzz
