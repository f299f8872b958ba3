// The Llama demo's model-file readers (examples/safetensors.hpp): JSON and safetensors read
// back what was written, and every malformed file is a demo::FileError that says what was
// expected and what was found (fuzz/fuzz_model_files.cpp tries arbitrary bytes).
#include "support/catch.hpp"
#include "support/reference.hpp"

#include "../examples/safetensors.hpp"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace {

using kvtest::contains;

/// The message of the demo::FileError that f throws ("" when it throws none; other exceptions
/// propagate).
template <class F>
std::string error_of(F&& f) {
  return kvtest::message_of<demo::FileError>(std::forward<F>(f));
}

/// A safetensors file: the 8-byte little-endian header length, the header, the data.
std::string safetensors_file(const std::string& header, const std::string& data) {
  std::string bytes;
  std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i, n >>= 8) bytes += static_cast<char>(n & 0xFF);
  return bytes + header + data;
}

}  // namespace

TEST_CASE("JSON: values, escapes, nesting", "[model_files]") {
  const demo::Json j = demo::parse_json(
      R"( {"a": [1, -2.5e1, true, false, null], "s": "x\"\\\/\n\u00e9", "o": {"k": {}} } )");
  REQUIRE(j.kind == demo::Json::Kind::object);
  const demo::Json* a = j.find("a");
  REQUIRE(a != nullptr);
  REQUIRE(a->array.size() == 5);
  CHECK(a->array[0].number == 1.0);
  CHECK(a->array[1].number == -25.0);
  CHECK(a->array[2].boolean);
  CHECK(!a->array[3].boolean);
  CHECK(a->array[4].kind == demo::Json::Kind::null);
  CHECK(j.find("s")->string == std::string("x\"\\/\n\xC3\xA9"));
  CHECK(j.find("o")->find("k")->kind == demo::Json::Kind::object);
  CHECK(j.find("missing") == nullptr);
  CHECK(demo::json_integer(j, "missing", 7, 10) == 7);
}

TEST_CASE("JSON: malformed text is a FileError naming where", "[model_files]") {
  for (const char* text : {"", "{", "[1,]", "{\"a\" 1}", "\"open", "01x", "tru", "[1] 2",
                           "{\"a\": \"\\q\"}", "\"\\u12\"", "-", "1."}) {
    CAPTURE(text);
    CHECK(contains(error_of([&] { demo::parse_json(text); }), "JSON: "));
  }
  std::string deep(100, '[');
  CHECK(contains(error_of([&] { demo::parse_json(deep); }), "nested deeper than 64"));
  const demo::Json config = demo::parse_json(R"({"n": 2.5, "m": -1, "s": "x"})");
  CHECK(contains(error_of([&] { demo::json_integer(config, "n", -1, 10); }),
                 "\"n\": expected an integer in [0, 10]"));
  CHECK(contains(error_of([&] { demo::json_integer(config, "m", -1, 10); }), "\"m\""));
  CHECK(contains(error_of([&] { demo::json_integer(config, "s", -1, 10); }), "a non-number"));
  CHECK(contains(error_of([&] { demo::json_integer(config, "absent", -1, 10); }), "is missing"));
}

TEST_CASE("safetensors: F32, F16 and BF16 tensors read back as floats", "[model_files]") {
  // F32 [2]: 1.5, -2; F16 [2]: 1.0 (0x3C00), -0.5 (0xB800); BF16 [1]: 3.0 (0x4040).
  const std::string data = std::string("\x00\x00\xC0\x3F\x00\x00\x00\xC0", 8) +
                           std::string("\x00\x3C\x00\xB8", 4) + std::string("\x40\x40", 2);
  const std::string header =
      R"({"__metadata__": {"format": "pt"}, "f": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},)"
      R"( "h": {"dtype": "F16", "shape": [1, 2], "data_offsets": [8, 12]},)"
      R"( "b": {"dtype": "BF16", "shape": [1], "data_offsets": [12, 14]}})";
  const demo::SafeTensors file = demo::SafeTensors::parse(safetensors_file(header, data));
  CHECK(file.floats("f", {2}) == std::vector<float>{1.5f, -2.0f});
  CHECK(file.floats("h", {1, 2}) == std::vector<float>{1.0f, -0.5f});
  CHECK(file.floats("b", {1}) == std::vector<float>{3.0f});
  CHECK(file.contains("h"));
  CHECK(!file.contains("__metadata__"));
  CHECK(contains(error_of([&] { file.floats("h", {2}); }), "expected shape [2], got [1, 2]"));
  CHECK(contains(error_of([&] { file.floats("nope", {1}); }), "no tensor \"nope\""));
}

TEST_CASE("safetensors: malformed files are FileErrors", "[model_files]") {
  const std::string ok_entry = R"("t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})";
  const std::string four(4, '\0');
  struct Case {
    std::string bytes;
    const char* says;
  };
  const std::vector<Case> cases = {
      {"short", "expected at least 8 bytes, got 5"},
      {std::string("\xFF\xFF\xFF\xFF\xFF\xFF\xFF\x7F", 8) + "{}", "header of 9223372036854775807 bytes"},
      {safetensors_file("[]", ""), "the header is not a JSON object"},
      {safetensors_file("{\"t\": 1}", ""), "\"t\" is not an object"},
      {safetensors_file(R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", four), "expected a dtype string"},
      {safetensors_file(R"({"t": {"dtype": "F32", "data_offsets": [0, 4]}})", four), "expected a shape array"},
      {safetensors_file(R"({"t": {"dtype": "F32", "shape": [1]}})", four), "expected data_offsets"},
      {safetensors_file(R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", four),
       "not a non-negative integer"},
      {safetensors_file(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", four),
       "data_offsets must be integers in [0, 4]"},
      {safetensors_file(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", four),
       "begin 4 > end 0"},
      {safetensors_file(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", four),
       "4 bytes for 2 elements of F32"},
      {safetensors_file("{" + ok_entry, four), "JSON: "},
  };
  for (const Case& c : cases) {
    CAPTURE(c.says);
    CHECK(contains(error_of([&] { demo::SafeTensors::parse(c.bytes); }), c.says));
  }
  // A dtype it cannot convert is listed, and refused when read.
  const demo::SafeTensors file = demo::SafeTensors::parse(
      safetensors_file(R"({"i": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", std::string(8, '\0')));
  CHECK(contains(error_of([&] { file.floats("i", {1}); }), "dtype I64 (expected F32, F16 or BF16)"));
}
