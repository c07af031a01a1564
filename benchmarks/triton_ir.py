"""Inspect the Triton kernels of the 'pallas_gpu' scan backend, or of the 'pallas_flash' attention, without a
GPU: lower the scan (forward and forward+backward) or the attention layer (forward+backward) for CUDA on the
CPU, save each kernel's Triton IR, and, where the `triton` package is importable, compile it for sm_90 and
report ptxas' registers and spills and the PTX instruction counts that decide these kernels' speed
(shuffles, barriers, shared memory, exps).

    PYTHONPATH=. python benchmarks/triton_ir.py --out /tmp/ttir                      # IR only
    pip install --target /tmp/tri triton==3.9.0
    PYTHONPATH=.:/tmp/tri python benchmarks/triton_ir.py --out /tmp/ttir --compile   # + PTX counts
    PYTHONPATH=.:/tmp/tri python benchmarks/triton_ir.py --out /tmp/ttir --compile \
        --flash-config 128:64:4:3/128:64:8:2/64:128:8:2 --shape 8x2048 [--window 1024] [--packed]

Counts are per kernel, i.e. per tile loop body plus the prologue. Compiling takes 20 s to several
minutes per kernel on a CPU. The IR comes from this machine's jax, the compiler from the `triton` package:
the device's own Triton may choose other layouts, so time the kernels on the device before trusting this.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering

from hymba_jax.ops import scan_pallas_gpu
from scan import cotangents, make_inputs, scan_fn

PTX_COUNTS = ("shfl.sync", "bar.sync", "ld.shared", "st.shared", "ex2.approx", "ld.global", "st.global",
              "ld.local", "st.local", "wgmma.mma_async", "mma.sync", "cp.async")


@contextlib.contextmanager
def capture_ttir(out: str, tag: str):
    """While inside, every Pallas Triton kernel lowered has its Triton IR written under `out`; yields the
    list of paths, in lowering order."""
    paths = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(jaxpr, *args, **kwargs):
        result = original(jaxpr, *args, **kwargs)
        path = os.path.join(out, f"{tag}_{len(paths)}.ttir")
        with open(path, "w") as fh:
            fh.write(result.module.operation.get_asm(enable_debug_info=False))
        paths.append(path)
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        yield paths
    finally:
        lowering.lower_jaxpr_to_triton_module = original


def dump_kernels(backend, batch: int, length: int, width: int, state: int, out: str, tag: str,
                 initial_state: bool) -> list[str]:
    """Lower the scan's forward and forward+backward for CUDA, with or without an initial state (shared by
    the rows: the meta tokens' state, as the 1.5B trains); write each kernel's Triton IR under `out`."""
    with capture_ttir(out, tag) as paths:
        args = make_inputs(jax.random.key(0), batch, length, width, state, jnp.bfloat16, initial_state)
        x, dt, A, B, C, D, z, bias, reset, h0 = args
        forward, grad = scan_fn(backend)
        forward.trace(*args).lower(lowering_platforms=("cuda",))
        dy, dlast = cotangents(forward, args, jnp.ones(x.shape), jnp.ones((batch, width, state)))
        grad.trace(x, dt, A, B, C, D, z, bias, h0, reset, dy, dlast).lower(lowering_platforms=("cuda",))
    return paths


def dump_attention_kernels(config, batch: int, length: int, window, packed: bool, out: str) -> list[str]:
    """Lower the 'pallas_flash' text part's forward and backward (1.5B heads: 25 over 5, q/k 64, v 128) for
    CUDA; write the forward, dq and dk/dv kernels' Triton IR under `out`."""
    from hymba_jax.ops.attention_flash_gpu import flash_gpu_part

    bf = jnp.bfloat16
    q, k, v = (jax.ShapeDtypeStruct(s, bf) for s in ((batch, length, 25, 64), (batch, length, 5, 64),
                                                     (batch, length, 5, 128)))
    seg = jax.ShapeDtypeStruct((batch, length), jnp.int32) if packed else None
    band = jnp.asarray(length if window is None else window, jnp.int32)
    part = flash_gpu_part(scale=64 ** -0.5, config=config)
    with capture_ttir(out, "flash") as paths:
        out_, lse = jax.eval_shape(part.forward, q, k, v, seg, band)
        jax.jit(part.forward).trace(q, k, v, seg, band).lower(lowering_platforms=("cuda",))
        jax.jit(part.backward).trace(q, k, v, seg, band, out_, lse, out_).lower(lowering_platforms=("cuda",))
    return paths


def compile_and_count(path: str, num_warps: int, num_stages: int = 1, extra: dict | None = None) -> str:
    """Compile Triton IR for sm_90 with the `triton` package; ptxas -v summary and PTX counts. extra: more
    Triton compile options (e.g. enable_fp_fusion=False, as jaxlib 0.11's compiler runs: no mul + add -> fma)."""
    import triton
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    # triton.compile starts an IR file after the TTIR passes (combine: dot + add -> dot with accumulator,
    # canonicalisation, CSE), which XLA's pipeline runs: run them here first.
    backend, context = make_backend(target), ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = ir.parse_mlir_module(path, context)
    module.context = context
    options = dict(num_warps=num_warps, num_stages=num_stages, **(extra or {}))
    parsed = backend.parse_options(options)
    backend.make_ttir(module, {}, parsed, 90)
    with open(path + ".opt.ttir", "w") as fh:
        fh.write(str(module))
    kernel = triton.compile(path + ".opt.ttir", target=target, options=options)
    ptx = kernel.asm["ptx"]
    with open(path + ".ptx", "w") as fh:
        fh.write(ptx)
    with open(path + ".ttgir", "w") as fh:
        fh.write(kernel.asm["ttgir"])
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(p for p in (os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p))
    done = subprocess.run([ptxas, "-arch=sm_90a", "-v", path + ".ptx", "-o", os.devnull],
                          capture_output=True, text=True)
    summary = " | ".join(line.split("info    : ")[-1] for line in done.stderr.splitlines()
                         if "registers" in line or "spill" in line or "Performance" in line)
    counts = " ".join(f"{name} {ptx.count(name)}" for name in PTX_COUNTS)
    return f"{summary or done.stderr.strip()[-300:]}\n    {counts}"


def _key_values(text: str) -> dict:
    """'k=v,k=v' with integer, true or false values, as a dict."""
    pairs = (kv.split("=") for kv in filter(None, text.split(",")))
    return {k: v == "true" if v in ("true", "false") else int(v) for k, v in pairs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--options", default="", help="scan_pallas_gpu.kernels options, e.g. chunk=8,segments=4")
    parser.add_argument("--shape", default="8x2048x3200x16", help="batch x length x d_inner x d_state "
                        "(attention: batch x length)")
    parser.add_argument("--flash-config", default=None, help="dump the pallas_flash attention kernels instead, "
                        "with this FlashConfig (bq:bk:warps:stages, or forward/dq/dkv)")
    parser.add_argument("--window", type=int, default=None, help="attention: sliding window (default causal)")
    parser.add_argument("--packed", action="store_true", help="attention: with segment ids")
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-initial-state", action="store_true", help="scan: without an initial state (a "
                        "model without meta tokens)")
    parser.add_argument("--compile", action="store_true", help="compile with the triton package (sm_90)")
    parser.add_argument("--triton-options", default="", help="more Triton compile options, k=v (integers, true, "
                        "false), e.g. enable_fp_fusion=false (what the H200's jax 0.11 does: its SASS has no "
                        "contracted fma)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.flash_config:
        from hymba_jax.ops.attention_flash_gpu import FlashConfig
        config = FlashConfig.parse(args.flash_config)
        batch, length = map(int, args.shape.split("x")[:2])
        paths = dump_attention_kernels(config, batch, length, args.window, args.packed, args.out)
        for path, kernel in zip(paths, (config.forward, config.dq, config.dkv)):
            print(path, kernel, f"{os.path.getsize(path) / 1e3:.0f} kB of Triton IR", flush=True)
            if args.compile:
                print("   ", compile_and_count(path, kernel.num_warps, kernel.num_stages), flush=True)
        return
    options, extra = _key_values(args.options), _key_values(args.triton_options)
    warps = options.get("num_warps", scan_pallas_gpu.NUM_WARPS)
    batch, length, width, state = map(int, args.shape.split("x"))
    paths = dump_kernels(scan_pallas_gpu.with_kernels(**options), batch, length, width, state, args.out,
                         "pallas_gpu", not args.no_initial_state)
    for path in paths:
        print(path, f"{os.path.getsize(path) / 1e3:.0f} kB of Triton IR", flush=True)
        if args.compile:
            print("   ", compile_and_count(path, warps, extra=extra), flush=True)


if __name__ == "__main__":
    main()
