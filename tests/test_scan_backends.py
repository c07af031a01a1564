"""The chunked and fused (Pallas, in interpret mode) scan backends against the 'sequential' reference:
values and gradients of every input, with resets, an initial state and a length that is not a multiple
of the chunk, in fp32 and with bf16 inputs.

Tolerances (relative norm error ||got - ref|| / ||ref||): fp32 5e-6. Every backend computes the same
fp32 arithmetic as the reference in another order (a parallel scan or chunked recurrences, sums over the
state in other orders); that reorders roundings of ~6e-8 over recurrences a few tens of steps deep, and the
measured errors are 1e-7 to 7e-7, while any wrong term (a missing reset, an off-by-one step, a dropped
gradient path) gives errors of order 1e-2 to 1. bf16 inputs: the arithmetic is still fp32, but y and the
input gradients are rounded to bf16 at the end, so the two sides differ by at most one bf16 ulp (2^-8)
where they round differently: 4e-3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hymba_jax.ops import scan_chunked, scan_pallas_gpu, scan_pallas_tpu
from hymba_jax.ops.scan import available_backends, selective_scan

BATCH, LENGTH, WIDTH, STATE = 2, 21, 16, 4      # length 21: not a multiple of the chunk (8)
BACKENDS = {
    "chunked": scan_chunked.with_chunk(8),
    # the gradient path keeps states every 4 steps, the forward-only path unrolls 8
    "pallas_gpu": scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=8, block_d=8, interpret=True),
    "pallas_tpu": scan_pallas_tpu.with_kernels(chunk=8, block_d=8, interpret=True),
}
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(seed: int, dtype, h0_batch: int):
    ks = jax.random.split(jax.random.key(seed), 10)
    normal = lambda k, shape, dt=dtype: jax.random.normal(k, shape, jnp.float32).astype(dt)
    x = normal(ks[0], (BATCH, LENGTH, WIDTH))
    dt = normal(ks[1], (BATCH, LENGTH, WIDTH))
    A = -jnp.exp(normal(ks[2], (WIDTH, STATE), jnp.float32))
    B, C = normal(ks[3], (BATCH, LENGTH, STATE)), normal(ks[4], (BATCH, LENGTH, STATE))
    D = normal(ks[5], (WIDTH,), jnp.float32)
    z = normal(ks[6], (BATCH, LENGTH, WIDTH))
    bias = normal(ks[7], (WIDTH,), jnp.float32)
    reset = (jnp.zeros((BATCH, LENGTH), bool).at[0, 5].set(True).at[0, 13].set(True).at[1, 8].set(True))
    h0 = normal(ks[9], (h0_batch, WIDTH, STATE), jnp.float32)
    return (x, dt, A, B, C, D, z, bias, h0), reset


def value_and_grads(fn):
    """(y, last, grads of all 9 inputs) of a random projection of both outputs."""

    def loss(x, dt, A, B, C, D, z, bias, h0, reset):
        y, last = fn(x, dt, A, B, C, D, z, bias, reset, h0)
        wy = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        wl = jnp.cos(jnp.arange(last.size, dtype=jnp.float32)).reshape(last.shape)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(last * wl), (y, last)

    grad = jax.grad(loss, argnums=tuple(range(9)), has_aux=True)
    return jax.jit(lambda inputs, reset: grad(*inputs, reset))


def sequential(x, dt, A, B, C, D, z, bias, reset, h0):
    return selective_scan(x, dt, A, B, C, D, z, bias, reset=reset, initial_state=h0, backend="sequential")


def rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def reference():
    return value_and_grads(sequential)


def test_backends_registered():
    assert {"associative", "sequential", "chunked", "pallas_gpu", "pallas_tpu"} <= set(available_backends())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype,h0_batch,tol", [(jnp.float32, BATCH, 5e-6), (jnp.bfloat16, 1, 4e-3)],
                         ids=["fp32", "bf16-shared-h0"])
def test_matches_sequential(reference, backend, dtype, h0_batch, tol):
    inputs, reset = make_inputs(0, dtype, h0_batch)
    grads, (y, last) = value_and_grads(BACKENDS[backend])(inputs, reset)
    ref_grads, (ref_y, ref_last) = reference(inputs, reset)
    assert y.dtype == dtype and y.shape == (BATCH, LENGTH, WIDTH)
    assert last.dtype == jnp.float32 and last.shape == (BATCH, WIDTH, STATE)
    assert rel(y, ref_y) < tol
    assert rel(last, ref_last) < 5e-6
    for name, g, ref_g in zip(NAMES, grads, ref_grads):
        assert g.shape == ref_g.shape and g.dtype == ref_g.dtype, name
        assert float(jnp.linalg.norm(ref_g.astype(jnp.float32))) > 0, name
        assert rel(g, ref_g) < (5e-6 if g.dtype == jnp.float32 else tol), name


def test_resets_restart_from_initial_state():
    """A document after a reset gives what it gives alone from the initial state (every backend)."""
    inputs, _ = make_inputs(1, jnp.float32, BATCH)
    x, dt, A, B, C, D, z, bias, h0 = inputs
    reset = jnp.zeros((BATCH, LENGTH), bool).at[:, 9].set(True)
    for name, fn in BACKENDS.items():
        y, last = fn(x, dt, A, B, C, D, z, bias, reset, h0)
        alone, alone_last = fn(*(t[:, 9:] for t in (x, dt)), A, *(t[:, 9:] for t in (B, C)), D, z[:, 9:],
                               bias, None, h0)
        assert rel(y[:, 9:], alone) < 5e-6, name
        assert rel(last, alone_last) < 5e-6, name


def test_optional_arguments():
    """No gate, no bias, no resets, no initial state (zeros): still the reference."""
    inputs, _ = make_inputs(2, jnp.float32, BATCH)
    x, dt, A, B, C, D, _, _, _ = inputs
    ref_y, ref_last = sequential(x, dt, A, B, C, D, None, None, None, None)
    for name, fn in BACKENDS.items():
        y, last = fn(x, dt, A, B, C, D, None, None, None, None)
        assert rel(y, ref_y) < 5e-6 and rel(last, ref_last) < 5e-6, name


def test_pallas_gpu_chunks_must_be_powers_of_two():
    with pytest.raises(ValueError, match="chunk=6: must be a power of two"):
        scan_pallas_gpu.kernels(chunk=6)
    with pytest.raises(ValueError, match="inference_chunk=12: must be a power of two"):
        scan_pallas_gpu.kernels(inference_chunk=12)
