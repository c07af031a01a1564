"""Scan backends against the sequential reference, and the reference against the recurrence itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hymba_jax.ops.scan import available_backends, selective_scan


def random_inputs(seed: int, batch=2, length=33, width=6, state=4, resets=True, initial=True):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    inputs = dict(
        x=f(batch, length, width), dt=f(batch, length, width), A=-jnp.exp(f(width, state)), B=f(batch, length, state),
        C=f(batch, length, state), D=f(width), z=f(batch, length, width), dt_bias=f(width) * 0.5,
    )
    reset = jnp.asarray(rng.random((batch, length)) < 0.15) if resets else None
    h0 = f(batch, width, state) if initial else None
    return inputs, reset, h0


def numpy_reference(x, dt, A, B, C, D, z, dt_bias, reset, h0):
    """The recurrence in float64 numpy, written from the architecture document."""
    x, dt, A, B, C, D, z, dt_bias = (np.asarray(t, np.float64) for t in (x, dt, A, B, C, D, z, dt_bias))
    batch, length, width = x.shape
    start = np.zeros((batch, width, A.shape[1])) if h0 is None else np.asarray(h0, np.float64)
    h = start.copy()
    y = np.zeros_like(x)
    for t in range(length):
        if reset is not None:
            h = np.where(np.asarray(reset)[:, t, None, None], start, h)
        delta = np.log1p(np.exp(dt[:, t] + dt_bias))
        h = np.exp(delta[..., None] * A) * h + (delta * x[:, t])[..., None] * B[:, t, None, :]
        y[:, t] = (h * C[:, t, None, :]).sum(-1) + D * x[:, t]
    silu = z / (1 + np.exp(-z))
    return y * silu, h


def test_backends_are_registered():
    assert {"associative", "sequential"} <= set(available_backends())
    with pytest.raises(ValueError, match="unknown scan backend 'nope'"):
        selective_scan(*random_inputs(0)[0].values(), backend="nope")


@pytest.mark.parametrize("length", [1, 7, 33])
@pytest.mark.parametrize("resets,initial", [(False, False), (True, True)])
def test_sequential_matches_the_recurrence(length, resets, initial):
    inputs, reset, h0 = random_inputs(length, length=length, resets=resets, initial=initial)
    y, last = selective_scan(**inputs, reset=reset, initial_state=h0, backend="sequential")
    y_ref, last_ref = numpy_reference(**inputs, reset=reset, h0=h0)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(last, last_ref, rtol=1e-4, atol=1e-4)


def _loss_and_grads(backend, inputs, reset, h0):
    """Values and gradients of all inputs (h0 included) of a random projection of both outputs."""
    rng = np.random.default_rng(7)
    wy = jnp.asarray(rng.normal(size=inputs["x"].shape), jnp.float32)
    wh = jnp.asarray(rng.normal(size=(inputs["x"].shape[0],) + inputs["A"].shape), jnp.float32)

    def loss(inputs, h0):
        y, last = selective_scan(**inputs, reset=reset, initial_state=h0, backend=backend)
        return jnp.sum(y * wy) + jnp.sum(last * wh), (y, last)

    (value, outputs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(inputs, h0)
    return outputs, grads


@pytest.mark.parametrize("length", [5, 33, 100])
def test_associative_matches_sequential_values_and_gradients(length):
    """fp32, inputs of unit scale: both compute the same products in a different order, so they agree
    to ~1e-6 relative; 1e-4 absolute/relative leaves margin and still catches any wrong term (O(1))."""
    inputs, reset, h0 = random_inputs(length, length=length)
    (y_a, h_a), grads_a = _loss_and_grads("associative", inputs, reset, h0)
    (y_s, h_s), grads_s = _loss_and_grads("sequential", inputs, reset, h0)
    np.testing.assert_allclose(y_a, y_s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h_a, h_s, rtol=1e-4, atol=1e-4)
    flat_a, flat_s = jax.tree_util.tree_leaves(grads_a), jax.tree_util.tree_leaves(grads_s)
    assert len(flat_a) == 9
    for ga, gs in zip(flat_a, flat_s):
        np.testing.assert_allclose(ga, gs, rtol=1e-3, atol=1e-3)
        assert np.abs(gs).max() > 0


def test_bf16_inputs_accumulate_in_fp32():
    inputs, reset, h0 = random_inputs(3, length=20)
    bf16 = {k: (v.astype(jnp.bfloat16) if k in ("x", "dt", "B", "C", "z") else v) for k, v in inputs.items()}
    y, last = selective_scan(**bf16, reset=reset, initial_state=h0, backend="associative")
    assert y.dtype == jnp.bfloat16 and last.dtype == jnp.float32
    y_ref, last_ref = numpy_reference(**{k: np.asarray(v, np.float32) for k, v in bf16.items()}, reset=reset, h0=h0)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(last, last_ref, rtol=1e-4, atol=1e-4)
