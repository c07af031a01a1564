"""Attention backends on the Hymba-1.5B layer masks against the XLA reference: errors and time of
forward+backward per layer, bf16, 25 query heads over 5 KV heads (q/k head 64, v head 128), 128 meta
tokens always visible, global causal, window 1024, and window 1024 over packed documents.

    PYTHONPATH=. python benchmarks/attention.py --shapes 8x2048,4x4096      # on the H200 (device tool)

    # the pallas_flash variant sweep, one process, at most budget + 15 s:
    V=default,128:64:8:3/128:64:8:3/64:128:8:2,128:128:8:2/128:32:4:3/16:128:8:2
    PYTHONPATH=. python benchmarks/attention.py --shapes 8x2048,4x4096 --masks window,global --candidates cudnn \\
        --flash-variants $V --flash-parts --compile-threads 12 --budget 185

Candidates (`--candidates`): 'xla' (the reference), 'cudnn' (dense mask), 'cudnn_skip' (cuDNN's causal /
window masks, meta tokens in a second cuDNN call, merged through the log-sum-exp), 'pallas_flash' (our
Triton kernels, the meta tokens as prefix keys in them), and the variants of 'cudnn_skip': '_pad' (q/k heads
zero-padded to 128) and '_xlameta' (meta tokens in XLA), e.g. 'cudnn_skip_pad_xlameta'.
`--flash-variants` adds 'pallas_flash' with other kernel configurations (`FlashConfig.parse`:
'bq:bk:warps:stages' for all three kernels or 'forward/dq/dkv'; 'default' = DEFAULT_CONFIG);
`--flash-parts` also times each variant's text part alone (no meta tokens, no merge): its forward kernel
('fwd') and its backward kernels dq + dk/dv ('bwd'), from the same inputs.

Every candidate is compiled ahead of time in a pool of threads (`--compile-threads`); then, once all are
compiled or the compile deadline (`--budget` s from the start, less a reserve for timing) has passed, the
main thread times them in order. A candidate whose compile has not finished by then is reported as such,
and the process ends after the budget whatever is still compiling (a stack dump and exit at budget + 15 s
if the GPU hangs). Printed compile times are wall times of a compile running next to the others in the
pool (tracing holds Python's lock; XLA's compile does not).
Errors are relative Frobenius norms against the XLA reference in fp32 on the same bf16 inputs (the bf16
XLA reference's own error, printed in its row, is what the bf16 roundings of the computation cost). A
candidate that fails prints its error and the others go on.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import statistics
import sys
import threading
import time
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from hymba_jax.model.attention import KV, attend, dot_product_attention, text_mask
from hymba_jax.ops.attention import merged_attention, xla_prefix_part

M, H, KVH, DK, DV, WINDOW = 128, 25, 5, 64, 128, 1024
TIMING_RESERVE = 30.0    # seconds of the budget kept for timing after the last compile may finish,
TIMING_PER_JOB = 0.6     # or this many per job if more


def _flash_config(spec: str):
    from hymba_jax.ops.attention_flash_gpu import DEFAULT_CONFIG, FlashConfig
    return DEFAULT_CONFIG if spec == "default" else FlashConfig.parse(spec)


INTERPRET = False        # --interpret: the flash kernels in the Pallas interpreter (a smoke test on the CPU)


def _band(mask, length: int) -> jax.Array:
    """The run-time window of the `pallas_flash` kernels for `mask` (a global mask's is the text length)."""
    return jnp.asarray(length if mask.window is None else mask.window, jnp.int32)


def _variant(name):
    """fn(q, k, v, prefix, mask) for a candidate name ('pallas_flash@SPEC': a flash variant)."""
    if name in ("xla", "cudnn", "cudnn_skip", "pallas_flash"):
        return lambda q, k, v, prefix, mask: attend(q, k, v, mask, prefix, name)
    scale = DK ** -0.5
    if name.startswith("pallas_flash@"):
        from hymba_jax.ops.attention_flash_gpu import flash_attention
        spec = name.split("@", 1)[1]
        config = _flash_config(spec)
        return lambda q, k, v, prefix, mask: flash_attention(
            q, k, v, prefix, mask.segments, mask.window, scale=scale, config=config, interpret=INTERPRET)
    from hymba_jax.ops.attention_cudnn import cudnn_part
    unpadded = "_pad" not in name
    meta = xla_prefix_part(scale) if "_xlameta" in name else cudnn_part(
        window=None, causal=False, scale=scale, unpadded=unpadded)

    def fn(q, k, v, prefix, mask):
        text = cudnn_part(window=mask.window, causal=True, scale=scale, unpadded=unpadded)
        return merged_attention(text, meta, q, k, v, prefix, mask.segments)
    return fn


class Inputs(NamedTuple):
    q: jax.Array
    k: jax.Array
    v: jax.Array
    pre: KV
    w: jax.Array
    segments: jax.Array


def make_inputs(batch: int, length: int) -> Inputs:
    ks = jax.random.split(jax.random.key(0), 7)
    bf = jnp.bfloat16
    return Inputs(jax.random.normal(ks[0], (batch, length, H, DK), bf),
                  jax.random.normal(ks[1], (batch, length, KVH, DK), bf),
                  jax.random.normal(ks[2], (batch, length, KVH, DV), bf),
                  KV(jax.random.normal(ks[3], (1, M, KVH, DK), bf), jax.random.normal(ks[4], (1, M, KVH, DV), bf)),
                  jax.random.normal(ks[5], (batch, length, H, DV), jnp.float32),
                  jnp.cumsum(jax.random.uniform(ks[6], (batch, length)) < 1 / 700, axis=1))


MASKS = {"global": ("global", None, False), "window": (f"window {WINDOW}", WINDOW, False),
         "packed": (f"window {WINDOW}, packed", WINDOW, True)}


class Job(NamedTuple):
    """One function to time: `compile()` (in a worker thread) returns `run`, timed in the main thread;
    `check(run())` gives the errors of a layer job (None for a part job)."""
    title: str
    name: str
    compile: Callable[[], Callable[[], object]]
    check: Optional[Callable[[object], list]]


def _grads_fn(fn, mask, w):
    """((loss, output), gradients of q, k, v, meta k, meta v): the output as an auxiliary result, so one
    compiled function gives the timing and all six errors."""
    def loss(q_, k_, v_, pk, pv):
        out = fn(q_, k_, v_, KV(pk, pv), mask)
        return jnp.sum(out.astype(jnp.float32) * w), out
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)


def _rel(a, b):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def shape_jobs(batch, length, candidates, flash_variants, flash_parts, masks) -> list[Job]:
    """The jobs of one shape: per mask, the fp32 XLA reference's fwd+bwd (first: the others' errors are
    against its results), each candidate's fwd+bwd of the layer and, with `flash_parts`, each flash
    variant's text part forward and backward alone."""
    x = make_inputs(batch, length)
    x32 = Inputs(*(t.astype(jnp.float32) for t in (x.q, x.k, x.v)),
                 KV(x.pre.k.astype(jnp.float32), x.pre.v.astype(jnp.float32)), x.w, x.segments)
    ref_fn = lambda q_, k_, v_, p_, m_: dot_product_attention(q_, k_, v_, m_.dense, p_)
    jobs = []
    for title, window, packed in (MASKS[m] for m in masks):
        title = f"{batch}x{length} {title}"
        mask = text_mask(length, window=window, segments=x.segments if packed else None, num_prefix=M)
        exact = []                 # the fp32 reference's output and gradients, from the mask's first job

        def compile_reference(mask=mask, exact=exact):
            grad = jax.jit(_grads_fn(ref_fn, mask, x.w)).trace(x32.q, x32.k, x32.v, *x32.pre).lower().compile()

            def run():
                (_, out), grads = result = grad(x32.q, x32.k, x32.v, *x32.pre)
                exact[:] = [out, grads]
                return result
            return run

        def reference(exact=exact):
            if not exact:
                raise RuntimeError("no fp32 reference (its job failed)")
            return exact

        def layer(name, mask=mask, reference=reference):
            fn = _variant(name)

            def compile_():
                grad = jax.jit(_grads_fn(fn, mask, x.w)).trace(x.q, x.k, x.v, *x.pre).lower().compile()
                return lambda: grad(x.q, x.k, x.v, *x.pre)

            def check(result):
                ((_, out), grads), (ref_out, ref_grads) = result, reference()
                return [_rel(out, ref_out)] + [_rel(a, b) for a, b in zip(grads, ref_grads)]
            return Job(title, name, compile_, check)

        def part(spec, which, mask=mask):
            from hymba_jax.ops.attention_flash_gpu import flash_gpu_part
            text = flash_gpu_part(scale=DK ** -0.5, config=_flash_config(spec), interpret=INTERPRET)
            seg, band, dout = mask.segments, _band(mask, x.q.shape[1]), x.w.astype(x.q.dtype)

            def compile_():
                fwd = jax.jit(text.forward).trace(x.q, x.k, x.v, seg, band).lower().compile()
                if which == "fwd":
                    return lambda: fwd(x.q, x.k, x.v, seg, band)
                out, lse = jax.eval_shape(text.forward, x.q, x.k, x.v, seg, band)
                bwd = jax.jit(text.backward).trace(x.q, x.k, x.v, seg, band, out, lse, dout).lower().compile()
                saved = []                   # the forward's results, made on the first run (main thread)

                def run():
                    if not saved:
                        saved.extend(fwd(x.q, x.k, x.v, seg, band))
                    return bwd(x.q, x.k, x.v, seg, band, *saved, dout)
                return run
            return Job(title, f"pallas_flash@{spec} text {which}", compile_, None)

        jobs.append(Job(title, "xla fp32 (the reference)", compile_reference, None))
        for name in candidates:
            jobs.append(layer(name))
        for spec in flash_variants:
            jobs.append(layer(f"pallas_flash@{spec}"))
            if flash_parts:
                jobs += [part(spec, "fwd"), part(spec, "bwd")]
    return jobs


class Compiler:
    """Compiles jobs in daemon threads, at most `threads` at a time, in submission order; a compile that
    never ends costs only the wait up to the deadline."""

    def __init__(self, threads: int):
        self.slots = threading.Semaphore(threads)
        self.results = {}

    def submit(self, key, job: Job):
        done = threading.Event()
        self.results[key] = [done, None, None, None]      # event, compiled, error, seconds

        def work():
            with self.slots:
                start = time.perf_counter()
                try:
                    self.results[key][1] = job.compile()
                except Exception as e:  # noqa: BLE001 - reported with the job
                    self.results[key][2] = e
                self.results[key][3] = time.perf_counter() - start
                done.set()
        threading.Thread(target=work, daemon=True).start()

    def wait_all(self, deadline: float) -> None:
        for done, *_ in self.results.values():
            done.wait(max(0.0, deadline - time.monotonic()))

    def result(self, key):
        done, compiled, error, seconds = self.results[key]
        if not done.is_set():
            return None, TimeoutError("compile not finished within the budget"), None
        return compiled, error, seconds


def _time(run, reps=3, calls=5):
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            out = run()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x2048", help="comma-separated BATCHxLENGTH")
    parser.add_argument("--candidates", default="xla,cudnn,cudnn_skip,pallas_flash,cudnn_skip_pad")
    parser.add_argument("--flash-variants", default="", help="comma-separated pallas_flash configs: 'default' or "
                        "bq:bk:warps:stages (all kernels) or forward/dq/dkv, each bq:bk:warps:stages")
    parser.add_argument("--flash-parts", action="store_true", help="also time each flash variant's text part "
                        "alone: forward kernel, backward kernels")
    parser.add_argument("--masks", default="global,window,packed", help="which of global, window, packed")
    parser.add_argument("--compile-threads", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--budget", type=float, default=190, help="seconds for the whole run")
    parser.add_argument("--interpret", action="store_true", help="flash variants in the Pallas interpreter "
                        "(a smoke test of this script on the CPU, e.g. --shapes 1x256)")
    args = parser.parse_args()
    global INTERPRET
    INTERPRET = args.interpret
    t0 = time.monotonic()
    faulthandler.dump_traceback_later(args.budget + 15, exit=True)      # a hung GPU call ends the process
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.compile_threads} compile "
          f"threads, budget {args.budget:.0f} s", flush=True)
    if jax.default_backend() == "gpu":
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        print(f"cuDNN {check_cudnn_version()}", flush=True)
    for spec in filter(None, args.flash_variants.split(",")):
        _flash_config(spec)                                             # a typo fails before any compile
    candidates = list(filter(None, args.candidates.split(",")))
    variants = list(filter(None, args.flash_variants.split(",")))
    jobs = []
    for shape in args.shapes.split(","):
        batch, length = (int(n) for n in shape.split("x"))
        jobs += shape_jobs(batch, length, candidates, variants, args.flash_parts, args.masks.split(","))
    compiler = Compiler(args.compile_threads)
    for i, job in enumerate(jobs):
        compiler.submit(i, job)
    # Compile first, then time, so no compile (nor XLA's autotuning on the GPU) runs beside a timing.
    compiler.wait_all(t0 + args.budget - max(TIMING_RESERVE, TIMING_PER_JOB * len(jobs)))
    print(f"compiled by t={time.monotonic() - t0:.0f} s", flush=True)
    title = None
    for i, job in enumerate(jobs):
        if job.title != title:
            title = job.title
            print(f"== {title}", flush=True)
        if time.monotonic() > t0 + args.budget:
            print(f"{job.name:48s} SKIPPED: the budget is spent", flush=True)
            continue
        compiled, error, seconds = compiler.result(i)
        try:
            if error is not None:
                raise error
            result = jax.block_until_ready(compiled())
            ms = _time(compiled)
            errs = job.check(result) if job.check else None
            err = "" if errs is None else (
                f" | rel err vs fp32: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} "
                f"dmeta_k {errs[4]:.1e} dmeta_v {errs[5]:.1e}")
            print(f"{job.name:48s} {'fwd+bwd' if job.check else '       '} {ms:7.3f} ms{err} | compile "
                  f"{seconds:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 - one failing candidate must not stop the others
            print(f"{job.name:48s} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
    print(f"done at t={time.monotonic() - t0:.0f} s", flush=True)
    sys.stdout.flush()
    os._exit(0)        # compiles still running in daemon threads are abandoned


if __name__ == "__main__":
    main()
