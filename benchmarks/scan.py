"""Selective-scan backends at the Hymba-1.5B layer shape: correctness against 'sequential', then time and
memory of forward and forward+backward against the byte/exp floor measured on the same device.

    PYTHONPATH=. python benchmarks/scan.py                      # on the H200 (device tool)
    PYTHONPATH=. python benchmarks/scan.py --batch 1 --length 64 --width 64 --backends chunked  # smoke

Shape: batch 8 x 2048 tokens, d_inner 3200, d_state 16, bf16 inputs (x, dt, z, B, C), fp32 parameters,
with resets and, as the 1.5B trains, an initial state shared by the rows: the meta tokens' state, which
every document restarts from (`--no-initial-state`: a model without meta tokens; the check runs both).
Forward+backward: the input gradients for given output cotangents (`jax.vjp`; dy in y's dtype), as a
training step's backward receives them; until 2026-12-03 it was the gradient of a loss over y, which added
that loss's XLA work to the time (the cotangent's fp32 -> bf16 conversion alone 0.074 ms at 8 x 2048).
Time: median over samples of `reps` back-to-back calls after warm-up, ended by block_until_ready; with
--profile also each kernel's GPU time and the GPU's span per call over back-to-back calls (the first kernel's
start to the last one's end): what the timed call takes beyond the span is host time (the first call's
dispatch and the final sync, spread over the reps), not kernels or gaps between them. Memory:
compiled temp + output bytes (memory_analysis). Floors: bytes that must move (inputs read once, outputs
written once) at the measured copy bandwidth; exponentials (B L D N per pass; the backward recomputes
them) at the measured exp rate.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import jax
import jax.numpy as jnp

from hardware import copy_bandwidth, exp_rate, matmul_rate, timeit
from profile_summary import summarize
from hymba_jax.ops import scan_pallas_gpu
from hymba_jax.ops.scan import available_backends, selective_scan


def hardware_rates() -> dict:
    return dict(copy_bytes_per_s=copy_bandwidth(), bf16_flops=matmul_rate(), xla_exp_per_s=exp_rate())


def make_inputs(key, batch, length, width, state, dtype, initial_state: bool = True):
    ks = jax.random.split(key, 10)
    normal = lambda k, shape, dt=dtype: jax.random.normal(k, shape, jnp.float32).astype(dt)
    x = normal(ks[0], (batch, length, width))
    dt = normal(ks[1], (batch, length, width)) - 2.0
    A = -jnp.exp(normal(ks[2], (width, state), jnp.float32))
    B, C = normal(ks[3], (batch, length, state)), normal(ks[4], (batch, length, state))
    D = normal(ks[5], (width,), jnp.float32)
    z = normal(ks[6], (batch, length, width))
    bias = normal(ks[7], (width,), jnp.float32) * 0.5
    reset = jax.random.uniform(ks[8], (batch, length)) < 1 / 512
    h0 = normal(ks[9], (1 if initial_state else 0, width, state), jnp.float32)
    return x, dt, A, B, C, D, z, bias, reset, h0


def scan_fn(backend):
    impl = backend if callable(backend) else None

    def forward(x, dt, A, B, C, D, z, bias, reset, h0):
        h0 = None if h0.size == 0 else h0                  # an empty h0: no initial state
        if impl is not None:
            return impl(x, dt, A, B, C, D, z, bias, reset, h0)
        return selective_scan(x, dt, A, B, C, D, z, bias, reset=reset, initial_state=h0, backend=backend)

    def forward_backward(x, dt, A, B, C, D, z, bias, h0, reset, dy, dlast):
        """The nine input gradients for the output cotangents dy (in y's dtype) and dlast, as a training
        step's backward hands them to the scan: no loss of the benchmark's own is timed with it."""
        _, pullback = jax.vjp(lambda *a: forward(*a[:8], reset, a[8]), x, dt, A, B, C, D, z, bias, h0)
        return pullback((dy, dlast))

    return jax.jit(forward), jax.jit(forward_backward)


def cotangents(forward, args, wy, wl):
    """(dy, dlast): wy in the dtype of forward's y, and wl."""
    y = jax.eval_shape(forward, *args)[0]
    return wy.astype(y.dtype), wl


def kernel_times(compiled, args, trace_dir: str, calls: int = 5) -> dict:
    """GPU time per call (ms) of the kernels of `calls` back-to-back calls, by kernel name, largest first,
    then their sum ("busy") and the GPU's span per call from the first kernel's start to the last one's end
    ("span": what is more than busy is idle between kernels); a jax.profiler trace summarized by
    benchmarks/profile_summary.py."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            out = compiled(*args)
        jax.block_until_ready(out)
    summary = summarize(trace_dir, calls)
    return dict(summary["top_kernels_ms"][:8], busy=summary["busy_ms"], span=summary["span_ms"])


def rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def check(backends, batch, length, width, state, dtype, initial_state: bool = True) -> dict:
    """Relative norm error of y, last state and the 9 input gradients against 'sequential' (fp32
    reference arithmetic on the same inputs); without an initial state dh0 is 0."""
    args = make_inputs(jax.random.key(7), batch, length, width, state, dtype, initial_state)
    x, dt, A, B, C, D, z, bias, reset, h0 = args
    wy = jax.random.normal(jax.random.key(8), x.shape, jnp.float32)
    wl = jax.random.normal(jax.random.key(9), (batch, width, state), jnp.float32)
    ref_f, ref_g = scan_fn("sequential")
    ref_out = ref_f(*args)
    ref_grads = ref_g(x, dt, A, B, C, D, z, bias, h0, reset, *cotangents(ref_f, args, wy, wl))
    result = {}
    for name, backend in backends.items():
        f, g = scan_fn(backend)
        out = f(*args)
        grads = g(x, dt, A, B, C, D, z, bias, h0, reset, *cotangents(f, args, wy, wl))
        errors = [rel(a, b) for a, b in zip(out, ref_out)] + [rel(a, b) for a, b in zip(grads, ref_grads)]
        result[name] = dict(zip(["y", "last", "dx", "ddt", "dA", "dB", "dC", "dD", "dz", "dbias", "dh0"],
                                errors))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--width", type=int, default=3200)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--backends", default="associative,chunked,pallas_gpu")
    parser.add_argument("--variants", default="",
                        help="'pallas_gpu' variants to time, ';'-separated, each comma-separated integer options "
                             "of scan_pallas_gpu.kernels (the rest its defaults), e.g. "
                             "'forward_segments=4,segments=8;chunk=8'")
    parser.add_argument("--check", action="store_true", help="compare with 'sequential' first (with an initial "
                        "state, then fp32 without)")
    parser.add_argument("--no-initial-state", action="store_true",
                        help="time without an initial state (a model without meta tokens); by default with one "
                             "shared by the rows, as the 1.5B's text pass starts from its meta tokens' state")
    parser.add_argument("--check-shape", default="2x1000x320", help="batch x length x width of the check")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--profile", default=None, help="also trace each timing with jax.profiler under this "
                        "directory and report its kernels' times")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shape=vars(args))

    backends = {name: name for name in args.backends.split(",") if name}
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:
        for variant in filter(None, args.variants.split(";")):
            options = {k: int(v) for k, v in (kv.split("=") for kv in variant.split(","))}
            backends[f"pallas_gpu[{variant}]"] = scan_pallas_gpu.with_kernels(**options)
    else:
        backends.pop("pallas_gpu", None)
    unknown = [b for b in backends.values() if isinstance(b, str) and b not in available_backends()]
    if unknown:
        raise SystemExit(f"unknown backends {unknown}; available: {available_backends()}")

    if args.check:
        cb, cl, cd = map(int, args.check_shape.split("x"))
        for dtype, initial in ((jnp.float32, True), (jnp.bfloat16, True), (jnp.float32, False)):
            title = f"check_{jnp.dtype(dtype).name}_{args.check_shape}" + ("" if initial else "_no_initial_state")
            results[title] = {}
            for name, backend in backends.items():
                try:
                    errs = check({name: backend}, cb, cl, cd, args.state, dtype, initial)[name]
                except Exception as e:  # noqa: BLE001 - a failing backend is reported, the others still run
                    results[title][name] = f"{type(e).__name__}: {str(e)[:2000]}"
                    print(f"{title} {name:24s} FAILED: {results[title][name]}", flush=True)
                    continue
                results[title][name] = errs
                worst = max(errs, key=errs.get)
                print(f"{title} {name:24s} max rel err vs sequential {errs[worst]:.2e} ({worst}); "
                      + " ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)

    rates = hardware_rates()
    results["rates"] = rates
    print(f"copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul {rates['bf16_flops'] / 1e12:.0f} "
          f"TFLOP/s, XLA exp {rates['xla_exp_per_s'] / 1e12:.2f} T/s")

    b, l, d, n = args.batch, args.length, args.width, args.state
    x, dt, A, B, C, D, z, bias, reset, h0 = make_inputs(jax.random.key(0), b, l, d, n, jnp.bfloat16,
                                                        not args.no_initial_state)
    wy = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)
    wl = jnp.ones((b, d, n), jnp.float32)
    big = b * l * d * 2                       # one bf16 (B, L, D) tensor
    fwd_bytes = 4 * big                       # x, dt, z in; y out
    bwd_bytes = 4 * big + 3 * big             # x, dt, z, dy in; dx, ddt, dz out (B, C, states: small)
    exps = b * l * d * n
    floors = dict(forward=max(fwd_bytes / rates["copy_bytes_per_s"], exps / rates["xla_exp_per_s"]),
                  forward_backward=max((fwd_bytes + bwd_bytes) / rates["copy_bytes_per_s"],
                                       2 * exps / rates["xla_exp_per_s"]))
    results["floors_s"] = floors
    rows = []
    for name, backend in backends.items():
        f, g = scan_fn(backend)
        row = dict(backend=name)
        fwd_args = (x, dt, A, B, C, D, z, bias, reset, h0)
        for kind, fn, fargs in (("forward", f, fwd_args),
                                ("forward_backward", g, (x, dt, A, B, C, D, z, bias, h0, reset,
                                                         *cotangents(f, fwd_args, wy, wl)))):
            try:
                compiled = fn.lower(*fargs).compile()
                mem = compiled.memory_analysis()
                row[kind + "_temp_bytes"] = mem.temp_size_in_bytes
                row[kind + "_s"] = timeit(compiled, *fargs, reps=3 if name == "sequential" else 10)
                if args.profile:
                    trace_dir = os.path.join(args.profile, re.sub(r"[^\w.-]", "_", f"{name}_{kind}"))
                    row[kind + "_kernels_ms"] = kernel_times(compiled, fargs, trace_dir)
            except Exception as e:  # noqa: BLE001 - a failing backend is reported, the others still run
                row[kind + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    results["timings"] = rows

    print(f"\nfloor: forward {floors['forward'] * 1e3:.3f} ms, forward+backward "
          f"{floors['forward_backward'] * 1e3:.3f} ms (bytes {fwd_bytes / 1e9:.2f} + {bwd_bytes / 1e9:.2f} GB, "
          f"exps {exps / 1e9:.2f} G per pass)")
    print(f"{'backend':28s} {'fwd ms':>8s} {'fwd temp':>9s} {'f+b ms':>8s} {'f+b temp':>9s} {'f+b/floor':>9s}")
    for row in rows:
        fwd, fb = row.get("forward_s"), row.get("forward_backward_s")
        fmt = lambda v: f"{v * 1e3:8.3f}" if v else "     err"
        mib = lambda k: f"{row[k] / 2**30:7.2f}Gi" if k in row else "       -"
        ratio = f"{fb / floors['forward_backward']:9.1f}" if fb else "        -"
        print(f"{row['backend']:28s} {fmt(fwd)} {mib('forward_temp_bytes')} {fmt(fb)} "
              f"{mib('forward_backward_temp_bytes')} {ratio}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
