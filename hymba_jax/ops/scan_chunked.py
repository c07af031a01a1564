"""The 'chunked' scan backend: plain JAX with bounded memory, portable to every platform.

The sequence is cut into chunks of `CHUNK` positions. A `lax.scan` carries the (B, D, N) state from chunk
to chunk; inside a chunk the recurrence runs in parallel (`associative_scan` over (B, T, D, N) terms), so
the (B, L, D, N) tensors of the associative backend are never built whole. The custom VJP keeps only the
state at each chunk start and recomputes each chunk in a reverse `lax.scan`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hymba_jax.ops.scan import register_backend

CHUNK = 64

# dt at padding positions: softplus(PAD_DT + bias) == 0 exactly in fp32, so a padded step has decay 1 and
# input 0 (the state passes through unchanged) and its dt gradient (times sigmoid) is exactly 0.
PAD_DT = -1e4


def pad_time(length: int, chunk: int, *arrays_and_fills):
    """Pad (B, L, ...) arrays on the time axis to a multiple of `chunk`; pairs of (array or None, fill)."""
    pad = -length % chunk
    out = []
    for array, fill in arrays_and_fills:
        if array is None or not pad:
            out.append(array)
            continue
        widths = [(0, 0)] * array.ndim
        widths[1] = (0, pad)
        out.append(jnp.pad(array, widths, constant_values=jnp.asarray(fill, array.dtype)))
    return out


def _chunk(h_in, x, dt, z, B, C, reset, A, D, bias, h0):
    """One chunk: (B, D, N) state in; x, dt, z (B, T, D); B, C (B, T, N); reset (B, T).

    Returns y (B, T, D) in x.dtype and the state after the chunk.
    """
    f32 = jnp.float32
    delta = jax.nn.softplus(dt.astype(f32) + bias)
    a = jnp.exp(delta[..., None] * A)                                         # (B, T, D, N)
    b = (delta * x.astype(f32))[..., None] * B.astype(f32)[:, :, None, :]
    r = reset[:, :, None, None]
    b = jnp.where(r, a * h0[:, None] + b, b)
    a = jnp.where(r, 0.0, a)

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    a_cum, b_cum = jax.lax.associative_scan(combine, (a, b), axis=1)
    h = a_cum * h_in[:, None] + b_cum
    y = jnp.einsum("btdn,btn->btd", h, C.astype(f32)) + D * x.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(x.dtype), h[:, -1]


def _forward(x, dt, z, B, C, reset, A, D, bias, h0):
    """Chunk-major inputs (nC, B, T, ...). Returns y (nC, B, T, D), last state, states at chunk starts."""
    def step(h, chunk):
        y, h_next = _chunk(h, *chunk, A, D, bias, h0)
        return h_next, (y, h)

    last, (y, starts) = jax.lax.scan(step, h0, (x, dt, z, B, C, reset))
    return y, last, starts


@jax.custom_vjp
def _chunked(x, dt, z, B, C, reset, A, D, bias, h0):
    y, last, _ = _forward(x, dt, z, B, C, reset, A, D, bias, h0)
    return y, last


def _chunked_fwd(x, dt, z, B, C, reset, A, D, bias, h0):
    y, last, starts = _forward(x, dt, z, B, C, reset, A, D, bias, h0)
    return (y, last), (x, dt, z, B, C, reset, A, D, bias, h0, starts)


def _chunked_bwd(res, cotangents):
    x, dt, z, B, C, reset, A, D, bias, h0, starts = res
    dy, dlast = cotangents

    def step(carry, chunk):
        dh, dA, dD, dbias, dh0 = carry
        h, xc, dtc, zc, Bc, Cc, rc, dyc = chunk
        _, vjp = jax.vjp(lambda h_, x_, dt_, z_, B_, C_, A_, D_, b_, h0_:
                         _chunk(h_, x_, dt_, z_, B_, C_, rc, A_, D_, b_, h0_),
                         h, xc, dtc, zc, Bc, Cc, A, D, bias, h0)
        gh, gx, gdt, gz, gB, gC, gA, gD, gbias, gh0 = vjp((dyc, dh))
        return (gh, dA + gA, dD + gD, dbias + gbias, dh0 + gh0), (gx, gdt, gz, gB, gC)

    zeros = lambda t: jnp.zeros_like(t)
    init = (dlast, zeros(A), zeros(D), zeros(bias), zeros(h0))
    (dh, dA, dD, dbias, dh0), (dx, ddt, dz, dB, dC) = jax.lax.scan(
        step, init, (starts, x, dt, z, B, C, reset, dy), reverse=True)
    # The first chunk starts from h0 itself.
    return dx, ddt, dz, dB, dC, None, dA, dD, dbias, dh0 + dh


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


@register_backend("chunked")
def chunked_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state, chunk: int = CHUNK):
    f32 = jnp.float32
    batch, length, width = x.shape
    chunk = min(chunk, length)
    h0 = jnp.zeros((batch,) + A.shape, f32)
    if initial_state is not None:
        h0 = jnp.broadcast_to(initial_state.astype(f32), h0.shape)
    reset = jnp.zeros((batch, length), bool) if reset is None else reset
    bias = jnp.zeros((width,), f32) if dt_bias is None else dt_bias.astype(f32)
    x, dt, z, B, C, reset = pad_time(length, chunk, (x, 0), (dt, PAD_DT), (z, 0), (B, 0), (C, 0),
                                     (reset, False))
    n_chunks = x.shape[1] // chunk

    def chunk_major(t):
        if t is None:
            return None
        return jnp.moveaxis(t.reshape((batch, n_chunks, chunk) + t.shape[2:]), 1, 0)

    y, last = _chunked(*map(chunk_major, (x, dt, z, B, C, reset)), A.astype(f32), D.astype(f32), bias, h0)
    y = jnp.moveaxis(y, 0, 1).reshape(batch, n_chunks * chunk, width)[:, :length]
    return y, last


def with_chunk(chunk: int):
    """The chunked backend with another chunk length (for tests and tuning)."""
    return functools.partial(chunked_scan, chunk=chunk)
