// kvcache Llama demo: a small decoder-only transformer in the Llama architecture, written with
// Eigen, that generates text greedily through every kind of kvcache cache and compares them.
//
// The model (Touvron et al. 2023, "LLaMA"; the Hugging Face LlamaForCausalLM layout):
//
//   h = embedding[token]                          token embedding, no position embedding
//   for each of the `layers` decoder blocks:
//     a = RMSNorm(h)                              pre-norm, no bias anywhere
//     q = a Wq^T, k = a Wk^T, v = a Wv^T          `heads` query heads, `kv_heads` K/V heads
//     q, k = RoPE(q, k, absolute position)        rotary embedding, before k is cached
//     h = h + attend(q, cached k, v) Wo^T         causal grouped-query attention (kvcache)
//     a = RMSNorm(h)
//     h = h + (SiLU(a Wgate^T) * a Wup^T) Wdown^T SwiGLU MLP (* is elementwise)
//   logits = RMSNorm(h) embedding^T               output head (tied to the embedding, or its own)
//
// The weights are by default the model trained for this demo (examples/model: 4 layers, hidden
// 256, a byte vocabulary, trained on the King James Bible by tools/train_model.py; read from
// config.json and model.safetensors, the Hugging Face format, so --model DIR reads other Llama
// checkpoints too, and --model random gives random weights of any size). The same prompt (the
// start of the held-out text) runs through a StaticKVCache (the reference), a DynamicKVCache, a
// SlidingWindowKVCache with attention sinks, Int8KVCache and Int4KVCache, a shared system
// prompt frozen once and continued by several PrefixKVCache sequences, the same requests
// served together from one PagedKVCache (prefix blocks found by token id, one batched forward
// pass and one ragged attend per layer per step), and a baseline without any cache that
// recomputes the whole sequence for every new token. The table says how fast each one is, how
// much memory it holds, how far its tokens and logits are from the static cache's, and its
// perplexity on a held-out passage of 2048 bytes, each predicted one at a time through the
// cache. Static, dynamic and no-cache must agree token for token: the demo exits with status 1
// when they do not. --check-reference compares the decoder's logits with those Hugging Face
// transformers computed for the shipped weights (ctest example.llama_demo_transformers).
//
// Run with --help for the options (model dimensions, cache settings, --threads).
#include <kvcache/kvcache.hpp>  // first: it defines EIGEN_USE_THREADS for Eigen's Tensor module

#include "safetensors.hpp"

#include <Eigen/Dense>

#include <unistd.h>  // isatty

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace {

using kvcache::Index;
using kvcache::ModelKVCache;
// Caches and attention use the [batch, seq, heads, head_dim] layout: a projection's output
// rows, [seq, heads * head_dim] in a row-major matrix, are already laid out that way, so q, k
// and v reach the caches as TensorMaps of the matrices, without a transpose or a copy.
using Layout = kvcache::BSHD;
using Tensor4 = kvcache::Tensor4<float>;
using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXf;
using RowVector = Eigen::RowVectorXf;
using Tokens = std::vector<int>;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

#ifndef KVCACHE_DEMO_MODEL
#define KVCACHE_DEMO_MODEL "random"
#endif

struct Config {
  // The weights: a directory with a Hugging Face Llama checkpoint (config.json and
  // model.safetensors; the dimensions below then come from config.json), or "random" for
  // random weights of the dimensions below. The build sets the default to the model trained
  // for this demo (examples/model, tools/train_model.py).
  std::string model = KVCACHE_DEMO_MODEL;
  // A reference.json (tools/train_model.py) to check the decoder against instead of running
  // the demo: the logits transformers computed for a prompt and its greedy continuation.
  std::string check_reference;
  // The model.
  Index layers = 8;
  Index hidden = 512;
  Index heads = 8;     // query heads
  Index kv_heads = 2;  // key/value heads (grouped-query attention: heads / kv_heads share one)
  Index head_dim = 64;
  // SwiGLU inner size; 0: 2 * hidden. Llama's rule, 8/3 * hidden rounded up to a multiple of
  // 256 (1536 for hidden 512), is a third slower; the default keeps the whole run short.
  Index ffn = 0;
  Index vocab = 4096;
  double rope_theta = 10000;
  double rms_norm_eps = 1e-5;
  bool tied = true;    // the output head is the embedding (else lm_head.weight)
  bool bytes = false;  // a byte vocabulary: tokens are text (the trained model's)
  Index max_positions = 0;  // RoPE table length; 0: prompt + new tokens
  Index seed = 2026;
  // The run.
  Index prompt = 256;
  Index new_tokens = 128;
  // Tokens the no-cache baseline generates (0: all new_tokens). Each costs a forward pass over
  // the whole sequence, about as long as the prompt's prefill, so only a few by default.
  Index no_cache_tokens = 8;
  // The caches.
  Index window = 128;       // sliding window
  Index sinks = 4;          // attention-sink tokens of the sliding window
  Index window_chunk = 32;  // prefill chunk of the sliding window cache (bounds its memory)
  Index group_size = 32;    // int8/int4 quantization group
  Index residual = 32;      // int8/int4 unquantized tail
  Index prefix = 0;         // shared system prompt length; 0: 3/4 of the prompt
  Index continuations = 4;  // sequences continuing the shared prefix
  Index perplexity_tokens = 2048;  // held-out tokens the perplexities are over (byte models)
  Index threads = 1;
};

// One command-line option: --name value, an integer (at least `minimum`) or a real number.
struct Option {
  const char* name;
  const char* help;
  Index* integer = nullptr;
  Index minimum = 1;
  double* real = nullptr;
  std::string* text = nullptr;
};

Option integer(const char* name, const char* help, Index& value, Index minimum = 1) {
  return {name, help, &value, minimum, nullptr};
}
Option real(const char* name, const char* help, double& value) {
  return {name, help, nullptr, 0, &value};
}
Option text(const char* name, const char* help, std::string& value) {
  return {name, help, nullptr, 0, nullptr, &value};
}

std::vector<Option> options_of(Config& c) {
  return {
      text("model", "weights: a Llama checkpoint directory (config.json, model.safetensors) or 'random'",
           c.model),
      text("check-reference", "compare the logits with this reference.json and exit", c.check_reference),
      integer("layers", "decoder blocks", c.layers),
      integer("hidden", "model width (residual stream)", c.hidden),
      integer("heads", "query heads", c.heads),
      integer("kv-heads", "key/value heads (divides --heads)", c.kv_heads),
      integer("head-dim", "dimension of one head (even, for RoPE)", c.head_dim),
      integer("ffn", "SwiGLU inner size (0: 2 * hidden; Llama's 8/3 rule gives 1536 for 512)",
              c.ffn, 0),
      integer("vocab", "vocabulary size", c.vocab),
      real("rope-theta", "RoPE base", c.rope_theta),
      integer("seed", "seed of the weights and the prompt", c.seed, 0),
      integer("prompt", "prompt tokens", c.prompt, 2),
      integer("new-tokens", "tokens generated after the prompt", c.new_tokens),
      integer("no-cache-tokens", "tokens the no-cache baseline generates (0: all)",
              c.no_cache_tokens, 0),
      integer("window", "sliding-window size", c.window),
      integer("sinks", "attention-sink tokens of the sliding window", c.sinks, 0),
      integer("window-chunk", "prefill chunk of the sliding window (0: whole prompt)",
              c.window_chunk, 0),
      integer("group-size", "int8/int4 quantization group (even, divides --head-dim)",
              c.group_size),
      integer("residual", "int8/int4 unquantized recent positions (0..64)", c.residual, 0),
      integer("prefix", "shared system-prompt tokens (0: 3/4 of the prompt)", c.prefix, 0),
      integer("continuations", "sequences sharing the prefix", c.continuations),
      integer("ppl-tokens", "held-out tokens predicted for the perplexity column (0: none)",
              c.perplexity_tokens, 0),
      integer("threads", "threads (attention and the dense math)", c.threads),
  };
}

void print_help(const char* program) {
  Config defaults;
  std::printf(
      "Usage: %s [--option value | --option=value]...\n\n"
      "A Llama-style decoder-only transformer (by default the small model trained for this demo,\n"
      "examples/model) generating greedily through every kvcache cache kind, compared with a\n"
      "static cache and a no-cache baseline. With --model DIR (a Hugging Face Llama checkpoint:\n"
      "config.json, model.safetensors) the model dimensions come from config.json.\n\n"
      "Options (default in brackets):\n",
      program);
  for (const Option& option : options_of(defaults)) {
    char value[256];
    if (option.integer)
      std::snprintf(value, sizeof value, "%ld", long(*option.integer));
    else if (option.real)
      std::snprintf(value, sizeof value, "%g", *option.real);
    else
      std::snprintf(value, sizeof value, "%s", option.text->c_str());
    std::printf("  --%-16s %s [%s]\n", option.name, option.help, value);
  }
  std::printf("  --%-16s %s\n", "help", "this text");
}

[[noreturn]] void usage_error(const std::string& message) {
  std::fprintf(stderr, "llama_demo: %s (see --help)\n", message.c_str());
  std::exit(2);
}

void require(bool condition, const std::string& message) {
  if (!condition) usage_error(message);
}

// The whole file at `path`, or a demo::FileError.
std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) demo::fail("cannot open ", path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The model's dimensions from its config.json (a Hugging Face LlamaConfig); they replace the
// command line's. A byte vocabulary (256 tokens) makes the demo read and print text.
void read_model_config(Config& c) {
  const std::string path = c.model + "/config.json";
  try {
    const demo::Json config = demo::parse_json(read_file(path));
    if (config.kind != demo::Json::Kind::object) demo::fail("config: not a JSON object");
    constexpr long long kLarge = 1LL << 20;
    c.layers = demo::json_integer(config, "num_hidden_layers", -1, 1024);
    c.hidden = demo::json_integer(config, "hidden_size", -1, kLarge);
    c.heads = demo::json_integer(config, "num_attention_heads", -1, 4096);
    c.kv_heads = demo::json_integer(config, "num_key_value_heads", c.heads, 4096);
    require(c.layers > 0 && c.hidden > 0 && c.heads > 0 && c.kv_heads > 0,
            path + ": layers, hidden size and heads must be positive");
    c.head_dim = demo::json_integer(config, "head_dim", c.hidden / c.heads, 4096);
    c.ffn = demo::json_integer(config, "intermediate_size", -1, kLarge);
    c.vocab = demo::json_integer(config, "vocab_size", -1, kLarge);
    c.max_positions = demo::json_integer(config, "max_position_embeddings", 4096, kLarge);
    if (const demo::Json* theta = config.find("rope_theta"); theta != nullptr) {
      require(theta->kind == demo::Json::Kind::number && theta->number > 1, path + ": rope_theta must be > 1");
      c.rope_theta = theta->number;
    }
    if (const demo::Json* eps = config.find("rms_norm_eps"); eps != nullptr) {
      require(eps->kind == demo::Json::Kind::number && eps->number > 0 && eps->number < 1,
              path + ": rms_norm_eps must be in (0, 1)");
      c.rms_norm_eps = eps->number;
    }
    // As LlamaConfig: an untied output head unless tie_word_embeddings says otherwise.
    c.tied = false;
    if (const demo::Json* tied = config.find("tie_word_embeddings"); tied != nullptr) {
      require(tied->kind == demo::Json::Kind::boolean, path + ": tie_word_embeddings must be true or false");
      c.tied = tied->boolean;
    }
    // What this decoder does not compute is refused, never ignored.
    if (const demo::Json* scaling = config.find("rope_scaling");
        scaling != nullptr && scaling->kind != demo::Json::Kind::null)
      usage_error(path + ": rope_scaling is not supported by this demo");
    for (const char* bias : {"attention_bias", "mlp_bias"})
      if (const demo::Json* b = config.find(bias); b != nullptr && !(b->kind == demo::Json::Kind::boolean && !b->boolean))
        usage_error(path + ": " + bias + " must be false (this demo has no biases)");
    if (const demo::Json* act = config.find("hidden_act");
        act != nullptr && !(act->kind == demo::Json::Kind::string && act->string == "silu"))
      usage_error(path + ": hidden_act must be \"silu\" (SwiGLU)");
    c.bytes = c.vocab == 256;
    // The quantization group must divide head_dim: the largest even one up to --group-size.
    while (c.group_size > 2 && (c.head_dim % c.group_size != 0 || c.group_size % 2 != 0)) --c.group_size;
  } catch (const demo::FileError& e) {
    usage_error(path + ": " + e.what());
  }
}

Config parse_command_line(int argc, char** argv) {
  Config config;
  const std::vector<Option> options = options_of(config);
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      print_help(argv[0]);
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) usage_error("unexpected argument '" + arg + "'");
    std::string name = arg.substr(2), value;
    if (const auto equals = name.find('='); equals != std::string::npos) {
      value = name.substr(equals + 1);
      name.resize(equals);
    } else {
      require(i + 1 < argc, "--" + name + " needs a value");
      value = argv[++i];
    }
    const auto option = std::find_if(options.begin(), options.end(),
                                     [&](const Option& o) { return name == o.name; });
    require(option != options.end(), "unknown option --" + name);
    if (option->text) {
      *option->text = value;
      continue;
    }
    char* end = nullptr;
    if (option->integer)
      *option->integer = std::strtol(value.c_str(), &end, 10);
    else
      *option->real = std::strtod(value.c_str(), &end);
    require(!value.empty() && *end == '\0', "--" + name + ": not a number: '" + value + "'");
  }

  Config& c = config;
  if (c.model != "random") read_model_config(c);
  if (c.ffn == 0) c.ffn = 2 * c.hidden;
  if (c.prefix == 0) c.prefix = c.prompt * 3 / 4;
  if (c.no_cache_tokens == 0 || c.no_cache_tokens > c.new_tokens) c.no_cache_tokens = c.new_tokens;
  for (const Option& option : options)
    if (option.integer)
      require(
          *option.integer >= option.minimum,
          std::string("--") + option.name + " must be at least " + std::to_string(option.minimum));
  require(c.heads % c.kv_heads == 0, "--kv-heads must divide --heads");
  require(c.head_dim % 2 == 0, "--head-dim must be even (RoPE rotates pairs)");
  require(c.head_dim % c.group_size == 0 && c.group_size % 2 == 0,
          "--group-size must be even and divide --head-dim");
  require(c.residual >= 0 && c.residual <= 64, "--residual must be in [0, 64]");
  require(c.rope_theta > 1, "--rope-theta must be > 1");
  require(c.prefix < c.prompt, "--prefix must be shorter than --prompt");
  require(c.threads <= 256, "--threads must be <= 256");
  return config;
}

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers
// ---------------------------------------------------------------------------------------------

// std::mt19937's output sequence is fixed by the standard, the standard distributions are not;
// so the mapping to uniform and normal numbers is written here, and a seed gives the same
// weights, prompt and tokens everywhere.
class Random {
 public:
  explicit Random(std::uint32_t seed) : engine_(seed) {}

  // Uniform in (0, 1): 32 random bits, offset by half a step so that 0 never comes out.
  double uniform() { return (double(engine_()) + 0.5) / 4294967296.0; }

  // Standard normal, by the Box-Muller transform.
  double normal() {
    const double radius = std::sqrt(-2.0 * std::log(uniform()));
    return radius * std::cos(6.283185307179586 * uniform());
  }

  // Uniform in [0, n).
  int below(Index n) { return static_cast<int>(engine_() % static_cast<std::uint32_t>(n)); }

  // rows x cols numbers from N(0, stddev^2).
  Matrix normal_matrix(Index rows, Index cols, double stddev) {
    Matrix m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(stddev * normal());
    return m;
  }

 private:
  std::mt19937 engine_;
};

// ---------------------------------------------------------------------------------------------
// Where the math runs: the calling thread, or it and a thread pool
// ---------------------------------------------------------------------------------------------

class Compute {
 public:
  explicit Compute(Index threads) : threads_(threads) {
    if (threads_ > 1) {
      pool_ = std::make_unique<Eigen::ThreadPool>(static_cast<int>(threads_));
      device_ = std::make_unique<Eigen::ThreadPoolDevice>(pool_.get(), static_cast<int>(threads_));
    }
  }

  // The pool for kvcache::attend (AttendOptions::device); null with one thread.
  const Eigen::ThreadPoolDevice* device() const { return device_.get(); }

  // A linear layer: y = x w^T, with w stored as [out_features, in_features] (PyTorch's
  // nn.Linear convention). Eigen picks GEMM for a prompt and GEMV for one token. With several
  // threads the output features are split between them, each running Eigen's own product on
  // its slice of w (Eigen parallelizes products only with OpenMP, which this demo avoids).
  void linear(const Matrix& x, const Matrix& w, Matrix& y) const {
    y.resize(x.rows(), w.rows());
    const Index per_thread = (w.rows() / threads_ + 15) / 16 * 16;
    if (!pool_ || w.rows() < 64 * threads_) {
      y.noalias() = x * w.transpose();
      return;
    }
    auto slice = [&](Index t) {
      const Index begin = t * per_thread, count = std::min(per_thread, w.rows() - begin);
      if (count > 0)
        y.middleCols(begin, count).noalias() = x * w.middleRows(begin, count).transpose();
    };
    Eigen::Barrier done(static_cast<unsigned>(threads_ - 1));
    for (Index t = 1; t < threads_; ++t)
      pool_->Schedule([&, t] {
        slice(t);
        done.Notify();
      });
    slice(0);
    done.Wait();
  }

 private:
  Index threads_;
  std::unique_ptr<Eigen::ThreadPool> pool_;
  std::unique_ptr<Eigen::ThreadPoolDevice> device_;
};

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

// One decoder block. Linear weights are [out_features, in_features], applied as x w^T.
struct Block {
  Vector attention_norm;  // RMSNorm gain before attention, [hidden]
  Matrix wq;              // [heads * head_dim, hidden]
  Matrix wk, wv;          // [kv_heads * head_dim, hidden]
  Matrix wo;              // [hidden, heads * head_dim]
  Vector mlp_norm;        // RMSNorm gain before the MLP, [hidden]
  Matrix w_gate, w_up;    // [ffn, hidden]
  Matrix w_down;          // [hidden, ffn]
};

struct Model {
  Config config;
  Matrix embedding;  // [vocab, hidden]: token embeddings, and the output head when tied
  Matrix lm_head;    // [vocab, hidden]: the output head when not tied (else empty)
  std::vector<Block> blocks;
  Vector final_norm;  // [hidden]
  // RoPE's rotation angles, position * theta^(-2i / head_dim), as cos and sin:
  // [max positions, head_dim / 2].
  Matrix rope_cos, rope_sin;

  Index parameters() const {
    Index n = embedding.size() + lm_head.size() + final_norm.size();
    for (const Block& b : blocks)
      n += b.attention_norm.size() + b.wq.size() + b.wk.size() + b.wv.size() + b.wo.size() +
           b.mlp_norm.size() + b.w_gate.size() + b.w_up.size() + b.w_down.size();
    return n;
  }
};

// Random weights scaled as at initialization: every matrix N(0, 1 / fan_in), so each linear
// layer keeps its input's magnitude, attention scores are of order 1 and the logits of the
// tied head spread over a few units (neither uniform nor one-hot). RMSNorm gains are 1.
Model make_model(const Config& c) {
  Random random(static_cast<std::uint32_t>(c.seed));
  auto linear = [&](Index out, Index in) {
    return random.normal_matrix(out, in, 1.0 / std::sqrt(double(in)));
  };
  Model model;
  model.config = c;
  model.embedding = linear(c.vocab, c.hidden);
  for (Index l = 0; l < c.layers; ++l) {
    Block b;
    b.attention_norm = Vector::Ones(c.hidden);
    b.wq = linear(c.heads * c.head_dim, c.hidden);
    b.wk = linear(c.kv_heads * c.head_dim, c.hidden);
    b.wv = linear(c.kv_heads * c.head_dim, c.hidden);
    b.wo = linear(c.hidden, c.heads * c.head_dim);
    b.mlp_norm = Vector::Ones(c.hidden);
    b.w_gate = linear(c.ffn, c.hidden);
    b.w_up = linear(c.ffn, c.hidden);
    b.w_down = linear(c.hidden, c.ffn);
    model.blocks.push_back(std::move(b));
  }
  model.final_norm = Vector::Ones(c.hidden);
  return model;
}

// A Hugging Face LlamaForCausalLM checkpoint: model.safetensors (F32, F16 or BF16 tensors, by
// their Hugging Face names) in the directory c.model, whose config.json gave c's dimensions.
Model load_model(const Config& c) {
  const demo::SafeTensors file = demo::SafeTensors::read(c.model + "/model.safetensors");
  auto matrix = [&](const std::string& name, Index rows, Index cols) {
    const std::vector<float> values = file.floats(name, {rows, cols});
    return Matrix(Eigen::Map<const Matrix>(values.data(), rows, cols));
  };
  auto vector = [&](const std::string& name, Index n) {
    const std::vector<float> values = file.floats(name, {n});
    return Vector(Eigen::Map<const Vector>(values.data(), n));
  };
  Model model;
  model.config = c;
  model.embedding = matrix("model.embed_tokens.weight", c.vocab, c.hidden);
  if (!c.tied) model.lm_head = matrix("lm_head.weight", c.vocab, c.hidden);
  for (Index l = 0; l < c.layers; ++l) {
    const std::string at = "model.layers." + std::to_string(l) + ".";
    Block b;
    b.attention_norm = vector(at + "input_layernorm.weight", c.hidden);
    b.wq = matrix(at + "self_attn.q_proj.weight", c.heads * c.head_dim, c.hidden);
    b.wk = matrix(at + "self_attn.k_proj.weight", c.kv_heads * c.head_dim, c.hidden);
    b.wv = matrix(at + "self_attn.v_proj.weight", c.kv_heads * c.head_dim, c.hidden);
    b.wo = matrix(at + "self_attn.o_proj.weight", c.hidden, c.heads * c.head_dim);
    b.mlp_norm = vector(at + "post_attention_layernorm.weight", c.hidden);
    b.w_gate = matrix(at + "mlp.gate_proj.weight", c.ffn, c.hidden);
    b.w_up = matrix(at + "mlp.up_proj.weight", c.ffn, c.hidden);
    b.w_down = matrix(at + "mlp.down_proj.weight", c.hidden, c.ffn);
    model.blocks.push_back(std::move(b));
  }
  model.final_norm = vector("model.norm.weight", c.hidden);
  return model;
}

// The model of the command line: loaded, or random; with its RoPE tables.
Model make_or_load_model(const Config& c) {
  Model model = c.model == "random" ? make_model(c) : load_model(c);
  const Index positions = std::max({c.prompt + c.new_tokens, c.max_positions, c.perplexity_tokens + 1}),
              half = c.head_dim / 2;
  model.rope_cos.resize(positions, half);
  model.rope_sin.resize(positions, half);
  // As Hugging Face's LlamaRotaryEmbedding computes them: the frequency and the angle rounded
  // to float (position * frequency, one float multiplication), its cosine and sine rounded
  // once. (The angle's float rounding, up to 4e-6 rad at position 70, moves logits by more
  // than the rest of the arithmetic does; the reference check compares with transformers.)
  for (Index i = 0; i < half; ++i) {
    const auto frequency =
        static_cast<float>(1.0 / std::pow(c.rope_theta, double(2 * i) / double(c.head_dim)));
    for (Index p = 0; p < positions; ++p) {
      const float angle = static_cast<float>(p) * frequency;
      model.rope_cos(p, i) = static_cast<float>(std::cos(double(angle)));
      model.rope_sin(p, i) = static_cast<float>(std::sin(double(angle)));
    }
  }
  return model;
}

// RMSNorm (Zhang & Sennrich 2019): each row divided by its root mean square, then multiplied
// by a learned gain. Unlike LayerNorm, no mean is subtracted and there is no bias.
Matrix rms_norm(const Matrix& x, const Vector& gain, double epsilon) {
  Matrix y(x.rows(), x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    const float mean_square = x.row(r).squaredNorm() / float(x.cols());
    y.row(r) = (x.row(r) / std::sqrt(mean_square + float(epsilon))).cwiseProduct(gain.transpose());
  }
  return y;
}

// Rotary position embedding (Su et al. 2021), in place. x holds one token per row, row r at
// absolute position positions[r], as `heads` heads of head_dim. Each head's
// dimension pairs (i, i + head_dim/2) - the Hugging Face "rotate_half" pairing - are rotated by
// the angle position * theta^(-2i / head_dim), so the dot product of a rotated query and key
// depends on their relative position only. Applied to q and k before k enters the cache: the
// cache holds keys at their absolute positions and never needs to rotate them again.
void apply_rope(Matrix& x, Index heads, const Index* positions, const Model& model) {
  const Index half = model.config.head_dim / 2;
  for (Index r = 0; r < x.rows(); ++r) {
    const Index position = positions[r];
    for (Index h = 0; h < heads; ++h) {
      float* head = x.row(r).data() + h * model.config.head_dim;
      for (Index i = 0; i < half; ++i) {
        const float c = model.rope_cos(position, i), s = model.rope_sin(position, i);
        const float x1 = head[i], x2 = head[i + half];
        head[i] = x1 * c - x2 * s;
        head[i + half] = x2 * c + x1 * s;
      }
    }
  }
}

// SiLU (swish): x * sigmoid(x).
float silu(float x) { return x / (1.0f + std::exp(-x)); }

// A [seq, heads * head_dim] matrix as the [1, seq, heads, head_dim] tensor (BSHD) it already is.
Eigen::TensorMap<const Tensor4> as_tensor(const Matrix& m, Index heads, Index head_dim) {
  return Eigen::TensorMap<const Tensor4>(m.data(), 1, m.rows(), heads, head_dim);
}

// The forward pass over n rows of tokens, row r the token tokens[r] at absolute position
// positions[r] (the rows of one sequence, or of several: a batch). Returns the logits of the
// rows listed in `outputs`, one row each.
//
// attention(layer, q, k, v) is where a KV cache comes in (or does not): it gets the n rows'
// queries, keys and values after RoPE, each [n, heads * head_dim], and returns the attention
// output [n, heads * head_dim] of the n queries, over whatever keys it keeps.
template <class Attention>
Matrix forward_rows(const Model& model, const Compute& compute, const int* tokens,
                    const Index* positions, Index n, const std::vector<Index>& outputs,
                    Attention&& attention) {
  const Config& c = model.config;
  Matrix h(n, c.hidden);  // the residual stream, one row per token
  for (Index r = 0; r < n; ++r) h.row(r) = model.embedding.row(tokens[r]);

  Matrix a, q, k, v, projected, gate, up;
  for (Index layer = 0; layer < c.layers; ++layer) {
    const Block& b = model.blocks[static_cast<std::size_t>(layer)];
    // Attention sublayer.
    a = rms_norm(h, b.attention_norm, c.rms_norm_eps);
    compute.linear(a, b.wq, q);
    compute.linear(a, b.wk, k);
    compute.linear(a, b.wv, v);
    apply_rope(q, c.heads, positions, model);
    apply_rope(k, c.kv_heads, positions, model);
    const Matrix attended = attention(layer, q, k, v);
    compute.linear(attended, b.wo, projected);
    h += projected;
    // MLP sublayer: SwiGLU (Shazeer 2020), down(silu(gate(a)) * up(a)).
    a = rms_norm(h, b.mlp_norm, c.rms_norm_eps);
    compute.linear(a, b.w_gate, gate);
    compute.linear(a, b.w_up, up);
    gate = gate.unaryExpr(&silu).cwiseProduct(up);
    compute.linear(gate, b.w_down, projected);
    h += projected;
  }
  // Output head (tied: the embedding): logits = RMSNorm(h_r) head^T for the rows asked.
  Matrix selected(static_cast<Index>(outputs.size()), c.hidden);
  for (std::size_t i = 0; i < outputs.size(); ++i) selected.row(static_cast<Index>(i)) = h.row(outputs[i]);
  Matrix logits;
  compute.linear(rms_norm(selected, model.final_norm, c.rms_norm_eps),
                 c.tied ? model.embedding : model.lm_head, logits);
  return logits;
}

// The forward pass over n tokens of one sequence at absolute positions first_position,
// first_position + 1, ...; returns the logits of the last one (all greedy decoding needs).
template <class Attention>
RowVector forward(const Model& model, const Compute& compute, const int* tokens, Index n,
                  Index first_position, Attention&& attention) {
  std::vector<Index> positions(static_cast<std::size_t>(n));
  for (Index r = 0; r < n; ++r) positions[static_cast<std::size_t>(r)] = first_position + r;
  return forward_rows(model, compute, tokens, positions.data(), n, {n - 1}, attention).row(0);
}

// The greedy choice: the first token of largest logit.
int argmax(const RowVector& logits) {
  Index best = 0;
  logits.maxCoeff(&best);
  return static_cast<int>(best);
}

// ---------------------------------------------------------------------------------------------
// Generation through a cache, and without one
// ---------------------------------------------------------------------------------------------

// A progress bar on stderr, drawn only when stderr is a terminal.
class Progress {
 public:
  Progress() : enabled_(isatty(STDERR_FILENO) != 0) {}
  void show(const std::string& label, Index done, Index total) const {
    if (!enabled_) return;
    constexpr int kWidth = 40;
    const int filled = total > 0 ? static_cast<int>(kWidth * done / total) : kWidth;
    std::fprintf(stderr, "\r%-22s [%s%s] %ld/%ld", label.c_str(), std::string(filled, '#').c_str(),
                 std::string(kWidth - filled, '.').c_str(), long(done), long(total));
    std::fflush(stderr);
  }
  void clear() const {
    if (enabled_) std::fprintf(stderr, "\r%80s\r", "");
  }

 private:
  bool enabled_;
};

// What one cache kind did.
struct Run {
  std::string name;
  Tokens tokens;                  // the generated tokens
  std::vector<RowVector> logits;  // the logits each of them was chosen from
  Index prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  std::size_t memory_bytes = 0;
  std::string note;
  double perplexity = 0;  // on the held-out passage, teacher-forced; 0: not measured
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Attention through one ModelKVCache: append the new keys and values to the layer's cache,
// then attend the new queries over everything the cache holds (causal by default; a sliding
// window cache applies its own window).
template <class Cache>
auto cached_attention(ModelKVCache<Cache>& caches, const Model& model,
                      const kvcache::AttendOptions& options) {
  return [&caches, &model, &options](Index layer, const Matrix& q, const Matrix& k,
                                     const Matrix& v) -> Matrix {
    const Config& c = model.config;
    caches.update(layer, as_tensor(k, c.kv_heads, c.head_dim),
                  as_tensor(v, c.kv_heads, c.head_dim));
    const Tensor4 out = kvcache::attend(as_tensor(q, c.heads, c.head_dim), caches[layer], options);
    return Eigen::Map<const Matrix>(out.data(), q.rows(), q.cols());
  };
}

// Greedy generation through per-layer caches: `prompt` (at absolute positions first_position..)
// is prefilled in chunks of `chunk` tokens (0: all at once), then new_tokens are generated, the
// first from the prefill's logits, each next one by a one-token decode step.
template <class Cache>
void generate_cached(const Model& model, const Compute& compute, ModelKVCache<Cache>& caches,
                     const Tokens& prompt, Index first_position, Index chunk,
                     const kvcache::AttendOptions& options, const Progress& progress, Run& run) {
  const Index new_tokens = model.config.new_tokens, n = static_cast<Index>(prompt.size());
  auto attention = cached_attention(caches, model, options);
  if (chunk <= 0) chunk = n;

  auto start = Clock::now();
  RowVector logits;
  for (Index begin = 0; begin < n; begin += chunk)
    logits = forward(model, compute, prompt.data() + begin, std::min(chunk, n - begin),
                     first_position + begin, attention);
  run.prefill_seconds += seconds_since(start);
  run.prefill_tokens += n;

  start = Clock::now();
  for (Index step = 0; step < new_tokens; ++step) {
    if (step > 0) {  // feed back the previous token
      const int token = run.tokens.back();
      logits = forward(model, compute, &token, 1, first_position + n + step - 1, attention);
    }
    run.tokens.push_back(argmax(logits));
    run.logits.push_back(logits);
    progress.show(run.name, step + 1, new_tokens);
  }
  run.decode_seconds += seconds_since(start);
  run.decode_tokens += new_tokens - 1;  // one-token forward passes (the first came from prefill)
  run.memory_bytes += caches.memory_bytes();
  progress.clear();
}

// Teacher forcing: the tokens of `passage` from index `from` on are fed one at a time through
// the caches (which already hold passage[0, from) at positions 0, 1, ...), as in decoding,
// and each step's logits are scored against the next true token. Returns the sum of the
// negative log-likelihoods (natural log), computed in double.
template <class Cache>
double teacher_forced(const Model& model, const Compute& compute, ModelKVCache<Cache>& caches,
                      const Tokens& passage, Index from, const kvcache::AttendOptions& options,
                      const Progress& progress, const std::string& label) {
  auto attention = cached_attention(caches, model, options);
  const Index n = static_cast<Index>(passage.size());
  double nll = 0;
  for (Index t = from; t + 1 < n; ++t) {
    const RowVector logits = forward(model, compute, &passage[std::size_t(t)], 1, t, attention);
    const double top = logits.maxCoeff();
    const double log_sum = top + std::log((logits.cast<double>().array() - top).exp().sum());
    nll += log_sum - double(logits(passage[std::size_t(t + 1)]));
    if ((t - from) % 64 == 0) progress.show(label + " ppl", t - from, n - 1 - from);
  }
  progress.clear();
  return nll;
}

// Perplexity of one cache kind (a fresh ModelKVCache<Cache>(layers, args...)) on the passage,
// every token after the first predicted one at a time: exp(mean negative log-likelihood).
template <class Cache, class... Args>
double perplexity_of(const Model& model, const Compute& compute, const Tokens& passage,
                     const kvcache::AttendOptions& options, const Progress& progress,
                     const std::string& label, const Args&... args) {
  ModelKVCache<Cache> caches(model.config.layers, args...);
  const double nll = teacher_forced(model, compute, caches, passage, 0, options, progress, label);
  return std::exp(nll / double(passage.size() - 1));
}

// One cache kind, all layers alike: a fresh ModelKVCache<Cache>(layers, args...).
template <class Cache, class... Args>
Run run_cache(const char* name, const Model& model, const Compute& compute, const Tokens& prompt,
              Index chunk, const kvcache::AttendOptions& options, const Progress& progress,
              const Args&... args) {
  Run run;
  run.name = name;
  ModelKVCache<Cache> caches(model.config.layers, args...);
  generate_cached(model, compute, caches, prompt, 0, chunk, options, progress, run);
  return run;
}

// The baseline without a cache: every new token reruns the model over the whole sequence so
// far (prompt + tokens generated), with full causal attention through kvcache::attend's tensor
// overload, recomputing every key and value of every layer each time.
Run run_without_cache(const Model& model, const Compute& compute, const Tokens& prompt,
                      const kvcache::AttendOptions& options, const Progress& progress) {
  const Config& c = model.config;
  Run run;
  run.name = "no cache";
  auto full_attention = [&](Index, const Matrix& q, const Matrix& k, const Matrix& v) -> Matrix {
    const Tensor4 out = kvcache::attend<Layout>(as_tensor(q, c.heads, c.head_dim),
                                                as_tensor(k, c.kv_heads, c.head_dim),
                                                as_tensor(v, c.kv_heads, c.head_dim), options);
    return Eigen::Map<const Matrix>(out.data(), q.rows(), q.cols());
  };
  Tokens sequence = prompt;
  for (Index step = 0; step < c.no_cache_tokens; ++step) {
    const auto start = Clock::now();
    const RowVector logits = forward(model, compute, sequence.data(),
                                     static_cast<Index>(sequence.size()), 0, full_attention);
    (step == 0 ? run.prefill_seconds : run.decode_seconds) += seconds_since(start);
    run.tokens.push_back(argmax(logits));
    run.logits.push_back(logits);
    sequence.push_back(run.tokens.back());
    progress.show(run.name, step + 1, c.no_cache_tokens);
  }
  run.prefill_tokens = static_cast<Index>(prompt.size());
  run.decode_tokens = c.no_cache_tokens - 1;
  progress.clear();
  return run;
}

// Perplexity through a shared prefix: passage[0, prefix] prefilled at once into static caches
// and frozen (the first `prefix` predictions scored from that prefill's logits), the rest
// teacher-forced through PrefixKVCache sequences over the frozen layers.
double prefix_perplexity(const Model& model, const Compute& compute, const Tokens& passage,
                         Index prefix, const kvcache::AttendOptions& options, const Progress& progress) {
  const Config& c = model.config;
  ModelKVCache<kvcache::StaticKVCache<float, Layout>> system(c.layers, Index(1), prefix, c.kv_heads,
                                                             c.head_dim);
  std::vector<Index> positions(static_cast<std::size_t>(prefix));
  for (Index i = 0; i < prefix; ++i) positions[std::size_t(i)] = i;
  const Matrix logits = forward_rows(model, compute, passage.data(), positions.data(), prefix,
                                     positions, cached_attention(system, model, options));
  double nll = 0;
  for (Index t = 0; t < prefix; ++t) {
    const double top = logits.row(t).maxCoeff();
    nll += top + std::log((logits.row(t).cast<double>().array() - top).exp().sum()) -
           double(logits(t, passage[std::size_t(t + 1)]));
  }
  const auto frozen = system.freeze();
  using Sequence = kvcache::PrefixKVCache<float, Layout>;
  ModelKVCache<Sequence> caches(c.layers, [&](Index layer) {
    return Sequence(frozen[static_cast<std::size_t>(layer)], Index(passage.size()) - prefix);
  });
  nll += teacher_forced(model, compute, caches, passage, prefix, options, progress, "prefix");
  return std::exp(nll / double(passage.size() - 1));
}

// The shared-prefix scenario: a system prompt (the first `prefix` prompt tokens) is prefilled
// once into a static cache per layer and frozen; then `continuations` sequences, each a
// PrefixKVCache per layer over those frozen layers (read in place, never copied), prefill their
// own rest of the prompt and generate. Continuation 0's rest is the real prompt's, so its
// tokens are comparable with the static cache's; continuation i > 0 changes the last prompt
// token to (last + i) mod vocab, so it answers a different prompt from the same prefix.
std::vector<Run> run_prefix(const Model& model, const Compute& compute, const Tokens& prompt,
                            const kvcache::AttendOptions& options, const Progress& progress,
                            std::size_t& frozen_bytes) {
  const Config& c = model.config;
  using Prefill = kvcache::StaticKVCache<float, Layout>;
  using Sequence = kvcache::PrefixKVCache<float, Layout>;

  ModelKVCache<Prefill> system(c.layers, /*batch*/ 1, /*max_seq_len*/ c.prefix, c.kv_heads,
                               c.head_dim);
  const auto start = Clock::now();
  forward(model, compute, prompt.data(), c.prefix, 0, cached_attention(system, model, options));
  const double system_seconds = seconds_since(start);
  // One immutable snapshot per layer; the static caches could be dropped now.
  const auto frozen = system.freeze();
  frozen_bytes = 0;
  for (const auto& layer : frozen) frozen_bytes += layer->memory_bytes();

  std::vector<Run> runs;
  for (Index i = 0; i < c.continuations; ++i) {
    Tokens rest(prompt.begin() + c.prefix, prompt.end());
    rest.back() = static_cast<int>((rest.back() + i) % c.vocab);
    Run run;
    run.name = "prefix seq " + std::to_string(i);
    run.note = "last prompt token " + std::to_string(rest.back());
    const Index own_tokens = static_cast<Index>(rest.size()) + c.new_tokens;
    ModelKVCache<Sequence> caches(c.layers, [&](Index layer) {
      return Sequence(frozen[static_cast<std::size_t>(layer)], own_tokens);
    });
    generate_cached(model, compute, caches, rest, c.prefix, 0, options, progress, run);
    runs.push_back(std::move(run));
  }
  // The system prompt's prefill counts once, shared by all the sequences.
  runs.front().prefill_seconds += system_seconds;
  runs.front().prefill_tokens += c.prefix;
  return runs;
}

// The serving scenario: the same `continuations` requests as run_prefix (the prompt, its last
// token changed by i), served together from one PagedKVCache (every layer in one pool of
// 16-token blocks). Request 0 prefills the whole prompt and publishes its blocks by token id
// (cache_prefix); each other request starts from the longest published block-aligned prefix
// (add_sequence(tokens): the blocks are shared, not copied) and prefills only the rest, all of
// them in one batched forward pass. Then every decode step runs one forward pass over one row
// per request: the weights are read once per step for the whole batch, and each layer's
// attention is one ragged attend over the requests' block tables.
struct PagedServing {
  std::vector<Run> runs;    // per request: its tokens (for the comparison with run_prefix)
  Run total;                // speed and memory of the batch
  Index cached_positions = 0, prefilled_positions = 0;
};

PagedServing run_paged(const Model& model, const Compute& compute, const Tokens& prompt,
                       const kvcache::AttendOptions& options, const Progress& progress) {
  using Pool = kvcache::PagedKVCache<float, Layout>;
  const Config& c = model.config;
  const Index requests = c.continuations, block_size = 16;
  const Index length = c.prompt + c.new_tokens;
  kvcache::PagedConfig pool_config;
  pool_config.num_layers = c.layers;
  pool_config.num_blocks = requests * ((length + block_size - 1) / block_size);
  pool_config.block_size = block_size;
  pool_config.num_heads = c.kv_heads;
  pool_config.head_dim = c.head_dim;
  Pool pool(pool_config);
  kvcache::AttendWorkspace workspace;

  PagedServing serving;
  serving.total.name = "paged, " + std::to_string(requests) + " batched";
  std::vector<Pool::SequenceId> ids;
  std::vector<Tokens> prompts;
  for (Index i = 0; i < requests; ++i) {
    Tokens p = prompt;
    p.back() = static_cast<int>((p.back() + i) % c.vocab);
    prompts.push_back(p);
    Run run;
    run.name = "paged seq " + std::to_string(i);
    serving.runs.push_back(run);
  }
  // The rows of one forward pass: which request each belongs to, its token and position.
  std::vector<Index> q_lens, outputs, positions;
  Tokens tokens;
  auto attention = [&](Index layer, const Matrix& q, const Matrix& k, const Matrix& v) -> Matrix {
    Index row = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {  // each request's rows are consecutive
      const Index n = q_lens[i];
      const Eigen::TensorMap<const Tensor4> ki(k.data() + row * k.cols(), 1, n, c.kv_heads, c.head_dim);
      const Eigen::TensorMap<const Tensor4> vi(v.data() + row * v.cols(), 1, n, c.kv_heads, c.head_dim);
      pool.update(layer, ids[i], ki, vi);
      row += n;
    }
    Matrix out(q.rows(), q.cols());
    Eigen::TensorMap<Tensor4> out_tensor(out.data(), 1, q.rows(), c.heads, c.head_dim);
    kvcache::attend(as_tensor(q, c.heads, c.head_dim), pool, layer, ids, q_lens, out_tensor,
                    workspace, options);
    return out;
  };
  // Runs one batched forward pass over the rows gathered for `ids` and appends each request's
  // greedy token.
  auto step = [&](double& seconds, Index& counted) {
    const auto start = Clock::now();
    outputs.clear();
    Index end = 0;
    for (Index n : q_lens) outputs.push_back((end += n) - 1);
    const Matrix logits = forward_rows(model, compute, tokens.data(), positions.data(),
                                       static_cast<Index>(tokens.size()), outputs, attention);
    seconds += seconds_since(start);
    counted += static_cast<Index>(tokens.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      Run& run = serving.runs[static_cast<std::size_t>(ids[i])];
      run.logits.push_back(logits.row(static_cast<Index>(i)));
      run.tokens.push_back(argmax(run.logits.back()));
    }
  };
  auto add_rows = [&](Pool::SequenceId id, const Tokens& sequence, Index from) {
    ids.push_back(id);
    q_lens.push_back(static_cast<Index>(sequence.size()) - from);
    for (Index p = from; p < static_cast<Index>(sequence.size()); ++p) {
      tokens.push_back(sequence[static_cast<std::size_t>(p)]);
      positions.push_back(p);
    }
  };
  auto clear_rows = [&] { ids.clear(); q_lens.clear(); tokens.clear(); positions.clear(); };

  // Prefill: request 0 alone (it publishes the shared blocks), then the others in one batch.
  Run& total = serving.total;
  const Pool::SequenceId first = pool.add_sequence();  // ids count from 0: request i is id i
  add_rows(first, prompts[0], 0);
  step(total.prefill_seconds, total.prefill_tokens);
  pool.cache_prefix(first, std::vector<std::int32_t>(prompts[0].begin(), prompts[0].end()));
  serving.prefilled_positions += c.prompt;
  clear_rows();
  for (Index i = 1; i < requests; ++i) {
    const auto& p = prompts[static_cast<std::size_t>(i)];
    const Pool::Match match = pool.add_sequence(std::vector<std::int32_t>(p.begin(), p.end()));
    serving.cached_positions += match.cached;
    serving.prefilled_positions += c.prompt - match.cached;
    add_rows(match.sequence, p, match.cached);
  }
  if (!ids.empty()) step(total.prefill_seconds, total.prefill_tokens);
  progress.show(total.name, 1, c.new_tokens);

  // Decode: one row per request per step.
  for (Index s = 1; s < c.new_tokens; ++s) {
    clear_rows();
    for (Index i = 0; i < requests; ++i) {
      const Run& run = serving.runs[static_cast<std::size_t>(i)];
      ids.push_back(i);
      q_lens.push_back(1);
      tokens.push_back(run.tokens.back());
      positions.push_back(c.prompt + s - 1);
    }
    step(total.decode_seconds, total.decode_tokens);
    progress.show(total.name, s + 1, c.new_tokens);
  }
  progress.clear();
  total.memory_bytes = static_cast<std::size_t>(pool.num_blocks() - pool.free_blocks()) *
                       pool.memory_bytes() / static_cast<std::size_t>(pool.num_blocks());
  total.tokens = serving.runs.front().tokens;
  total.logits = serving.runs.front().logits;
  return serving;
}

// ---------------------------------------------------------------------------------------------
// Comparison and report
// ---------------------------------------------------------------------------------------------

// How a run's tokens and logits compare with the reference (static) run's.
struct Comparison {
  Index same_tokens = 0;           // positions where the tokens agree
  Index compared = 0;              // tokens compared: the shorter run's count
  Index first_difference = -1;     // first position where they differ, -1: none
  float max_logit_difference = 0;  // over the steps whose token history was still identical
};

Comparison compare(const Run& run, const Run& reference) {
  Comparison result;
  result.compared = static_cast<Index>(std::min(run.tokens.size(), reference.tokens.size()));
  for (Index s = 0; s < result.compared; ++s) {
    const auto i = static_cast<std::size_t>(s);
    // Step s's logits are comparable while both runs have the same history before it: up to
    // and including the first step whose chosen tokens differ.
    if (result.first_difference < 0)
      result.max_logit_difference = std::max(
          result.max_logit_difference, (run.logits[i] - reference.logits[i]).cwiseAbs().maxCoeff());
    if (run.tokens[i] == reference.tokens[i])
      ++result.same_tokens;
    else if (result.first_difference < 0)
      result.first_difference = s;
  }
  return result;
}

double mib(std::size_t bytes) { return double(bytes) / (1024.0 * 1024.0); }

// Tokens [begin, end) of a byte vocabulary as printable text (a line break as " / ").
std::string text_of(const Tokens& tokens, std::size_t begin, std::size_t end) {
  std::string text;
  for (std::size_t i = begin; i < std::min(end, tokens.size()); ++i) {
    const int t = tokens[i];
    if (t == '\n')
      text += " / ";
    else
      text += t >= 32 && t < 127 ? static_cast<char>(t) : '?';
  }
  return text;
}

void print_header(const Config& c, const Model& model, const Tokens& prompt) {
  if (c.model == "random")
    std::printf("kvcache %d.%d.%d Llama demo (random weights, seed %ld)\n\n", kvcache::version.major,
                kvcache::version.minor, kvcache::version.patch, long(c.seed));
  else
    std::printf("kvcache %d.%d.%d Llama demo (weights: %s)\n\n", kvcache::version.major,
                kvcache::version.minor, kvcache::version.patch, c.model.c_str());
  std::printf(
      "model: %ld layers, hidden %ld, %ld query heads / %ld KV heads of %ld, SwiGLU %ld, "
      "vocab %ld, RoPE theta %g\n",
      long(c.layers), long(c.hidden), long(c.heads), long(c.kv_heads), long(c.head_dim),
      long(c.ffn), long(c.vocab), c.rope_theta);
  std::printf("       %.1fM parameters (%.1f MiB fp32), output head %s\n",
              double(model.parameters()) / 1e6, mib(std::size_t(model.parameters()) * sizeof(float)),
              c.tied ? "tied to the embedding" : "of its own");
  std::printf("run:   %ld-token prompt, %ld new tokens by greedy decoding, %ld thread%s\n",
              long(c.prompt), long(c.new_tokens), long(c.threads), c.threads > 1 ? "s" : "");
  if (c.bytes) {
    std::printf("       prompt: \"%s\"\n\n", text_of(prompt, 0, prompt.size()).c_str());
    return;
  }
  std::printf("       prompt starts");
  for (Index i = 0; i < std::min<Index>(8, c.prompt); ++i)
    std::printf(" %d", prompt[std::size_t(i)]);
  std::printf(" ...\n\n");
}

void print_table(const std::vector<Run>& runs, const Run& reference) {
  std::printf("%-22s %13s %12s %11s %13s %11s %14s %10s\n", "cache", "prefill tok/s", "decode tok/s",
              "memory MiB", "same tokens", "first diff", "max |dlogit|", "perplexity");
  for (const Run& run : runs) {
    const Comparison cmp = compare(run, reference);
    char same[48], first[24], decode[32];
    std::snprintf(same, sizeof same, "%ld/%ld", long(cmp.same_tokens), long(cmp.compared));
    if (cmp.first_difference < 0)
      std::snprintf(first, sizeof first, "-");
    else
      std::snprintf(first, sizeof first, "%ld", long(cmp.first_difference));
    if (run.decode_tokens > 0)
      std::snprintf(decode, sizeof decode, "%.1f", double(run.decode_tokens) / run.decode_seconds);
    else
      std::snprintf(decode, sizeof decode, "-");
    char perplexity[24];
    if (run.perplexity > 0)
      std::snprintf(perplexity, sizeof perplexity, "%.4f", run.perplexity);
    else
      std::snprintf(perplexity, sizeof perplexity, "-");
    std::printf("%-22s %13.1f %12s %11.2f %13s %11s %14.3g %10s\n", run.name.c_str(),
                double(run.prefill_tokens) / run.prefill_seconds, decode, mib(run.memory_bytes),
                same, first, double(cmp.max_logit_difference), perplexity);
  }
}

std::string first_tokens(const Tokens& tokens, std::size_t count) {
  std::string text;
  for (std::size_t i = 0; i < std::min(count, tokens.size()); ++i)
    text += (i ? " " : "") + std::to_string(tokens[i]);
  return text + (tokens.size() > count ? " ..." : "");
}

// The decoder against the logits Hugging Face transformers computed for the same weights
// (tools/train_model.py writes them): a prompt and its greedy continuation, once as one
// prefill over every position and once as the prompt's prefill then one token at a time
// through a static cache. Returns the exit status: 0 when every logit is within 1e-4 and the
// greedy continuation is the same.
int check_reference(const Model& model, const Compute& compute, const std::string& path) {
  const Config& c = model.config;
  constexpr double kTolerance = 1e-4;
  Tokens tokens;
  Index prompt_length = 0;
  Matrix want;
  try {
    const demo::Json reference = demo::parse_json(read_file(path));
    const demo::Json* listed = reference.find("tokens");
    const demo::Json* logits = reference.find("logits");
    if (listed == nullptr || listed->kind != demo::Json::Kind::array || logits == nullptr ||
        logits->kind != demo::Json::Kind::array || logits->array.size() != listed->array.size())
      demo::fail("expected \"tokens\" and as many rows of \"logits\"");
    prompt_length = demo::json_integer(reference, "prompt_length", -1, Index(listed->array.size()));
    for (const demo::Json& token : listed->array) {
      if (token.kind != demo::Json::Kind::number || !(token.number >= 0) ||
          token.number >= double(c.vocab) || token.number != std::floor(token.number))
        demo::fail("a token that is not an integer in [0, vocab)");
      tokens.push_back(static_cast<int>(token.number));
    }
    want.resize(Index(tokens.size()), c.vocab);
    for (Index r = 0; r < want.rows(); ++r) {
      const demo::Json& row = logits->array[std::size_t(r)];
      if (row.kind != demo::Json::Kind::array || Index(row.array.size()) != c.vocab)
        demo::fail("logits row ", r, ": expected ", c.vocab, " numbers");
      for (Index v = 0; v < c.vocab; ++v) {
        const demo::Json& x = row.array[std::size_t(v)];
        if (x.kind != demo::Json::Kind::number || !(std::abs(x.number) <= 3.0e38))
          demo::fail("logits row ", r, ": entry ", v, " is not a finite float");
        want(r, v) = float(x.number);
      }
    }
  } catch (const demo::FileError& e) {
    std::fprintf(stderr, "llama_demo: %s: %s\n", path.c_str(), e.what());
    return 2;
  }
  const Index n = static_cast<Index>(tokens.size());
  require(prompt_length >= 1 && n <= std::max(c.prompt + c.new_tokens, c.max_positions),
          path + ": the reference does not fit the model's positions");
  kvcache::AttendOptions options;
  options.device = compute.device();
  using Static = kvcache::StaticKVCache<float, Layout>;
  std::vector<Index> positions(static_cast<std::size_t>(n)), rows = positions;
  for (Index i = 0; i < n; ++i) positions[std::size_t(i)] = rows[std::size_t(i)] = i;

  // One prefill over every position.
  ModelKVCache<Static> whole(c.layers, Index(1), n, c.kv_heads, c.head_dim);
  const Matrix all = forward_rows(model, compute, tokens.data(), positions.data(), n, rows,
                                  cached_attention(whole, model, options));
  // The prompt, then one token at a time.
  ModelKVCache<Static> stepwise(c.layers, Index(1), n, c.kv_heads, c.head_dim);
  auto attention = cached_attention(stepwise, model, options);
  Matrix steps(n, c.vocab);
  const std::vector<Index> prompt_rows(rows.begin(), rows.begin() + prompt_length);
  steps.topRows(prompt_length) =
      forward_rows(model, compute, tokens.data(), positions.data(), prompt_length, prompt_rows, attention);
  for (Index t = prompt_length; t < n; ++t)
    steps.row(t) = forward(model, compute, &tokens[std::size_t(t)], 1, t, attention);

  const double whole_difference = (all - want).cwiseAbs().maxCoeff();
  const double step_difference = (steps - want).cwiseAbs().maxCoeff();
  Index greedy_same = 0;
  for (Index t = prompt_length - 1; t + 1 < n; ++t)
    greedy_same += argmax(steps.row(t)) == tokens[std::size_t(t + 1)] ? 1 : 0;
  const Index greedy_total = n - prompt_length;
  std::printf("reference %s: %ld positions (%ld prompt, %ld greedy), logits up to %.1f in magnitude\n",
              path.c_str(), long(n), long(prompt_length), long(greedy_total),
              double(want.cwiseAbs().maxCoeff()));
  std::printf("max |logit - transformers|: one prefill %.3g, prompt then token by token %.3g (tolerance %.0e)\n",
              whole_difference, step_difference, kTolerance);
  std::printf("greedy continuation: %ld/%ld tokens equal to transformers'\n", long(greedy_same),
              long(greedy_total));
  const bool ok = whole_difference <= kTolerance && step_difference <= kTolerance &&
                  greedy_same == greedy_total;
  std::printf("check: decoder == transformers: %s\n", ok ? "yes" : "NO");
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Config c = parse_command_line(argc, argv);
  Eigen::initParallel();  // Eigen products are called from several threads when --threads > 1
  Model model;
  try {
    model = make_or_load_model(c);
  } catch (const demo::FileError& e) {
    usage_error(c.model + ": " + e.what());
  }
  const Compute compute(c.threads);
  const Progress progress;
  if (!c.check_reference.empty()) return check_reference(model, compute, c.check_reference);

  // The prompt: with a byte vocabulary, the start of the model's held-out text; else random.
  Tokens prompt(static_cast<std::size_t>(c.prompt));
  const bool text_model = c.bytes && c.model != "random";
  std::string heldout;  // the trained model's held-out text (never trained on)
  if (text_model) {
    try {
      heldout = read_file(c.model + "/heldout.txt");
    } catch (const demo::FileError& e) {
      usage_error(e.what());
    }
    require(Index(heldout.size()) > std::max(c.prompt, c.perplexity_tokens),
            c.model + "/heldout.txt is shorter than --prompt or --ppl-tokens");
    require(c.perplexity_tokens == 0 || c.prefix < c.perplexity_tokens,
            "--prefix must be shorter than --ppl-tokens (the prefix row's perplexity)");
    for (std::size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<unsigned char>(heldout[i]);
  } else {
    Random prompt_random(static_cast<std::uint32_t>(c.seed) ^ 0x5eedu);
    for (int& token : prompt) token = prompt_random.below(c.vocab);
  }
  print_header(c, model, prompt);

  kvcache::AttendOptions options;  // causal, scale 1/sqrt(head_dim)
  options.device = compute.device();
  const Index max_seq_len = c.prompt + c.new_tokens;
  kvcache::QuantConfig quant;
  quant.group_size = c.group_size;
  quant.residual_length = c.residual;

  // Every cache kind generates from the same prompt; static fp32 is the reference.
  std::vector<Run> runs;
  runs.push_back(run_cache<kvcache::StaticKVCache<float, Layout>>(
      "static", model, compute, prompt, 0, options, progress, Index(1), max_seq_len, c.kv_heads,
      c.head_dim));
  runs.push_back(run_cache<kvcache::DynamicKVCache<float, Layout>>(
      "dynamic", model, compute, prompt, 0, options, progress, Index(1), c.kv_heads, c.head_dim));
  const std::string window_name =
      "window " + std::to_string(c.window) + "+" + std::to_string(c.sinks) + " sinks";
  runs.push_back(run_cache<kvcache::SlidingWindowKVCache<float, Layout>>(
      window_name.c_str(), model, compute, prompt, c.window_chunk, options, progress, Index(1),
      c.window, c.kv_heads, c.head_dim, c.sinks));
  runs.push_back(run_cache<kvcache::Int8KVCache<float, Layout>>(
      "int8", model, compute, prompt, 0, options, progress, Index(1), max_seq_len, c.kv_heads,
      c.head_dim, quant));
  runs.push_back(run_cache<kvcache::Int4KVCache<float, Layout>>(
      "int4", model, compute, prompt, 0, options, progress, Index(1), max_seq_len, c.kv_heads,
      c.head_dim, quant));

  std::size_t frozen_bytes = 0;
  const std::vector<Run> sequences =
      run_prefix(model, compute, prompt, options, progress, frozen_bytes);
  Run prefix = sequences.front();  // continuation 0: the same prompt as the others
  prefix.name =
      "prefix " + std::to_string(c.prefix) + " + " + std::to_string(c.continuations) + " seqs";
  prefix.prefill_tokens = prefix.decode_tokens = 0;
  prefix.prefill_seconds = prefix.decode_seconds = 0;
  prefix.memory_bytes = frozen_bytes;
  for (const Run& s : sequences) {  // speed and memory of all the sequences together
    prefix.prefill_tokens += s.prefill_tokens;
    prefix.prefill_seconds += s.prefill_seconds;
    prefix.decode_tokens += s.decode_tokens;
    prefix.decode_seconds += s.decode_seconds;
    prefix.memory_bytes += s.memory_bytes;
  }
  runs.push_back(prefix);
  const PagedServing paged = run_paged(model, compute, prompt, options, progress);
  runs.push_back(paged.total);
  runs.push_back(run_without_cache(model, compute, prompt, options, progress));

  // Perplexity on the held-out passage, every token predicted one at a time through the cache.
  if (text_model && c.perplexity_tokens > 0) {
    Tokens passage(static_cast<std::size_t>(c.perplexity_tokens + 1));
    for (std::size_t i = 0; i < passage.size(); ++i) passage[i] = static_cast<unsigned char>(heldout[i]);
    const Index length = static_cast<Index>(passage.size());
    runs[0].perplexity = perplexity_of<kvcache::StaticKVCache<float, Layout>>(
        model, compute, passage, options, progress, "static", Index(1), length, c.kv_heads, c.head_dim);
    runs[1].perplexity = perplexity_of<kvcache::DynamicKVCache<float, Layout>>(
        model, compute, passage, options, progress, "dynamic", Index(1), c.kv_heads, c.head_dim);
    runs[2].perplexity = perplexity_of<kvcache::SlidingWindowKVCache<float, Layout>>(
        model, compute, passage, options, progress, "window", Index(1), c.window, c.kv_heads,
        c.head_dim, c.sinks);
    runs[3].perplexity = perplexity_of<kvcache::Int8KVCache<float, Layout>>(
        model, compute, passage, options, progress, "int8", Index(1), length, c.kv_heads, c.head_dim, quant);
    runs[4].perplexity = perplexity_of<kvcache::Int4KVCache<float, Layout>>(
        model, compute, passage, options, progress, "int4", Index(1), length, c.kv_heads, c.head_dim, quant);
    runs[5].perplexity = prefix_perplexity(model, compute, passage, c.prefix, options, progress);
  }

  const Run& reference = runs.front();
  print_table(runs, reference);
  std::printf(
      "\nsame tokens: greedy tokens equal to the static cache's at the same step. max |dlogit|: "
      "largest\nlogit difference from the static run over the steps whose history was still "
      "identical\n(up to the first differing token). The sliding window attends to %ld sinks + "
      "the last %ld\npositions only, so it is a different function of a %ld-token context by "
      "design. The\nprefix row is continuation 0 (the full prompt); its speed and memory cover "
      "all %ld sequences,\nthe shared prefix counted once. The no-cache run generated %ld "
      "tokens.\n",
      long(c.sinks), long(c.window), long(c.prompt), long(c.continuations),
      long(c.no_cache_tokens));
  if (runs.front().perplexity > 0)
    std::printf(
        "perplexity: exp of the mean negative log-likelihood of %ld held-out bytes, each predicted\n"
        "one at a time through the cache from all the bytes before it (the prefix row: the first %ld\n"
        "prefilled at once, then frozen and continued).\n",
        long(c.perplexity_tokens), long(c.prefix));

  std::printf(
      "\nshared prefix: %ld tokens frozen once (%.2f MiB for %ld layers), %ld sequences "
      "of %ld own tokens each\n",
      long(c.prefix), mib(frozen_bytes), long(c.layers), long(c.continuations),
      long(c.prompt - c.prefix + c.new_tokens));
  for (const Run& s : sequences) {
    const Comparison cmp = compare(s, sequences.front());
    std::printf("  %s (%s): %ld/%ld tokens equal to sequence 0's; %s\n", s.name.c_str(),
                s.note.c_str(), long(cmp.same_tokens), long(cmp.compared),
                first_tokens(s.tokens, 8).c_str());
  }
  std::printf("  %ld independent static caches would hold %.2f MiB; shared: %.2f MiB\n",
              long(c.continuations), double(c.continuations) * mib(reference.memory_bytes),
              mib(prefix.memory_bytes));

  std::printf(
      "\npaged serving: the same %ld requests from one PagedKVCache (16-token blocks), batched: "
      "%ld prompt\n  positions found cached by token id (shared blocks), %ld prefilled; %.2f "
      "MiB of blocks in use\n",
      long(c.continuations), long(paged.cached_positions), long(paged.prefilled_positions),
      mib(paged.total.memory_bytes));
  for (std::size_t i = 0; i < paged.runs.size() && i < sequences.size(); ++i) {
    const Comparison cmp = compare(paged.runs[i], sequences[i]);
    std::printf("  %s: %ld/%ld tokens equal to prefix seq %zu's; max |dlogit| %.3g\n",
                paged.runs[i].name.c_str(), long(cmp.same_tokens), long(cmp.compared), i,
                double(cmp.max_logit_difference));
  }

  if (c.bytes) {
    std::printf("\ngenerated text (greedy, after the prompt):\n");
    for (const Run& run : runs)
      if (run.name == "static" || run.name == "int4" || run.name.rfind("window", 0) == 0)
        std::printf("  %-20s \"%s\"\n", run.name.c_str(),
                    text_of(run.tokens, 0, run.tokens.size()).c_str());
  }
  std::printf("\nstatic tokens: %s\n", first_tokens(reference.tokens, 16).c_str());
  const Run& dynamic = runs[1];
  const Run& no_cache = runs.back();
  const bool dynamic_same = dynamic.tokens == reference.tokens;
  const bool no_cache_same =
      std::equal(no_cache.tokens.begin(), no_cache.tokens.end(), reference.tokens.begin());
  const bool ok = dynamic_same && no_cache_same;
  std::printf("check: static == dynamic == no-cache: %s\n", ok ? "yes" : "NO");
  if (!ok) {
    std::fprintf(stderr,
                 "llama_demo: FAILED: the static, dynamic and no-cache runs must generate the same "
                 "tokens (dynamic: %s, no-cache: %s)\n",
                 dynamic_same ? "same" : "different", no_cache_same ? "same" : "different");
    return 1;
  }
  return 0;
}
