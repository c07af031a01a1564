"""Where a profiled step's GPU time goes: the kernels of a `jax.profiler.trace(..., create_perfetto_trace=True)`
trace grouped by kind (matmuls, attention, the scan kernels, XLA fusions, copies, collectives).

    python benchmarks/profile_summary.py PROFILE_DIR [--steps 2]

Only kernel events on the GPU streams are counted (the trace's 'XLA Ops' and 'XLA Modules' rows repeat
them), so the per-step total is the busy time of the GPU; what is left of the step's wall time is idle.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# First match wins; matched against the kernel name in lower case.
CATEGORIES = (
    ("scan (pallas_gpu)", r"selective_scan"),
    ("decode attention (pallas)", r"cache_attention"),
    ("attention", r"cudnn|fmha|flash|sdpa|_attn"),       # cuDNN, and the Pallas flash kernels (hymba_flash_*)
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|matmul|dot|sm90_"),
    ("collective", r"nccl|all_reduce|all_gather|reduce_scatter|all-reduce|all-gather|reduce-scatter"),
    ("copy / transpose", r"copy|transpose|memcpy|memset|dynamic.update.slice|concatenate"),
    ("reduction fusion", r"reduce|input_"),
    ("elementwise fusion", r"fusion|loop_|wrapped_|convert|add|multiply"),
)


def category(name: str) -> str:
    lower = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, lower):
            return label
    return "other"


def load_kernels(profile_dir: str) -> list[tuple[str, float, str, float]]:
    """(kernel name, duration in microseconds, the HLO op that launched it or '', start in microseconds) of every
    GPU kernel in the newest trace under profile_dir."""
    paths = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise SystemExit(f"no perfetto_trace.json.gz under {profile_dir}: trace with create_perfetto_trace=True")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {pid for pid, name in processes.items() if "GPU" in name or "gpu" in name}
    streams = {key for key, name in threads.items() if key[0] in gpu and name.lower().startswith("stream")}
    return [(e["name"], float(e["dur"]), e.get("args", {}).get("hlo_op", ""), float(e["ts"])) for e in events
            if e.get("ph") == "X" and (e["pid"], e["tid"]) in streams]


def summarize(profile_dir: str, steps: int) -> dict:
    """Per-step GPU time (ms) by category, the 15 most expensive kernels, and the 15 most expensive HLO ops
    (to find a kernel's op in the compiled module, e.g. from XLA_FLAGS=--xla_dump_to); span_ms: per step, from
    the first kernel's start to the last one's end, so span - busy is the GPU's idle time between kernels
    of back-to-back steps."""
    kernels = load_kernels(profile_dir)
    by_category: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for name, dur, op, _ in kernels:
        by_category[category(name)] += dur
        by_name[name] += dur
        if op:
            by_op[f"{op} ({name[:40]})"] += dur
    per_step = lambda us: us / 1e3 / steps
    return dict(
        kernels_per_step=len(kernels) / steps,
        busy_ms=per_step(sum(by_category.values())),
        span_ms=per_step(max((ts + dur for _, dur, _, ts in kernels), default=0.0)
                         - min((ts for *_, ts in kernels), default=0.0)),
        categories_ms={k: per_step(v) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        top_kernels_ms=[(k[:90], per_step(v)) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]],
        top_ops_ms=[(k[:90], per_step(v)) for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]],
    )


def print_summary(summary: dict, step_ms: float | None = None) -> None:
    busy = summary["busy_ms"]
    head = f"GPU busy {busy:.1f} ms per step, {summary['kernels_per_step']:.0f} kernels"
    print(head + (f", step {step_ms:.1f} ms ({100 * busy / step_ms:.0f}% busy)" if step_ms else ""))
    if not summary["kernels_per_step"]:
        print("  (no GPU kernels in the trace)")
    for label, ms in summary["categories_ms"].items():
        print(f"  {label:22s} {ms:9.2f} ms  {100 * ms / max(busy, 1e-9):5.1f}%")
    print("  top kernels:")
    for name, ms in summary["top_kernels_ms"]:
        print(f"    {ms:9.2f} ms  {name}")
    if summary.get("top_ops_ms"):
        print("  top HLO ops (kernel):")
        for name, ms in summary["top_ops_ms"]:
            print(f"    {ms:9.2f} ms  {name}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile_dir")
    parser.add_argument("--steps", type=int, default=1, help="steps inside the traced region")
    args = parser.parse_args()
    print_summary(summarize(args.profile_dir, args.steps))


if __name__ == "__main__":
    main()
