// libFuzzer target: the demo's model-file readers (examples/safetensors.hpp) on arbitrary bytes.
// Each input is read as a safetensors file and as config.json text; whatever the bytes, a
// reader either returns or throws demo::FileError - never another exception, a crash, a read
// outside the input or an allocation the input does not account for. A parsed safetensors
// file's every listed tensor is then read back as floats.
#include "../examples/safetensors.hpp"

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  try {
    const demo::Json config = demo::parse_json(bytes);
    for (const char* key : {"hidden_size", "num_hidden_layers", "vocab_size", "rope_theta"}) {
      try {
        (void)demo::json_integer(config, key, 0, 1 << 20);
      } catch (const demo::FileError&) {
      }
    }
  } catch (const demo::FileError&) {
  }
  try {
    const demo::SafeTensors file = demo::SafeTensors::parse(bytes);
    for (const auto& [name, entry] : file.entries()) {
      try {
        (void)file.floats(name, entry.shape);
      } catch (const demo::FileError&) {
      }
    }
  } catch (const demo::FileError&) {
  }
  return 0;
}
