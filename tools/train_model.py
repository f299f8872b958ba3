#!/usr/bin/env python3
"""Trains the demo's default model: a small Llama (Hugging Face LlamaForCausalLM) over bytes of
the King James Bible, and writes what examples/llama_demo.cpp and its ctest read.

    tools/train_model.py [--out examples/model] [--steps N] [--threads 2]
    tools/train_model.py --resume examples/model --out examples/model [--long-steps 150]
    tools/train_model.py --fixture tests/data/llama_fixture

The shipped model is the first command, then the second (tools/README.md says why).

Reproducible: the data (Debian's bible-kjv-text through the `bible` program of bible-kjv; the
text is in the public domain), the seed, the hyper-parameters below and the step count fix the
weights up to floating-point differences between CPUs. Needs torch (Debian's python3-torch
1.13 is enough) and transformers 4.38.2 with safetensors from PyPI (the last releases that
still accept torch 1.13); see tools/README.md. Not part of CI.

Writes to --out:
  config.json         the LlamaConfig (Hugging Face format)
  model.safetensors   the weights, float16 (the C++ loader widens them to float)
  reference.json      a fixed prompt, its greedy continuation by transformers, and the logits
                      transformers computes for every position of prompt + continuation, so the
                      C++ decoder is checked against an implementation we did not write
  heldout.txt         the held-out passage (never trained on) the demo's perplexity table reads
"""
import argparse
import json
import math
import os
import subprocess
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 2026
CONFIG = dict(
    vocab_size=256,  # bytes
    hidden_size=256,
    intermediate_size=688,  # 8/3 * hidden rounded up to a multiple of 16
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,  # grouped-query attention, 4 query heads per KV head
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=10,
    eos_token_id=10,
)
# Two phases of the same number of bytes per step: short sequences first (most of the
# learning, fast), then sequences as long as the perplexity passage the demo reads (2048
# bytes), so that the full-context caches are not asked for positions never trained on.
PHASES = [(256, 16), (2048, 2)]  # (sequence length, batch)
LONG_STEPS = 120  # steps of the second phase, included in --steps
PEAK_LR = 3e-3
WARMUP = 100
PROMPT = "And God said unto Moses, "
CONTINUATION = 48
HELDOUT_BOOKS = "Rev1:1-Rev22:21"  # Revelation: the held-out passage
HELDOUT_TOKENS = 2048  # predicted bytes of it the perplexities are over


def verses(selection):
    """The verses of a `bible` selection, without their references, one per line."""
    out = subprocess.run(["bible", "-f", selection], check=True, capture_output=True, text=True)
    lines = []
    for line in out.stdout.splitlines():
        reference, _, text = line.partition(" ")
        if text:
            lines.append(text)
    return "\n".join(lines) + "\n"


def write_reference(model_dir, prompt, continuation, out_name="reference.json", extra=None):
    """transformers' LlamaForCausalLM loaded from model_dir: the greedy continuation of `prompt`
    (token ids) and the logits of every position of prompt + continuation."""
    reference = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    reference.eval()
    with torch.no_grad():
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=continuation,
                                       do_sample=False, pad_token_id=0)
        tokens = generated[0].tolist()
        logits = reference(torch.tensor([tokens])).logits[0]
    record = {
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "tokens": tokens,
        "prompt_length": len(prompt),
        "logits": [[round(float(x), 6) for x in row] for row in logits.tolist()],
    }
    record.update(extra or {})
    with open(os.path.join(model_dir, out_name), "w") as f:
        json.dump(record, f)
    return reference, tokens


def write_fixture(out):
    """A tiny random checkpoint the ctest example.llama_demo_fixture reads: what the shipped
    model does not exercise - an untied output head, a vocabulary that is not bytes, bfloat16
    and float32 tensors, head_dim given explicitly, another rope_theta and rms_norm_eps."""
    torch.manual_seed(SEED + 1)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                         rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    os.makedirs(out, exist_ok=True)
    weights = {}
    for name, tensor in model.state_dict().items():
        dtype = torch.float32 if "norm" in name or "lm_head" in name else torch.bfloat16
        weights[name] = tensor.detach().to(dtype).contiguous()
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["head_dim"] = 16
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config_dict, f, indent=2)
    write_reference(out, [1, 17, 299, 42, 7, 100, 250, 3], 8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "examples", "model"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fixture", help="write only the tiny test checkpoint to this directory")
    parser.add_argument("--resume", help="continue from the checkpoint in this directory with "
                        "--long-steps steps of 2048-byte sequences (a schedule of their own)")
    parser.add_argument("--long-steps", type=int, default=150)
    args = parser.parse_args()
    if args.fixture:
        write_fixture(args.fixture)
        return
    torch.manual_seed(SEED)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)

    train_text = verses("Gen1:1-Jude1:25").encode("ascii", "replace")
    heldout_text = verses(HELDOUT_BOOKS).encode("ascii", "replace")
    data = torch.tensor(list(train_text), dtype=torch.long)
    print(f"train {len(train_text)} bytes, held out {len(heldout_text)} bytes")

    if args.resume:
        model = LlamaForCausalLM.from_pretrained(args.resume, torch_dtype=torch.float32)
        config = model.config
        torch.manual_seed(SEED + 2)
    else:
        config = LlamaConfig(**CONFIG)
        model = LlamaForCausalLM(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(SEED + (2 if args.resume else 0))
    started = time.time()
    model.train()
    steps = args.long_steps if args.resume else args.steps
    for step in range(steps):
        if args.resume:  # the long phase alone: its own warm-up and cosine, a third of the peak
            lr = PEAK_LR / 3 * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        else:
            lr = PEAK_LR * min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        seq_len, batch_size = PHASES[0] if step < steps - LONG_STEPS and not args.resume else PHASES[1]
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        batch = torch.stack([data[s:s + seq_len + 1] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1].clone()).loss
        # (labels are shifted inside the model: position t predicts token t + 1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step} (length {seq_len}) loss {loss.item():.3f} ({loss.item() / math.log(2):.2f} bits/byte) "
                  f"lr {lr:.2e} {time.time() - started:.0f} s", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.eval()
    # float16 weights: what is shipped, and what the reference below is computed from.
    weights = {name: tensor.detach().to(torch.float16).contiguous()
               for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(weights, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(args.out)
    with open(os.path.join(args.out, "heldout.txt"), "wb") as f:
        f.write(heldout_text)

    # The reference: transformers' own LlamaForCausalLM loaded from the files just written.
    reference = LlamaForCausalLM.from_pretrained(args.out, torch_dtype=torch.float32)
    reference.eval()
    prompt = list(PROMPT.encode("ascii"))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        generated = reference.generate(ids, max_new_tokens=CONTINUATION, do_sample=False,
                                       pad_token_id=10)
        tokens = generated[0].tolist()
        logits = reference(torch.tensor([tokens])).logits[0]
        passage = list(heldout_text[:HELDOUT_TOKENS + 1])
        loss = torch.nn.functional.cross_entropy(reference(torch.tensor([passage[:-1]])).logits[0],
                                                 torch.tensor(passage[1:]))
    print("greedy:", bytes(tokens).decode("ascii", "replace"))
    print(f"held-out perplexity (first {HELDOUT_TOKENS} predicted bytes, transformers): {math.exp(loss.item()):.3f}")
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({
            "transformers": __import__("transformers").__version__,
            "torch": torch.__version__,
            "prompt": PROMPT,
            "tokens": tokens,
            "prompt_length": len(prompt),
            "heldout_tokens": HELDOUT_TOKENS,
            "heldout_perplexity": math.exp(loss.item()),
            "logits": [[round(float(x), 6) for x in row] for row in logits.tolist()],
        }, f)


if __name__ == "__main__":
    main()
