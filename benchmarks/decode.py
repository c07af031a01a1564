"""Decode and prefill throughput at 8k context: Hymba-1.5B against the Llama-3.2-3B shape (same code, random
weights, bf16 parameters and compute), decode at the largest batch that fits, with the decode roofline, the
batch-1 latency per token and a profile of the decode loop grouped by kernel kind.

    PYTHONPATH=. python benchmarks/decode.py [--context 8192] [--profile DIR] [--json out.json]

Decode: the cache is filled to `context` positions (contents do not change the work), then `decode_loop`
generates `--steps` tokens per row (greedy); timed on a second call after the compiling one. Two rooflines of
one step at the copy bandwidth measured in the same run: `roofline` (the issue's definition: the weights once
plus every cache byte once) and `needed` (the bytes the step must move: the weights, each layer's read of
the K/V buffer it attends (a KV consumer reads its producer's buffer again), the SSM state and conv inputs
read and written). Fractions are measured / roofline tokens/s.

Batch: the largest that fits, found by bisection on compiled memory. Each probe compiles `decode_loop`
for abstract arguments (nothing allocated; GPU autotuning off, for speed) and reads `memory_analysis()`:
arguments + temporaries + outputs - aliased outputs, against the device's limit less what is in use (the
weights are both) less `--margin_gib`. The first two probes give the bytes per row and a guess; the
bracket [fits, does not fit] is then narrowed to adjacent batches. The chosen batch is compiled again with
autotuning, before the cache is allocated, and its own need is reported; should it still run out of memory,
the batch is cut by 3% and says so. The batch-1 and prefill programs compile on a second thread meanwhile.
`--batch hymba_1p5b=1152` skips the search. The meta tokens' state only fills the cache: zeros of its shape.

Prefill: the chunk step of `prefill` over `context`-token prompts at `--prefill_batch` rows, timed over all
chunks after the first. `--check_kernel` first checks the decode-attention kernel against the XLA reference
on the device; `--hlo DIR` writes each compiled decode loop (gzipped text), to map profile kernels to ops.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import argparse
import concurrent.futures
import gzip
import json
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hardware import copy_bandwidth
from hymba_jax.config import hymba_1p5b, hymba_tiny, llama_3p2_3b_shape, llama_style
from hymba_jax.infer.cache import cache_bytes, init_cache, kv_capacity, meta_state, tree_bytes
from hymba_jax.infer.engine import _prefill_chunk, decode_loop
from hymba_jax.infer.sampling import Sampling
from hymba_jax.model.lm import param_shapes
from profile_summary import print_summary, summarize

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


def memory_limit() -> tuple[int, int]:
    """(bytes the allocator may hand out, bytes in use now); the CPU (a dry run) reports none: 2 GiB."""
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return 2 << 30, 0
    return stats["bytes_limit"], stats["bytes_in_use"]


def needed_step_bytes(config, max_len: int, batch: int, weights: int) -> int:
    """Bytes one decode step must move: the weights once, every layer's read of the K/V buffer it attends
    (consumers read their producer's), the SSM state and conv inputs read and written."""
    item = jnp.dtype(config.dtype).itemsize
    total = weights
    if config.has_attention:
        per_slot = batch * config.num_kv_heads * (config.qk_head_dim + config.v_head_dim) * item
        total += sum((config.num_meta_tokens + kv_capacity(config, config.kv_producer(i), max_len)) * per_slot
                     for i in range(config.num_layers))
    if config.has_ssm:
        state = batch * config.d_inner * config.d_state * 4 + batch * (config.d_conv - 1) * config.d_inner * item
        total += 2 * config.num_layers * state
    return total


class DecodeProgram:
    """`decode_loop` for one model at one batch size: abstract arguments, compile, memory, real arguments."""

    def __init__(self, config, params, meta, context: int, steps: int):
        self.config, self.params, self.meta = config, params, meta
        self.context, self.steps, self.max_len = context, steps, context + 2 * steps
        self.sampling, self.stop = Sampling().arrays(), jnp.full((8,), -1, jnp.int32)

    def _args(self, batch: int, abstract: bool):
        cfg = self.config
        make_cache = lambda meta: init_cache(cfg, meta, batch, self.max_len)._replace(
            lengths=jnp.full((batch,), self.context, jnp.int32))
        make_keys = lambda: jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32))
        if abstract:
            return (jax.eval_shape(make_cache, self.meta), jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32),
                    jax.eval_shape(make_keys))
        return make_cache(self.meta), jnp.zeros((batch, cfg.vocab_size), jnp.float32), make_keys()

    def lower(self, batch: int):
        cache, logits, keys = self._args(batch, abstract=True)
        return decode_loop.lower(self.config, self.params, cache, logits, keys, self.stop, self.sampling,
                                 jnp.int32(self.steps), max_out=self.steps)

    def compile(self, batch: int, probe: bool):
        options = {"xla_gpu_autotune_level": 0} if probe and jax.default_backend() == "gpu" else None
        lowered = self.lower(batch)
        return lowered.compile(compiler_options=options) if options else lowered.compile()

    @staticmethod
    def need(compiled) -> int:
        """Device bytes the executable needs at once (its arguments included)."""
        m = compiled.memory_analysis()
        return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                - m.alias_size_in_bytes)

    def run(self, compiled, batch: int) -> tuple[float, Callable[[], None]]:
        """Seconds of one timed call (after one warm-up call), and a function that runs one more call."""
        cache, logits, keys = self._args(batch, abstract=False)
        jax.block_until_ready((cache, logits, keys))
        state = {"cache": cache}

        def call():
            out, count, state["cache"] = compiled(self.params, state["cache"], logits, keys, self.stop,
                                                  self.sampling, jnp.int32(self.steps))
            out.block_until_ready()
            return count
        call()
        start = time.perf_counter()
        count = call()
        seconds = time.perf_counter() - start
        assert int(count.min()) == self.steps
        return seconds, call


def largest_batch(need: Callable[[int], int], available: int, start: int = 64) -> tuple[int, dict[int, int]]:
    """The largest batch b with need(b) <= available (need grows with b), by bisection, and every probe's
    need. need(start) and need(2 * start) give the bytes per row and a guess (memory is close to linear in
    the batch); the guess and the batch after it usually bracket the answer already, and bisection narrows
    [largest that fits, smallest that does not] to adjacent batches. Pairs of probes compile on two
    threads."""
    seen: dict[int, int] = {}

    def probe(*batches: int) -> None:
        new = [b for b in dict.fromkeys(batches) if b not in seen]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for b, n in zip(new, pool.map(need, new)):
                seen[b] = n
                log(f"  probe batch {b}: needs {n / 2 ** 30:.2f} GiB of {available / 2 ** 30:.2f}")

    def bracket() -> tuple[int, Optional[int]]:
        return (max((b for b, n in seen.items() if n <= available), default=0),
                min((b for b, n in seen.items() if n > available), default=None))

    probe(start, 2 * start)
    if seen[start] <= available:
        per_row = max(seen[2 * start] - seen[start], 1) / start
        guess = start + int((available - seen[start]) // per_row)
        lo, hi = bracket()
        probe(*[b for b in (guess, guess + 1) if lo < b and (hi is None or b < hi)])
    lo, hi = bracket()
    while hi is None:
        probe(2 * lo)
        lo, hi = bracket()
    while hi - lo > 1:
        probe((lo + hi) // 2)
        lo, hi = bracket()
    if lo == 0:
        raise SystemExit(f"not even batch 1 fits in {available / 2 ** 30:.2f} GiB")
    return lo, seen


def profile_decode(call: Callable[[], None], steps: int, directory: str) -> dict:
    """One decode_loop call (`steps` steps) under jax.profiler, its GPU kernels grouped by kind."""
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        call()
    summary = summarize(directory, steps)
    print_summary(summary)
    return summary


def bench_decode(program: DecodeProgram, bw: float, batch: Optional[int], available: int,
                 profile_dir: Optional[str], hlo_path: Optional[str], before_alloc: Callable[[], None]) -> dict:
    """Decode at `batch` (None: the largest that fits in `available` bytes). before_alloc() runs after the
    last compilation, before the cache is allocated."""
    config, steps = program.config, program.steps
    weights = tree_bytes(program.params)
    probes: dict[int, int] = {}
    if batch is None:
        start = time.perf_counter()
        batch, probes = largest_batch(lambda b: program.need(program.compile(b, probe=True)), available)
        log(f"decode: largest batch {batch} ({len(probes)} probes, {time.perf_counter() - start:.1f} s)")
    start = time.perf_counter()
    compiled = program.compile(batch, probe=False)
    need = program.need(compiled)
    log(f"decode batch {batch}: compiled in {time.perf_counter() - start:.1f} s; needs {need / 2 ** 30:.2f} GiB, "
        f"available {available / 2 ** 30:.2f} GiB")
    if hlo_path:
        with gzip.open(hlo_path, "wt") as f:
            f.write(compiled.as_text())
    before_alloc()
    try:
        seconds, call = program.run(compiled, batch)
    except jax.errors.JaxRuntimeError as e:    # fragmentation or workspaces past the margin
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        seconds = None
    if seconds is None:                        # outside the handler: its traceback held the failed cache
        batch = batch * 97 // 100
        log(f"decode: out of memory at run time; batch {batch}")
        compiled = program.compile(batch, probe=False)
        need = program.need(compiled)
        seconds, call = program.run(compiled, batch)
    step_bytes = weights + cache_bytes(config, program.max_len, batch)
    needed = needed_step_bytes(config, program.max_len, batch, weights)
    tokens_per_s = batch * steps / seconds
    result = dict(batch=batch, step_ms=1e3 * seconds / steps, tokens_per_s=tokens_per_s,
                  bytes_per_step=step_bytes, roofline_tokens_per_s=batch * bw / step_bytes,
                  roofline_fraction=tokens_per_s * step_bytes / (batch * bw), needed_bytes_per_step=needed,
                  needed_fraction=tokens_per_s * needed / (batch * bw), need_bytes=need, available_bytes=available,
                  probes={str(b): n for b, n in sorted(probes.items())})
    log(f"decode batch {batch}: {result['step_ms']:.2f} ms/step, {tokens_per_s:.0f} tokens/s, roofline fraction "
        f"{result['roofline_fraction']:.2f}, of needed bytes {result['needed_fraction']:.2f}")
    if profile_dir:
        result["profile"] = profile_decode(call, steps, profile_dir)
    del call
    return result


def bench_latency(program: DecodeProgram, compiled) -> dict:
    """Batch 1: milliseconds per generated token at the program's context."""
    seconds, _ = program.run(compiled, 1)
    log(f"batch 1: {1e3 * seconds / program.steps:.2f} ms/token")
    return dict(ms_per_token=1e3 * seconds / program.steps)


def _prefill_args(config, meta, batch: int, context: int, chunk: int, abstract: bool):
    def make_cache(meta):
        cache = init_cache(config, meta, batch, context)
        # Pending K/V of a whole chunk (none real): the shape of every chunk step after the first.
        return cache._replace(pending=jax.tree.map(lambda x: jnp.zeros((batch, chunk) + x.shape[2:], x.dtype),
                                                   cache.pending))
    make_last = lambda: jnp.zeros((batch, config.hidden_size), jnp.dtype(config.dtype))
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (batch, chunk), dtype=np.int32)
    num = np.full((batch,), chunk, np.int32)
    if abstract:
        return jax.eval_shape(make_cache, meta), tokens, num, jax.eval_shape(make_last)
    return make_cache(meta), tokens, num, make_last()


def lower_prefill(config, params, meta, batch: int, context: int, chunk: int):
    return _prefill_chunk.lower(config, params, *_prefill_args(config, meta, batch, context, chunk, True))


def bench_prefill(config, params, meta, compiled, batch: int, context: int, chunk: int) -> dict:
    cache, tokens, num, last = _prefill_args(config, meta, batch, context, chunk, False)
    jax.block_until_ready((cache, last))
    cache, last = compiled(params, cache, tokens, num, last)
    last.block_until_ready()
    start = time.perf_counter()
    for _ in range(context // chunk - 1):
        cache, last = compiled(params, cache, tokens, num, last)
    last.block_until_ready()
    seconds = time.perf_counter() - start
    result = dict(batch=batch, chunk=chunk, tokens_per_s=batch * (context - chunk) / seconds)
    log(f"prefill batch {batch}: {result['tokens_per_s']:.0f} tokens/s")
    return result


def check_decode_kernel() -> float:
    """The decode-attention kernel against the XLA reference on the device, at the cache shapes timed here
    (bf16 inputs, fp32 reference, random slots hidden). Returns the largest relative error."""
    from hymba_jax.model.attention import KV, decode_attention, dot_product_attention
    worst = 0.0
    shapes = {"hymba global": (4, 5, 5, 8384, 64, 128), "hymba window": (4, 5, 5, 1152, 64, 128),
              "llama": (2, 8, 3, 8256, 128, 128)}
    for name, (batch, kv_heads, groups, slots, qk_dim, v_dim) in shapes.items():
        ks = jax.random.split(jax.random.key(slots), 6)
        draw = lambda key, *shape: jax.random.normal(key, shape, jnp.bfloat16)
        q, k, v = draw(ks[0], batch, 1, kv_heads * groups, qk_dim), draw(ks[1], batch, 1, kv_heads, qk_dim), \
            draw(ks[2], batch, 1, kv_heads, v_dim)
        prefix = KV(jnp.swapaxes(draw(ks[3], batch, kv_heads, slots, qk_dim), 1, 2),
                    jnp.swapaxes(draw(ks[4], batch, kv_heads, slots, v_dim), 1, 2))
        mask = jnp.concatenate([jax.random.bernoulli(ks[5], 0.7, (batch, 1, slots)), jnp.ones((batch, 1, 1), bool)], -1)
        got = jax.jit(decode_attention)(q, k, v, mask, prefix).astype(jnp.float32)
        up = lambda t: t.astype(jnp.float32)
        want = jax.jit(dot_product_attention)(up(q), up(k), up(v), mask, KV(up(prefix.k), up(prefix.v)))
        err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        log(f"decode kernel, {name}: relative error {err:.1e}")
        worst = max(worst, err)
    return worst


PRESETS = {"hymba_1p5b": hymba_1p5b, "llama_3p2_3b": llama_3p2_3b_shape,   # tiny ones: CPU dry runs
           "hymba_tiny": lambda **kw: hymba_tiny(max_position_embeddings=4096, **kw),
           "llama_tiny": lambda **kw: llama_style(64, 2, 4, 2, 96, **kw)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk")
    p.add_argument("--prefill_batch", type=int, default=16)
    p.add_argument("--models", default="hymba_1p5b,llama_3p2_3b")
    p.add_argument("--batch", default="", help="name=batch,...: decode at this batch instead of the largest")
    p.add_argument("--margin_gib", type=float, default=0.5, help="device memory kept free beside the program")
    p.add_argument("--skip", default="", help="comma list of parts to skip: latency,prefill")
    p.add_argument("--profile", default=None, help="profile one decode call per model under this directory")
    p.add_argument("--hlo", default=None, help="write each model's compiled decode loop (gzipped text) here")
    p.add_argument("--check_kernel", action="store_true",
                   help="first check the decode-attention kernel against the XLA reference; stop if off by > 2e-2")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    log(f"devices {jax.devices()}, jax {jax.__version__}")
    if args.check_kernel and check_decode_kernel() > 2e-2:
        raise SystemExit("the decode-attention kernel disagrees with the XLA reference")
    bw = copy_bandwidth()
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    names = args.models.split(",")
    unknown = sorted(set(names) - set(PRESETS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(PRESETS)}")
    batches = {k: int(v) for k, v in (item.split("=") for item in args.batch.split(",") if item)}
    skip = set(filter(None, args.skip.split(",")))
    results = {"copy_bandwidth": bw, "context": args.context, "device": str(jax.devices()[0].device_kind),
               "jax": jax.__version__}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    for name in names:
        config = PRESETS[name](dtype="bfloat16", param_dtype="bfloat16")
        params = random_params(config)
        # The meta tokens' state only fills the cache: zeros of its shape do the same work, uncompiled.
        meta = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(meta_state, config, params))
        log(f"{name}: weights {tree_bytes(params) / 1e9:.2f} GB, cache at {args.context}: "
            f"{cache_bytes(config, args.context) / MB:.1f} MB")
        r = results[name] = dict(weights_bytes=tree_bytes(params), cache_mb=cache_bytes(config, args.context) / MB)
        program = DecodeProgram(config, params, meta, args.context, args.steps)
        limit, in_use = memory_limit()
        available = limit - in_use + tree_bytes(params) - int(args.margin_gib * 2 ** 30)  # weights: an argument
        # The batch-1 and prefill programs compile on a second thread while the batch search runs.
        pool = concurrent.futures.ThreadPoolExecutor(1)
        side = {}
        if "latency" not in skip:
            side["latency"] = pool.submit(program.lower(1).compile)
        if "prefill" not in skip:
            side["prefill"] = pool.submit(lower_prefill(config, params, meta, args.prefill_batch, args.context,
                                                        args.chunk).compile)
        profile_dir = os.path.join(args.profile, name) if args.profile else None
        hlo_path = os.path.join(args.hlo, f"{name}_decode.hlo.txt.gz") if args.hlo else None
        r["decode"] = bench_decode(program, bw, batches.get(name), available, profile_dir, hlo_path,
                                   before_alloc=lambda: concurrent.futures.wait(side.values()))
        save()
        if "latency" in side:
            r["batch1"] = bench_latency(program, side["latency"].result())
            save()
        if "prefill" in side:
            r["prefill"] = bench_prefill(config, params, meta, side["prefill"].result(), args.prefill_batch,
                                         args.context, args.chunk)
            save()
        pool.shutdown()
    h, l = results.get("hymba_1p5b"), results.get("llama_3p2_3b")
    print(f"| model | cache MB at {args.context} | batch | ms/step | decode tokens/s | roofline tokens/s | fraction "
          "| fraction of needed bytes | batch-1 ms/token | prefill tokens/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        r = results[name]
        d, pf, b1 = r["decode"], r.get("prefill", {}), r.get("batch1", {})
        if "decode" not in r:
            continue
        print(f"| {name} | {r['cache_mb']:.1f} | {d['batch']} | {d['step_ms']:.2f} | {d['tokens_per_s']:.0f} | "
              f"{d['roofline_tokens_per_s']:.0f} | {d['roofline_fraction']:.2f} | {d['needed_fraction']:.2f} | "
              f"{b1.get('ms_per_token', float('nan')):.2f} | {pf.get('tokens_per_s', 0):.0f} (batch {pf.get('batch')}) |")
    if h and l:
        print(f"Hymba / Llama: decode {h['decode']['tokens_per_s'] / l['decode']['tokens_per_s']:.2f}x, "
              f"cache {l['cache_mb'] / h['cache_mb']:.1f}x smaller")
    log("done")


if __name__ == "__main__":
    main()
