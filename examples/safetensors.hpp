// The demo's model files: a small JSON reader (config.json and the safetensors header) and a
// safetensors reader written against the format's description
// (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian N, N bytes of
// JSON header {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the tensors' bytes, offsets relative to the end of the header. Every malformed input is
// a demo::FileError naming what was expected and what was found; nothing is read outside the
// buffer (fuzz/fuzz_model_files.cpp runs both readers on arbitrary bytes).
#ifndef KVCACHE_EXAMPLES_SAFETENSORS_HPP
#define KVCACHE_EXAMPLES_SAFETENSORS_HPP

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace demo {

/// A model file that cannot be used, and why.
class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  throw FileError(out.str());
}

// ---------------------------------------------------------------------------------------------
// JSON (RFC 8259), as much as config.json and a safetensors header need
// ---------------------------------------------------------------------------------------------

struct Json {
  enum class Kind { null, boolean, number, string, array, object };
  Kind kind = Kind::null;
  bool boolean = false;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::vector<std::pair<std::string, Json>> object;  ///< in file order

  /// The member `key` of an object, or nullptr.
  const Json* find(const std::string& key) const {
    for (const auto& [name, value] : object)
      if (name == key) return &value;
    return nullptr;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  Json parse_document() {
    Json value = parse_value(0);
    skip_space();
    if (at_ != text_.size()) error("the end of the JSON text");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void error(const char* expected) const {
    if (at_ >= text_.size()) fail("JSON: expected ", expected, " at byte ", at_, ", got the end");
    fail("JSON: expected ", expected, " at byte ", at_, ", got '", text_[at_], "'");
  }
  void skip_space() {
    while (at_ < text_.size() &&
           (text_[at_] == ' ' || text_[at_] == '\t' || text_[at_] == '\n' || text_[at_] == '\r'))
      ++at_;
  }
  bool take(char c) {
    skip_space();
    if (at_ < text_.size() && text_[at_] == c) {
      ++at_;
      return true;
    }
    return false;
  }
  void expect(char c, const char* what) {
    if (!take(c)) error(what);
  }
  bool take_word(const char* word) {
    const std::size_t n = std::strlen(word);
    if (text_.compare(at_, n, word) != 0) return false;
    at_ += n;
    return true;
  }

  Json parse_value(int depth) {
    if (depth > kMaxDepth) fail("JSON: nested deeper than ", kMaxDepth, " levels");
    skip_space();
    Json value;
    if (at_ >= text_.size()) error("a value");
    const char c = text_[at_];
    if (c == '{') {
      ++at_;
      value.kind = Json::Kind::object;
      if (take('}')) return value;
      do {
        skip_space();
        if (at_ >= text_.size() || text_[at_] != '"') error("a member name");
        std::string name = parse_string();
        expect(':', "':'");
        value.object.emplace_back(std::move(name), parse_value(depth + 1));
      } while (take(','));
      expect('}', "',' or '}'");
    } else if (c == '[') {
      ++at_;
      value.kind = Json::Kind::array;
      if (take(']')) return value;
      do value.array.push_back(parse_value(depth + 1));
      while (take(','));
      expect(']', "',' or ']'");
    } else if (c == '"') {
      value.kind = Json::Kind::string;
      value.string = parse_string();
    } else if (take_word("true")) {
      value.kind = Json::Kind::boolean;
      value.boolean = true;
    } else if (take_word("false")) {
      value.kind = Json::Kind::boolean;
    } else if (take_word("null")) {
      value.kind = Json::Kind::null;
    } else {
      value.kind = Json::Kind::number;
      value.number = parse_number();
    }
    return value;
  }

  double parse_number() {
    const std::size_t begin = at_;
    if (at_ < text_.size() && text_[at_] == '-') ++at_;
    auto digits = [&] {
      const std::size_t from = at_;
      while (at_ < text_.size() && text_[at_] >= '0' && text_[at_] <= '9') ++at_;
      return at_ > from;
    };
    if (!digits()) error("a value");
    if (at_ < text_.size() && text_[at_] == '.') {
      ++at_;
      if (!digits()) error("a digit after '.'");
    }
    if (at_ < text_.size() && (text_[at_] == 'e' || text_[at_] == 'E')) {
      ++at_;
      if (at_ < text_.size() && (text_[at_] == '+' || text_[at_] == '-')) ++at_;
      if (!digits()) error("an exponent");
    }
    std::istringstream in(text_.substr(begin, at_ - begin));
    in.imbue(std::locale::classic());
    double x = 0;
    in >> x;  // out of double's range: +-DBL_MAX or 0, which the callers' range checks reject
    return x;
  }

  std::string parse_string() {
    ++at_;  // the opening quote
    std::string out;
    while (true) {
      if (at_ >= text_.size()) fail("JSON: a string not closed before the end");
      const char c = text_[at_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("JSON: a control character in a string at byte ", at_ - 1);
      if (c != '\\') {
        out += c;
        continue;
      }
      if (at_ >= text_.size()) fail("JSON: an escape cut by the end");
      const char e = text_[at_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': append_utf8(out, parse_hex4()); break;
        default: fail("JSON: unknown escape '\\", e, "' at byte ", at_ - 1);
      }
    }
  }
  unsigned parse_hex4() {
    if (text_.size() - at_ < 4) fail("JSON: \\u needs four hex digits at byte ", at_);
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = text_[at_++];
      code <<= 4;
      if (h >= '0' && h <= '9') code |= unsigned(h - '0');
      else if (h >= 'a' && h <= 'f') code |= unsigned(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') code |= unsigned(h - 'A' + 10);
      else fail("JSON: expected a hex digit at byte ", at_ - 1, ", got '", h, "'");
    }
    return code;
  }
  // (A lone surrogate is kept as its own three bytes: names in these files are ASCII.)
  static void append_utf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  const std::string& text_;
  std::size_t at_ = 0;
};

inline Json parse_json(const std::string& text) { return JsonParser(text).parse_document(); }

/// A non-negative integer member of a JSON object no larger than `max`, or `fallback` when the
/// member is absent (fallback < 0: required).
inline long long json_integer(const Json& object, const char* key, long long fallback, long long max) {
  const Json* v = object.find(key);
  if (v == nullptr) {
    if (fallback < 0) fail("config: \"", key, "\" is missing");
    return fallback;
  }
  if (v->kind != Json::Kind::number || !(v->number >= 0) || v->number > double(max) ||
      v->number >= 9223372036854775808.0 ||
      v->number != static_cast<double>(static_cast<long long>(v->number)))
    fail("config: \"", key, "\": expected an integer in [0, ", max, "], got ",
         v->kind == Json::Kind::number ? std::to_string(v->number) : std::string("a non-number"));
  return static_cast<long long>(v->number);
}

// ---------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------

struct TensorEntry {
  std::string dtype;
  std::vector<long long> shape;
  std::uint64_t begin = 0, end = 0;  ///< byte offsets into the data
};

/// The tensors of a safetensors file held in memory.
class SafeTensors {
 public:
  /// Parses `bytes` (a whole file). Throws FileError for anything the format does not allow.
  static SafeTensors parse(std::string bytes) {
    SafeTensors file;
    if (bytes.size() < 8) fail("safetensors: expected at least 8 bytes, got ", bytes.size());
    std::uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<unsigned char>(bytes[std::size_t(i)]);
    if (header_size > bytes.size() - 8)
      fail("safetensors: header of ", header_size, " bytes, but the file has ", bytes.size() - 8,
           " after its length");
    const Json header = parse_json(bytes.substr(8, header_size));
    if (header.kind != Json::Kind::object) fail("safetensors: the header is not a JSON object");
    file.data_ = bytes.substr(8 + header_size);
    for (const auto& [name, entry] : header.object) {
      if (name == "__metadata__") continue;
      if (entry.kind != Json::Kind::object) fail("safetensors: \"", name, "\" is not an object");
      TensorEntry t;
      const Json* dtype = entry.find("dtype");
      const Json* shape = entry.find("shape");
      const Json* offsets = entry.find("data_offsets");
      if (dtype == nullptr || dtype->kind != Json::Kind::string)
        fail("safetensors: \"", name, "\": expected a dtype string");
      if (shape == nullptr || shape->kind != Json::Kind::array)
        fail("safetensors: \"", name, "\": expected a shape array");
      if (offsets == nullptr || offsets->kind != Json::Kind::array || offsets->array.size() != 2)
        fail("safetensors: \"", name, "\": expected data_offsets [begin, end]");
      t.dtype = dtype->string;
      std::uint64_t elements = 1;
      for (const Json& d : shape->array) {
        if (d.kind != Json::Kind::number || !(d.number >= 0) || d.number > 1e15 ||
            d.number != static_cast<double>(static_cast<long long>(d.number)))
          fail("safetensors: \"", name, "\": a shape entry is not a non-negative integer");
        t.shape.push_back(static_cast<long long>(d.number));
        if (t.shape.back() != 0 && elements > std::numeric_limits<std::uint64_t>::max() / std::uint64_t(t.shape.back()))
          fail("safetensors: \"", name, "\": the shape's element count overflows");
        elements *= std::uint64_t(t.shape.back());
      }
      for (int i = 0; i < 2; ++i) {
        const Json& o = offsets->array[std::size_t(i)];
        if (o.kind != Json::Kind::number || !(o.number >= 0) || o.number > double(file.data_.size()) ||
            o.number != static_cast<double>(static_cast<std::uint64_t>(o.number)))
          fail("safetensors: \"", name, "\": data_offsets must be integers in [0, ", file.data_.size(), "]");
      }
      t.begin = static_cast<std::uint64_t>(offsets->array[0].number);
      t.end = static_cast<std::uint64_t>(offsets->array[1].number);
      if (t.begin > t.end) fail("safetensors: \"", name, "\": data_offsets begin ", t.begin, " > end ", t.end);
      const std::uint64_t size = element_size(t.dtype);
      if (size != 0 && (elements > std::numeric_limits<std::uint64_t>::max() / size || t.end - t.begin != elements * size))
        fail("safetensors: \"", name, "\": ", t.end - t.begin, " bytes for ", elements, " elements of ", t.dtype);
      file.tensors_[name] = std::move(t);
    }
    return file;
  }

  static SafeTensors read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot open ", path);
    return parse(std::string(std::istreambuf_iterator<char>(in), {}));
  }

  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const std::map<std::string, TensorEntry>& entries() const { return tensors_; }

  /// The tensor `name` (F32, F16 or BF16) as floats, row-major; its shape must be `shape`.
  std::vector<float> floats(const std::string& name, const std::vector<long long>& shape) const {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) fail("safetensors: no tensor \"", name, "\"");
    const TensorEntry& t = it->second;
    if (t.shape != shape) fail("safetensors: \"", name, "\": expected shape ", text(shape), ", got ", text(t.shape));
    const std::uint64_t size = element_size(t.dtype);
    if (size == 0) fail("safetensors: \"", name, "\": dtype ", t.dtype, " (expected F32, F16 or BF16)");
    const std::size_t n = static_cast<std::size_t>((t.end - t.begin) / size);
    std::vector<float> out(n);
    const char* from = data_.data() + t.begin;
    for (std::size_t i = 0; i < n; ++i) {
      if (t.dtype == "F32") {
        std::uint32_t bits = 0;
        for (int b = 3; b >= 0; --b) bits = (bits << 8) | static_cast<unsigned char>(from[4 * i + std::size_t(b)]);
        std::memcpy(&out[i], &bits, 4);
      } else {
        const auto bits = static_cast<std::uint16_t>(static_cast<unsigned char>(from[2 * i]) |
                                                     (static_cast<unsigned char>(from[2 * i + 1]) << 8));
        out[i] = t.dtype == "F16" ? static_cast<float>(Eigen::half(Eigen::half_impl::raw_uint16_to_half(bits)))
                                  : static_cast<float>(Eigen::bfloat16(Eigen::bfloat16_impl::raw_uint16_to_bfloat16(bits)));
      }
    }
    return out;
  }

 private:
  static std::uint64_t element_size(const std::string& dtype) {
    if (dtype == "F32") return 4;
    if (dtype == "F16" || dtype == "BF16") return 2;
    return 0;  // another dtype: listed, but not readable as floats
  }
  static std::string text(const std::vector<long long>& shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

  std::map<std::string, TensorEntry> tensors_;
  std::string data_;
};

}  // namespace demo

#endif  // KVCACHE_EXAMPLES_SAFETENSORS_HPP
