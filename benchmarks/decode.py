"""Decode and prefill throughput at 8k context: Hymba-1.5B against the Llama-3.2-3B shape (same code, random
weights, bf16 parameters and compute), each at the largest batch that fits, with the decode roofline.

    PYTHONPATH=. python benchmarks/decode.py [--context 8192] [--json out.json]

Decode: the cache is filled to `context` positions (contents do not change the work), then `decode_loop`
generates `--steps` tokens per row (greedy); timed on a second call after the compiling one. The roofline
of one step reads the weights once and the whole cache (every buffer slot is read, as the implementation
does) at the copy bandwidth measured in the same run; the fraction is measured / roofline tokens/s.
Prefill: the chunk step of `prefill` over `context`-token prompts, timed over all chunks after the first. The batch is the first of a descending list, starting from an estimate of the free memory, whose
compiled memory fits and which runs without running out of memory.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from hardware import copy_bandwidth
from hymba_jax.config import hymba_1p5b, hymba_tiny, llama_3p2_3b_shape, llama_style
from hymba_jax.infer.cache import cache_bytes, init_cache, meta_state, tree_bytes
from hymba_jax.infer.engine import _prefill_chunk, decode_loop
from hymba_jax.infer.sampling import Sampling
from hymba_jax.model.lm import param_shapes

MB = 1.024e6
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def random_params(config, seed: int = 0):
    """Pseudo-random weights (uniform, std 0.02, from a sine hash: a threefry draw per tensor takes
    minutes to compile) made on the device in one small program."""
    shapes = param_shapes(config)

    def make():
        leaves, tree = jax.tree.flatten(shapes)
        out = []
        for i, s in enumerate(leaves):
            index = jax.lax.broadcasted_iota(jnp.float32, s.shape, len(s.shape) - 1) + 1.618 * (
                jax.lax.broadcasted_iota(jnp.float32, s.shape, 0) if len(s.shape) > 1 else 0)
            u = jnp.mod(jnp.sin(index * 12.9898 + 78.233 * (i + seed)) * 43758.5453, 1.0)
            out.append((0.02 * 3 ** 0.5 * (2 * u - 1)).astype(s.dtype))
        return jax.tree.unflatten(tree, out)
    return jax.jit(make)()


def free_bytes() -> int:
    stats = jax.devices()[0].memory_stats()
    if not stats:   # the CPU (a dry run of this script) reports none
        return 2 << 30
    return stats["bytes_limit"] - stats["bytes_in_use"]


def candidates(estimate: int, multiple: int = 8) -> list[int]:
    out = []
    for f in (1.0, 0.85, 0.7, 0.5, 0.25):
        b = max(multiple, int(estimate * f) // multiple * multiple)
        if b not in out:
            out.append(b)
    return out


def is_oom(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def _decode_once(config, params, meta, batch: int, context: int, steps: int, bw: float) -> dict | None:
    """One batch size; its buffers die with this frame (also when it raises), before the next is tried."""
    max_len = context + 2 * steps
    sampling, stop = Sampling().arrays(), jnp.full((8,), -1, jnp.int32)
    cache = init_cache(config, meta, batch, max_len)
    cache = cache._replace(lengths=jnp.full((batch,), context, jnp.int32))
    logits = jnp.zeros((batch, config.vocab_size), jnp.float32)
    keys = jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
    jax.block_until_ready((cache, logits, keys))
    compiled = decode_loop.lower(config, params, cache, logits, keys, stop, sampling, jnp.int32(steps),
                                 max_out=steps).compile()
    mem = compiled.memory_analysis()
    need = mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    log(f"decode batch {batch}: compiled; temp {mem.temp_size_in_bytes / 1e9:.2f} GB, "
        f"extra output {need / 1e9:.2f} GB, free {free_bytes() / 1e9:.1f} GB")
    if need > free_bytes():
        return None
    out, count, cache = compiled(params, cache, logits, keys, stop, sampling, jnp.int32(steps))
    out.block_until_ready()
    start = time.perf_counter()
    out, count, cache = compiled(params, cache, logits, keys, stop, sampling, jnp.int32(steps))
    out.block_until_ready()
    seconds = time.perf_counter() - start
    assert int(count.min()) == steps
    step_bytes = tree_bytes(params) + cache_bytes(config, max_len, batch)
    tokens_per_s = batch * steps / seconds
    roofline = batch / (step_bytes / bw)
    return dict(batch=batch, step_ms=1e3 * seconds / steps, tokens_per_s=tokens_per_s, bytes_per_step=step_bytes,
                roofline_tokens_per_s=roofline, roofline_fraction=tokens_per_s / roofline,
                temp_bytes=mem.temp_size_in_bytes)


def largest_batch(name: str, batches, run) -> dict:
    """The result of `run(batch)` for the first of `batches` (descending) that fits in memory, or {}."""
    for batch in batches:
        try:
            result = run(batch)
        except Exception as e:  # noqa: BLE001 - out of memory shows up as several error types
            if not is_oom(e):
                raise
            result = None
        if result:
            log(f"{name} batch {batch}: {result}")
            return result
        log(f"{name} batch {batch}: does not fit, next")
    return {}


def bench_decode(config, params, meta, context: int, steps: int, bw: float) -> dict:
    per_seq = cache_bytes(config, context + 2 * steps)
    estimate = int(0.93 * free_bytes() / (per_seq + 4e6))
    log(f"decode: cache {per_seq / MB:.1f} MB per sequence, batch estimate {estimate}")
    return largest_batch("decode", candidates(estimate),
                         lambda batch: _decode_once(config, params, meta, batch, context, steps, bw))


def _prefill_once(config, params, meta, batch: int, context: int, chunk: int) -> dict | None:
    cache = init_cache(config, meta, batch, context)
    # Pending K/V of a whole chunk (none real): the shape of every chunk step after the first.
    cache = cache._replace(pending=jax.tree.map(lambda x: jnp.zeros((batch, chunk) + x.shape[2:], x.dtype),
                                                cache.pending))
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (batch, chunk), dtype=np.int32)
    num = np.full((batch,), chunk, np.int32)
    last = jnp.zeros((batch, config.hidden_size), jnp.dtype(config.dtype))
    jax.block_until_ready((cache, last))
    start = time.perf_counter()
    compiled = _prefill_chunk.lower(config, params, cache, tokens, num, last).compile()
    mem = compiled.memory_analysis()
    log(f"prefill batch {batch}: compiled in {time.perf_counter() - start:.1f} s; temp "
        f"{mem.temp_size_in_bytes / 1e9:.2f} GB, free {free_bytes() / 1e9:.1f} GB")
    if mem.temp_size_in_bytes > free_bytes():
        return None
    cache, last = compiled(params, cache, tokens, num, last)
    last.block_until_ready()
    start = time.perf_counter()
    for _ in range(context // chunk - 1):
        cache, last = compiled(params, cache, tokens, num, last)
    last.block_until_ready()
    seconds = time.perf_counter() - start
    return dict(batch=batch, chunk=chunk, tokens_per_s=batch * (context - chunk) / seconds)


def bench_prefill(config, params, meta, context: int, chunk: int) -> dict:
    per_seq = cache_bytes(config, context)
    # Transients of one chunk: fp32 attention logits and probabilities over the whole buffer and the scan's
    # fp32 (chunk, d_inner, d_state) terms (a few of them).
    act = 2 * 4 * config.num_heads * chunk * (config.num_meta_tokens + context + chunk)
    if config.has_ssm:
        act += 6 * 4 * chunk * config.d_inner * config.d_state
    estimate = int(0.9 * free_bytes() / (per_seq + 1.5 * act))
    log(f"prefill: cache {per_seq / MB:.1f} MB + ~{act / 1e9:.2f} GB transient per sequence, estimate {estimate}")
    return largest_batch("prefill", candidates(min(estimate, 256)),
                         lambda batch: _prefill_once(config, params, meta, batch, context, chunk))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--models", default="hymba_1p5b,llama_3p2_3b")
    p.add_argument("--skip_prefill", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    log(f"devices {jax.devices()}, jax {jax.__version__}")
    bw = copy_bandwidth()
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    presets = {"hymba_1p5b": hymba_1p5b, "llama_3p2_3b": llama_3p2_3b_shape,   # tiny ones: CPU dry runs
               "hymba_tiny": hymba_tiny, "llama_tiny": lambda **kw: llama_style(64, 2, 4, 2, 96, **kw)}
    results = {"copy_bandwidth": bw, "context": args.context, "device": str(jax.devices()[0].device_kind),
               "jax": jax.__version__}
    unknown = sorted(set(args.models.split(",")) - set(presets))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(presets)}")
    models = {}
    for name in args.models.split(","):   # decode for every model first: it is the table's main column
        config = presets[name](dtype="bfloat16", param_dtype="bfloat16")
        params = random_params(config)
        meta = meta_state(config, params)
        models[name] = (config, params, meta)
        log(f"{name}: weights {tree_bytes(params) / 1e9:.2f} GB, cache at {args.context}: "
            f"{cache_bytes(config, args.context) / MB:.1f} MB")
        results[name] = dict(weights_bytes=tree_bytes(params), cache_mb=cache_bytes(config, args.context) / MB,
                             decode=bench_decode(config, params, meta, args.context, args.steps, bw))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    for name, (config, params, meta) in models.items() if not args.skip_prefill else ():
        results[name]["prefill"] = bench_prefill(config, params, meta, args.context, args.chunk)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    h, l = results.get("hymba_1p5b"), results.get("llama_3p2_3b")
    print("| model | cache MB at %d | batch | decode tokens/s | roofline tokens/s | fraction | prefill tokens/s |"
          % args.context)
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in (("Hymba-1.5B", h), ("Llama-3.2-3B shape", l)):
        if r:
            d, pf = r["decode"], r.get("prefill", {})
            print(f"| {name} | {r['cache_mb']:.1f} | {d.get('batch')} | {d.get('tokens_per_s', 0):.0f} | "
                  f"{d.get('roofline_tokens_per_s', 0):.0f} | {d.get('roofline_fraction', 0):.2f} | "
                  f"{pf.get('tokens_per_s', 0):.0f} (batch {pf.get('batch')}) |")
    if h and l and h["decode"] and l["decode"]:
        print(f"Hymba / Llama: decode {h['decode']['tokens_per_s'] / l['decode']['tokens_per_s']:.2f}x, "
              f"cache {l['cache_mb'] / h['cache_mb']:.1f}x smaller")
    log("done")


if __name__ == "__main__":
    main()
