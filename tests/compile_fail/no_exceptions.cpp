// Must not compile (ctest compile_fail.no_exceptions): built with -fno-exceptions, the umbrella
// header stops with config.hpp's #error saying why exceptions are needed.
#include <kvcache/kvcache.hpp>

int main() { return 0; }
