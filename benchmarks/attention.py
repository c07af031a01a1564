"""Attention backends on the Hymba-1.5B layer masks: cuDNN against the XLA reference, values, gradients
and time (forward+backward), bf16, 128 meta tokens always visible, global causal and window 1024.

    PYTHONPATH=. python benchmarks/attention.py       # on the H200 (device tool)
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from hymba_jax.model.attention import KV, attention_mask, dot_product_attention, with_prefix
from hymba_jax.ops.attention import fused_attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--implementation", default="cudnn")
    args = parser.parse_args()
    b, t, m, h, kvh, dk, dv = args.batch, args.length, 128, 25, 5, 64, 128
    ks = jax.random.split(jax.random.key(0), 6)
    bf = jnp.bfloat16
    q = jax.random.normal(ks[0], (b, t, h, dk), bf)
    k = jax.random.normal(ks[1], (b, t, kvh, dk), bf)
    v = jax.random.normal(ks[2], (b, t, kvh, dv), bf)
    prefix = KV(jax.random.normal(ks[3], (1, m, kvh, dk), bf), jax.random.normal(ks[4], (1, m, kvh, dv), bf))
    w = jax.random.normal(ks[5], (b, t, h, dv), jnp.float32)
    index = jnp.arange(t)[None]
    segments = jnp.cumsum(jax.random.uniform(ks[5], (b, t)) < 1 / 700, axis=1)
    print(f"device {jax.devices()[0].device_kind}; q {q.shape} k {k.shape} v {v.shape}, {m} meta tokens")
    for title, window, seg in (("global", None, None), ("window 1024", 1024, None),
                               ("window 1024, packed", 1024, segments)):
        mask = with_prefix(attention_mask(index, index, window=window, query_segment=seg, key_segment=seg), m)

        def loss(fn, q_, k_, v_):
            return jnp.sum(fn(q_, k_, v_).astype(jnp.float32) * w)

        ref = lambda q_, k_, v_: dot_product_attention(q_, k_, v_, mask, prefix)
        fused = lambda q_, k_, v_: fused_attention(q_, k_, v_, mask, prefix, implementation=args.implementation)
        row = [title]
        outs = {}
        for name, fn in (("xla", ref), (args.implementation, fused)):
            grad = jax.jit(jax.value_and_grad(lambda *a, fn=fn: loss(fn, *a), argnums=(0, 1, 2)))
            fwd = jax.jit(fn)
            outs[name] = (fwd(q, k, v), grad(q, k, v)[1])
            for label, f in (("fwd", fwd), ("fwd+bwd", grad)):
                jax.block_until_ready(f(q, k, v))
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    for _ in range(5):
                        out = f(q, k, v)
                    jax.block_until_ready(out)
                    times.append((time.perf_counter() - start) / 5)
                row.append(f"{name} {label} {1e3 * statistics.median(times):.2f} ms")
        rel = lambda a, b_: float(jnp.linalg.norm((a - b_).astype(jnp.float32)) /
                                  jnp.linalg.norm(b_.astype(jnp.float32)))
        (o_ref, g_ref), (o_f, g_f) = outs["xla"], outs[args.implementation]
        row.append(f"rel err out {rel(o_f, o_ref):.1e} dq {rel(g_f[0], g_ref[0]):.1e} "
                   f"dk {rel(g_f[1], g_ref[1]):.1e} dv {rel(g_f[2], g_ref[2]):.1e}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
