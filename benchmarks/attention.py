"""Attention backends on the Hymba-1.5B layer masks against the XLA reference: errors and time of
forward+backward per layer, bf16, 25 query heads over 5 KV heads (q/k head 64, v head 128), 128 meta
tokens always visible, global causal, window 1024, and window 1024 over packed documents.

    PYTHONPATH=. python benchmarks/attention.py --shapes 8x2048,4x4096      # on the H200 (device tool)

Candidates (`--candidates`): 'xla' (the reference), 'cudnn' (dense mask), 'cudnn_skip' (cuDNN's causal /
window masks, meta tokens in a second cuDNN call, merged through the log-sum-exp), 'pallas_flash' (our
Triton kernel for the text keys, meta tokens in XLA), and the variants of 'cudnn_skip': '_pad' (q/k heads
zero-padded to 128) and '_xlameta' (meta tokens in XLA), e.g. 'cudnn_skip_pad_xlameta'.
Errors are relative Frobenius norms against the XLA reference in fp32 on the same bf16 inputs (the bf16
XLA reference's own error, printed in its row, is what the bf16 roundings of the computation cost). A
candidate that fails prints its error and the others go on.
"""

from __future__ import annotations

import argparse
import faulthandler
import statistics
import time

import jax
import jax.numpy as jnp

from hymba_jax.model.attention import KV, attend, dot_product_attention, text_mask
from hymba_jax.ops.attention import merged_attention, xla_prefix_part

M, H, KVH, DK, DV, WINDOW = 128, 25, 5, 64, 128, 1024


def _variant(name):
    """fn(q, k, v, prefix, mask) for a candidate name."""
    if name in ("xla", "cudnn", "cudnn_skip", "pallas_flash"):
        return lambda q, k, v, prefix, mask: attend(q, k, v, mask, prefix, name)
    from hymba_jax.ops.attention_cudnn import cudnn_part
    scale = DK ** -0.5
    unpadded = "_pad" not in name
    meta = xla_prefix_part(scale) if "_xlameta" in name else cudnn_part(
        window=None, causal=False, scale=scale, unpadded=unpadded)

    def fn(q, k, v, prefix, mask):
        text = cudnn_part(window=mask.window, causal=True, scale=scale, unpadded=unpadded)
        return merged_attention(text, meta, q, k, v, prefix, mask.segments)
    return fn


def _time(f, *args, reps=3):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(5):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / 5)
    return 1e3 * statistics.median(times)


def run_shape(batch, length, candidates, masks):
    ks = jax.random.split(jax.random.key(0), 7)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (batch, length, H, DK), bf)
    k = jax.random.normal(ks[1], (batch, length, KVH, DK), bf)
    v = jax.random.normal(ks[2], (batch, length, KVH, DV), bf)
    pre = KV(jax.random.normal(ks[3], (1, M, KVH, DK), bf), jax.random.normal(ks[4], (1, M, KVH, DV), bf))
    w = jax.random.normal(ks[5], (batch, length, H, DV), jnp.float32)
    q32, k32, v32 = (t.astype(jnp.float32) for t in (q, k, v))      # the same inputs, fp32 compute
    pre32 = KV(pre.k.astype(jnp.float32), pre.v.astype(jnp.float32))
    segments = jnp.cumsum(jax.random.uniform(ks[6], (batch, length)) < 1 / 700, axis=1)
    print(f"== {batch} x {length}: q {q.shape} k {k.shape} v {v.shape}, {M} meta tokens", flush=True)
    cases = {"global": ("global", None, None), "window": (f"window {WINDOW}", WINDOW, None),
             "packed": (f"window {WINDOW}, packed", WINDOW, segments)}
    for title, window, seg in (cases[m] for m in masks):
        mask = text_mask(length, window=window, segments=seg, num_prefix=M)

        def grads(fn):
            loss = lambda q_, k_, v_, pk, pv: jnp.sum(fn(q_, k_, v_, KV(pk, pv), mask).astype(jnp.float32) * w)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))

        ref_fn = lambda q_, k_, v_, p_, m_: dot_product_attention(q_, k_, v_, m_.dense, p_)
        exact = jax.jit(ref_fn)(q32, k32, v32, pre32, mask), grads(ref_fn)(q32, k32, v32, *pre32)[1]

        def rel(a, b):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

        for name in candidates:
            try:
                fn = _variant(name)
                start = time.perf_counter()
                out = jax.block_until_ready(jax.jit(fn)(q, k, v, pre, mask))
                first_fwd = time.perf_counter() - start
                g = grads(fn)
                start = time.perf_counter()
                dq, dk, dv, dpk, dpv = jax.block_until_ready(g(q, k, v, *pre)[1])
                first_grad = time.perf_counter() - start
                errs = [rel(out, exact[0])] + [rel(a, b) for a, b in zip((dq, dk, dv, dpk, dpv), exact[1])]
                ms = _time(g, q, k, v, *pre)
                print(f"{title:22s} {name:20s} fwd+bwd {ms:7.2f} ms | rel err vs fp32: out {errs[0]:.1e} "
                      f"dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e} dmeta_k {errs[4]:.1e} "
                      f"dmeta_v {errs[5]:.1e} | first calls (compile) fwd {first_fwd:.1f} s, "
                      f"fwd+bwd {first_grad:.1f} s", flush=True)
            except Exception as e:  # noqa: BLE001 - one failing candidate must not stop the others
                print(f"{title:22s} {name:20s} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="8x2048", help="comma-separated BATCHxLENGTH")
    parser.add_argument("--candidates", default="xla,cudnn,cudnn_skip,pallas_flash,cudnn_skip_pad")
    parser.add_argument("--masks", default="global,window,packed", help="which of global, window, packed")
    parser.add_argument("--watchdog", type=float, default=0, help="dump the Python stacks after this many s")
    args = parser.parse_args()
    if args.watchdog:
        faulthandler.dump_traceback_later(args.watchdog, exit=False)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    if jax.default_backend() == "gpu":
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        print(f"cuDNN {check_cudnn_version()}", flush=True)
    for shape in args.shapes.split(","):
        batch, length = (int(x) for x in shape.split("x"))
        run_shape(batch, length, args.candidates.split(","), args.masks.split(","))


if __name__ == "__main__":
    main()
