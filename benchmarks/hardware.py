"""The ceilings every benchmark reports against, measured in the same process: copy bandwidth, the bf16
matmul rate and XLA's exp rate; and one timing helper.

Imported by the scripts beside it (`python benchmarks/<script>.py` puts this folder on sys.path).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def timeit(fn, *args, reps: int = 5, samples: int = 7) -> float:
    """Median seconds per call over `samples` runs of `reps` back-to-back calls, after two warm-up calls."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes read + written per second by an XLA elementwise pass over `gib` GiB of fp32 (16 MiB on CPU)."""
    size = int(gib * 2 ** 28) if jax.default_backend() == "gpu" else 1 << 22
    a = jnp.ones((size,), jnp.float32)
    seconds = timeit(jax.jit(lambda t: t + 1.0), a, reps=3, samples=5)
    return 2 * a.nbytes / seconds


def matmul_rate(n: int = 0) -> float:
    """Dense bf16 matmul FLOP/s at n x n x n (the MFU denominator); n = 0: 8192 on a GPU, 512 elsewhere
    (a smoke run)."""
    n = n or (8192 if jax.default_backend() == "gpu" else 512)
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    return 2 * n ** 3 / timeit(jax.jit(lambda p, q: p @ q), a, b, reps=10, samples=5)


def exp_rate(depth: int = 64) -> float:
    """exp/s of a fused chain of `depth` XLA exps over 16M fp32 values."""
    e = jax.random.uniform(jax.random.key(3), (2 ** 24,), jnp.float32)

    def exps(t):
        for _ in range(depth):
            t = jnp.exp(-t)
        return t

    return depth * e.size / timeit(jax.jit(exps), e, reps=3, samples=5)
