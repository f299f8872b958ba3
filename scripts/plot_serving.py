#!/usr/bin/env python3
"""Plot the serving workload of benchmarks/bench_paged.cpp: K/V memory per step of a paged
pool against per-request DynamicKVCache buffers, and the pool's waste.

    KVCACHE_SERVING_TRACE=DIR build/.../kvcache_bench_paged --benchmark_filter=serving/ \\
        --benchmark_out=DIR/serving.json --benchmark_out_format=json
    python3 scripts/plot_serving.py DIR/serving_bs16_thr1.csv DIR/serving_bs32_thr1.csv \\
        [--json DIR/serving.json] [--png docs/bench/serving.png]

Each CSV (one per run: step, active requests, query rows, paged_MiB, per_request_MiB,
waste_pct) becomes a pair of lines in the memory panel and one line in the waste panel. With
--json, a markdown table of the runs' counters is printed. Needs matplotlib for the PNG
(Debian: python3-matplotlib).
"""
import argparse
import csv
import json
import os
import re


def load_trace(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows] for key in rows[0]} if rows else {}


def label_of(path):
    match = re.search(r"serving_bs(\d+)_thr(\d+)", os.path.basename(path))
    return f"block {match.group(1)}, {match.group(2)} thr" if match else os.path.basename(path)


def table(json_path):
    with open(json_path) as f:
        data = json.load(f)
    fields = ["kv_MiB_paged", "kv_MiB_per_request", "memory_ratio", "waste_pct",
              "prefix_hit_pct", "prefill_saved", "prompt_prefills", "decode_tok_per_s"]
    lines = ["| run | " + " | ".join(fields) + " |", "|---|" + "---:|" * len(fields)]
    for b in data.get("benchmarks", []):
        if not b["name"].startswith("serving/"):
            continue
        name = b["name"].replace("/iterations:1", "").replace("/real_time", "")
        cells = []
        for key in fields:
            value = b.get(key)
            cells.append("-" if value is None else (f"{value:.0f}" if value >= 100 else f"{value:.2f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="+", help="serving_bs<B>_thr<T>.csv files")
    parser.add_argument("--json", default=None, help="the benchmark's JSON output (a table)")
    parser.add_argument("--png", default="serving.png", help="output PNG")
    args = parser.parse_args()
    if args.json:
        print(table(args.json))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, waste) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                        gridspec_kw={"height_ratios": [3, 1]})
    for i, path in enumerate(args.traces):
        trace = load_trace(path)
        if not trace:
            continue
        color = f"C{i}"
        label = label_of(path)
        memory.plot(trace["step"], trace["paged_MiB"], color=color, label=f"paged pool ({label})")
        if i == 0:
            memory.plot(trace["step"], trace["per_request_MiB"], color="gray", linestyle="--",
                        label="a DynamicKVCache per request")
        waste.plot(trace["step"], trace["waste_pct"], color=color, label=label)
    memory.set_ylabel("K/V memory held (MiB)")
    memory.set_title("256 requests, shared 1024-token prompt, batch 32 (one layer, Hkv 8, D 128, fp32)",
                     fontsize=10)
    memory.legend(fontsize=8)
    memory.grid(alpha=0.3)
    waste.set_ylabel("waste (%)")
    waste.set_xlabel("step (one ragged attend each)")
    waste.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
