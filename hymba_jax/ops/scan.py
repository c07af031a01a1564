"""The selective scan (Mamba-1 / S6) behind one interface with swappable backends.

    delta_t = softplus(dt_t + dt_bias)                                  (B, L, D), fp32
    h_t     = exp(delta_t A) * h_{t-1} + delta_t * B_t * x_t             (B, D, N), fp32

(fp32 means at least fp32: with float64 inputs everything runs in float64, for gradient checks.)
    y_t     = (sum_n h_t[..., n] C_t[n] + D * x_t) * silu(z_t)

Packed documents restart at `reset[b, t]`: there h_{t-1} is replaced by `initial_state` (the state the meta
tokens leave), exactly as if the document were run alone. Every backend takes the same arguments, so the fused
kernels (softplus, the D skip and the gate inside: `chunked`, `pallas_gpu`, `pallas_tpu` in their own
modules) drop in by name (`HymbaConfig.scan_backend`; "auto" picks one per
platform, hymba_jax.ops.auto).
Backends here:

* `associative`: `jax.lax.associative_scan` over (a, b) pairs; parallel in the length.
* `sequential`: `jax.lax.scan` one step at a time, the reference for tests (and the fastest on CPUs).
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class ScanBackend(Protocol):
    def __call__(self, x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array, z: Optional[Array],
                 dt_bias: Optional[Array], reset: Optional[Array], initial_state: Optional[Array]
                 ) -> tuple[Array, Array]:
        ...


_BACKENDS: dict[str, ScanBackend] = {}


def register_backend(name: str) -> Callable[[ScanBackend], ScanBackend]:
    def register(fn: ScanBackend) -> ScanBackend:
        _BACKENDS[name] = fn
        return fn
    return register


def available_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def selective_scan(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array, z: Optional[Array] = None,
                   dt_bias: Optional[Array] = None, *, reset: Optional[Array] = None,
                   initial_state: Optional[Array] = None, backend: str = "associative"
                   ) -> tuple[Array, Array]:
    """Run the selective scan.

    Args:
      x: (B, L, D) input u (after conv and silu), any float dtype.
      dt: (B, L, D) dt_proj output without its bias (softplus is applied here, in fp32).
      A: (D, N) fp32, negative (= -exp(A_log)).
      B, C: (B, L, N) input and output projections, shared by all channels.
      D: (D,) skip weight. z: (B, L, D) gate or None. dt_bias: (D,) or None.
      reset: (B, L) bool or None; True where a document starts (the state restarts from initial_state).
      initial_state: (B or 1, D, N) state before position 0 (zeros if None).
      backend: a name from `available_backends()`.
    Returns:
      y (B, L, D) in x.dtype, and the state after the last position (B, D, N) fp32.
    """
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown scan backend {backend!r}; available: {available_backends()}") from None
    return fn(x, dt, A, B, C, D, z, dt_bias, reset, initial_state)


# --------------------------------------------------------------------------------------------------
# Plain-JAX backends share the elementwise terms and differ only in how they run the recurrence.

def _scan_terms(x, dt, A, B, dt_bias, reset, initial_state):
    """The recurrence as h_t = a_t h_{t-1} + b_t with resets folded in: where a document starts
    (and at t = 0) a_t becomes 0 and b_t absorbs a_t * h0, so no state needs to be carried across."""
    f32 = jnp.promote_types(x.dtype, jnp.float32)   # fp32, or fp64 in float64 checks
    delta = dt.astype(f32)
    if dt_bias is not None:
        delta = delta + dt_bias.astype(f32)
    delta = jax.nn.softplus(delta)                                            # (B, L, D)
    a = jnp.exp(delta[..., None] * A.astype(f32))                             # (B, L, D, N)
    b = (delta * x.astype(f32))[..., None] * B.astype(f32)[:, :, None, :]     # (B, L, D, N)
    batch, length = x.shape[:2]
    starts = jnp.zeros((batch, length), bool).at[:, 0].set(True)
    if reset is not None:
        starts = starts | reset
    if initial_state is not None:
        h0 = initial_state.astype(f32)[:, None]                              # (B|1, 1, D, N)
        b = jnp.where(starts[..., None, None], a * h0 + b, b)
    a = jnp.where(starts[..., None, None], 0.0, a)
    return a, b


def skip_and_gate(y: Array, x: Array, D: Array, z: Optional[Array]) -> Array:
    """(y + D * x) * silu(z) in fp32 (at least), returned in x's dtype: the scan output from the state
    readout y = sum_n h C (any shape ending in D, like x and z)."""
    f32 = jnp.promote_types(x.dtype, jnp.float32)   # fp32, or fp64 in float64 checks
    y = y + D.astype(f32) * x.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(x.dtype)


def _scan_output(h, x, C, D, z):
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    return skip_and_gate(jnp.einsum("bldn,bln->bld", h, C.astype(f32)), x, D, z)


def selective_step(h: Array, x: Array, dt: Array, A: Array, B: Array, C: Array,
                   dt_bias: Optional[Array] = None) -> tuple[Array, Array]:
    """One position of the recurrence, straight from its definition (no scan, no time axis).

    h (B, D, N) the state before, fp32; x, dt (B, D); A (D, N); B, C (B, N); dt_bias (D,) or None.
    Returns the state after (B, D, N) and the readout sum_n h C (B, D), both fp32 (fp64 for fp64 x); the
    D skip and the gate are `skip_and_gate`'s. The decode step uses it directly: its (B, D, N) terms are
    elementwise, so XLA computes state and readout in one pass over the state.
    """
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    delta = dt.astype(f32)
    if dt_bias is not None:
        delta = delta + dt_bias.astype(f32)
    delta = jax.nn.softplus(delta)                                                    # (B, D)
    h = (jnp.exp(delta[..., None] * A.astype(f32)) * h.astype(f32)
         + (delta * x.astype(f32))[..., None] * B.astype(f32)[:, None])
    return h, jnp.einsum("bdn,bn->bd", h, C.astype(f32))


@register_backend("associative")
def associative_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    a, b = _scan_terms(x, dt, A, B, dt_bias, reset, initial_state)

    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    _, h = jax.lax.associative_scan(combine, (a, b), axis=1)
    return _scan_output(h, x, C, D, z), h[:, -1]


@register_backend("sequential")
def sequential_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    """One position at a time, written straight from the recurrence (no folding): the reference."""
    f32 = jnp.promote_types(x.dtype, jnp.float32)   # fp32, or fp64 in float64 checks
    batch, length = x.shape[:2]
    h0 = jnp.zeros((batch,) + A.shape, f32)
    if initial_state is not None:
        h0 = jnp.broadcast_to(initial_state.astype(f32), h0.shape)
    if reset is None:
        reset = jnp.zeros((batch, length), bool)

    def step(h, inputs):
        x_t, dt_t, B_t, C_t, reset_t = inputs
        h = jnp.where(reset_t[:, None, None], h0, h)
        return selective_step(h, x_t, dt_t, A, B_t, C_t, dt_bias)

    time_major = [jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C, reset)]
    last, ys = jax.lax.scan(step, h0, time_major)
    return skip_and_gate(jnp.moveaxis(ys, 0, 1), x, D, z), last
