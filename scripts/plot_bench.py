#!/usr/bin/env python3
"""Turn kvcache benchmark JSON (Google Benchmark --benchmark_out_format=json) into a PNG and
markdown tables.

    python3 scripts/plot_bench.py DECODE.json [--png OUT.png] [--prefill PREFILL.json]
                                  [--append APPEND.json]

* DECODE.json (bench_decode): a PNG of decode GB/s vs n_kv (log x), one line per cache kind,
  one panel per (head_dim, threads), with the measured read bandwidth (the probe over a buffer
  of the static fp32 cache's bytes) as the ceiling line; and a markdown table per head_dim:
  kind, n_kv, ms per step, GB/s and roofline at 1 and 2 threads, the 2-thread speed-up
  (1-thread time / 2-thread time) and the time relative to static_fp32 (1 thread); and for
  the model steps (decode_layers/...) a table of each kind's layers, its time per layer (mean
  and fastest), the fastest per layer relative to static_fp32's, and roofline_dram_fastest.
* PREFILL.json, APPEND.json (optional): their tables (GFLOP/s and gemm_ratio; per-token append
  times and second_half_ratio).

With --benchmark_repetitions the median aggregate is used; otherwise the iteration runs of a
name are averaged. Needs python3; matplotlib only for the PNG (Debian: python3-matplotlib).
"""
import argparse
import json
import re
import sys
from collections import defaultdict

KIND_ORDER = ["static_fp32", "static_bf16", "static_fp16", "int8", "int4",
              "window4096_fp32", "prefix_fp32"]
DECODE_NAME = re.compile(r"^decode/(?P<kind>[^/]+)/D(?P<d>\d+)/nkv(?P<n>\d+)/thr(?P<t>\d+)")
LAYERS_NAME = re.compile(r"^decode_layers/(?P<kind>[^/]+)/D(?P<d>\d+)/nkv(?P<n>\d+)/thr(?P<t>\d+)")


def load_runs(path):
    """{base name: {field: value}}: the median aggregate if present, else the mean of the
    iteration runs (the '/real_time' suffix is dropped)."""
    with open(path) as f:
        data = json.load(f)
    iterations, medians = defaultdict(list), {}
    for b in data.get("benchmarks", []):
        name = b.get("run_name", b["name"]).replace("/real_time", "")
        if b.get("run_type") == "aggregate":
            if b.get("aggregate_name") == "median":
                medians[name] = b
        elif "error_occurred" not in b or not b["error_occurred"]:
            iterations[name].append(b)
    runs = {}
    for name in set(iterations) | set(medians):
        if name in medians:
            runs[name] = medians[name]
            continue
        rows = iterations[name]
        merged = dict(rows[0])
        for key, value in rows[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = sum(r[key] for r in rows) / len(rows)
        runs[name] = merged
    return runs, data.get("context", {})


def to_ms(run):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[run.get("time_unit", "ns")]
    return run["real_time"] * scale


def decode_points(runs, pattern=DECODE_NAME):
    """{(kind, d, n, threads): run} of the names `pattern` matches."""
    points = {}
    for name, run in runs.items():
        m = pattern.match(name)
        if m:
            points[(m["kind"], int(m["d"]), int(m["n"]), int(m["t"]))] = run
    return points


def gbps(run):
    if "GBps" in run:
        return run["GBps"]
    return run.get("bytes_per_second", 0.0) * 1e-9


def kinds_in(points):
    present = {k[0] for k in points}
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def decode_table(points):
    out = []
    for d in sorted({k[1] for k in points}, reverse=True):
        out.append(f"\n### decode, head_dim {d} (B 1, Hq 32, Hkv 8, q_len 1)\n")
        out.append("| kind | n_kv | KV MiB | ms 1t | GB/s 1t | roofline 1t | ms 2t | GB/s 2t "
                   "| roofline 2t | 2t speed-up | time vs fp32 (1t) |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for kind in kinds_in(points):
            for n in sorted({k[2] for k in points if k[0] == kind and k[1] == d}):
                r1, r2 = points.get((kind, d, n, 1)), points.get((kind, d, n, 2))
                ref = points.get(("static_fp32", d, n, 1))
                any_run = r1 or r2
                speedup = to_ms(r1) / to_ms(r2) if r1 and r2 else None
                rel = to_ms(r1) / to_ms(ref) if r1 and ref else None
                out.append(
                    f"| {kind} | {n} | {fmt(any_run.get('kv_MiB'), 1)} "
                    f"| {fmt(to_ms(r1) if r1 else None)} | {fmt(gbps(r1) if r1 else None)} "
                    f"| {fmt(r1.get('roofline') if r1 else None, 3)} "
                    f"| {fmt(to_ms(r2) if r2 else None)} | {fmt(gbps(r2) if r2 else None)} "
                    f"| {fmt(r2.get('roofline') if r2 else None, 3)} "
                    f"| {fmt(speedup)} | {fmt(rel)} |")
    return "\n".join(out)


def layers_table(points):
    """The model steps (decode_layers): one row per kind, n_kv and thread count."""
    if not points:
        return ""
    out = ["\n### decode, one model step (decode_layers: every layer from DRAM)\n",
           "| kind | D | n_kv | threads | layers | ms per layer | fastest ms per layer "
           "| fastest vs fp32 | roofline_dram_fastest |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in kinds_in(points):
        for (k, d, n, t) in sorted(key for key in points if key[0] == kind):
            run, ref = points[(k, d, n, t)], points.get(("static_fp32", d, n, t))
            rel = (run["fastest_layer_ms"] / ref["fastest_layer_ms"]
                   if ref and "fastest_layer_ms" in run else None)
            out.append(f"| {kind} | {d} | {n} | {t} | {fmt(run.get('layers'), 0)} "
                       f"| {fmt(run.get('layer_ms'))} | {fmt(run.get('fastest_layer_ms'))} "
                       f"| {fmt(rel)} | {fmt(run.get('roofline_dram_fastest'))} |")
    return "\n".join(out)


def plot_decode(points, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot_bench.py: matplotlib is not installed (apt-get install python3-matplotlib); "
              f"no {png}", file=sys.stderr)
        return False
    dims = sorted({k[1] for k in points}, reverse=True)
    threads = sorted({k[3] for k in points})
    fig, axes = plt.subplots(len(dims), len(threads), figsize=(7 * len(threads), 5 * len(dims)),
                             squeeze=False, sharey=True)
    for (row, d), (col, t) in ((r, c) for r in enumerate(dims) for c in enumerate(threads)):
        ax = axes[row][col]
        for kind in kinds_in(points):
            ns = sorted(k[2] for k in points if k[0] == kind and k[1] == d and k[3] == t)
            if ns:
                ax.plot(ns, [gbps(points[(kind, d, n, t)]) for n in ns], marker="o", label=kind)
        ns = sorted(k[2] for k in points if k[0] == "static_fp32" and k[1] == d and k[3] == t)
        if ns:
            ax.plot(ns, [points[("static_fp32", d, n, t)]["read_GBps"] for n in ns], "k--",
                    marker="_", markersize=16, linewidth=2, label="read bandwidth (fp32-cache bytes)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n_kv (tokens held)")
        ax.set_ylabel("K/V GB/s read per decode step")
        ax.set_title(f"decode, Hq 32 / Hkv 8, head_dim {d}, {t} thread{'s' if t > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot_bench.py: wrote {png}", file=sys.stderr)
    return True


def prefill_table(runs):
    out = ["\n### prefill (512 queries x 512 keys, causal, Hq 32, Hkv 8, D 128)\n",
           "| benchmark | ms | GFLOP/s (dense-equivalent) | GEMM GFLOP/s | gemm_ratio |",
           "|---|---:|---:|---:|---:|"]
    for name in sorted(runs):
        if name.startswith("prefill/"):
            r = runs[name]
            out.append(f"| {name} | {fmt(to_ms(r))} | {fmt(r.get('GFLOPS'))} "
                       f"| {fmt(r.get('gemm_GFLOPS'))} | {fmt(r.get('gemm_ratio'), 3)} |")
    return "\n".join(out)


def append_table(runs):
    out = ["\n### append (65536 tokens one at a time, Hkv 8, D 128, fp32)\n",
           "| kind | first half ns/token | second half ns/token | second_half_ratio (<= 1.3) |",
           "|---|---:|---:|---:|"]
    for name in sorted(runs):
        if name.startswith("append/"):
            r = runs[name]
            out.append(f"| {name.split('/')[1]} | {fmt(r.get('first_half_ns'), 0)} "
                       f"| {fmt(r.get('second_half_ns'), 0)} "
                       f"| {fmt(r.get('second_half_ratio'), 3)} |")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("decode", help="bench_decode JSON output")
    parser.add_argument("--png", default=None, help="output PNG (default: DECODE with .png)")
    parser.add_argument("--prefill", default=None, help="bench_prefill JSON output")
    parser.add_argument("--append", default=None, help="bench_append JSON output")
    args = parser.parse_args()

    runs, context = load_runs(args.decode)
    points = decode_points(runs)
    if not points:
        sys.exit(f"plot_bench.py: no decode/... benchmarks in {args.decode}")
    print(f"# kvcache benchmarks ({context.get('date', '?')}, "
          f"{context.get('num_cpus', '?')} CPUs, load {context.get('load_avg', '?')})")
    print(decode_table(points))
    print(layers_table(decode_points(runs, LAYERS_NAME)))
    if args.prefill:
        print(prefill_table(load_runs(args.prefill)[0]))
    if args.append:
        print(append_table(load_runs(args.append)[0]))
    png = args.png or re.sub(r"\.json$", "", args.decode) + ".png"
    plot_decode(points, png)


if __name__ == "__main__":
    main()
