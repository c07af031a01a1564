"""The 'pallas_gpu' scan backend: the fused selective scan as Pallas kernels lowered through Triton.

One thread per channel. A program owns one batch row and `block_d` channels (one warp by default) and
keeps each channel's N states as N separate (1, block_d) rows, so the recurrence and every sum over the
state axis (y, and the x and dt gradients) stay in the thread's registers; B_t and C_t enter as per-step
scalars that every thread reads. The only sums across threads are the backward's dB and dC (over the
program's channels: a warp reduction per step and state when block_d is one warp); each program writes
its (L, N) partial and XLA sums the channel blocks.

Time runs in a `fori_loop` over chunks of `chunk` steps, each chunk unrolled in Python so that its loads
are issued ahead of the dependent arithmetic. The forward pass writes y and, when a backward pass will
follow, the state at each chunk start; the backward pass walks the chunks in reverse, recomputes a
chunk's states from its start, then walks the chunk backwards. softplus(dt + bias), the D skip and the
silu(z) gate are fused in. `interpret=True` runs the same kernels on the CPU (tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hymba_jax.ops.scan import register_backend
from hymba_jax.ops.scan_fused import Canon, Kernels, channel_block, fused_scan, sigmoid, softplus

try:  # the Triton compiler parameters (absent from some jaxlib builds; not needed in interpret mode)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

CHUNK = 8
BLOCK_D = 32
NUM_WARPS = 1

f32 = jnp.float32
Rows = tuple  # N rows of shape (1, block_d), one per state


def _row(ref, t):
    return ref[pl.ds(t, 1), :].astype(f32)


def _scalar(ref, t, j):
    return ref[pl.ds(t, 1), pl.ds(j, 1)].astype(f32)


def _put(ref, t, value, j=None):
    index = (pl.ds(t, 1), slice(None) if j is None else pl.ds(j, 1))
    ref[index] = value.astype(ref.dtype)


def _state_rows(ref, n: int, first: int = 0) -> Rows:
    return tuple(ref[pl.ds(first + j, 1), :] for j in range(n))


def _put_state_rows(ref, rows: Rows, first: int = 0):
    for j, row in enumerate(rows):
        ref[pl.ds(first + j, 1), :] = row


class _Params(NamedTuple):
    """A program's share of the parameters: A and h0 as N rows, D and bias (1, block_d), fp32."""

    A: Rows
    h0: Rows
    D: jax.Array
    bias: jax.Array


class _Step(NamedTuple):
    """Inputs of one time step: rows (1, block_d), per-state scalars (1, 1), restart flag (1, 1)."""

    x: jax.Array
    dt: jax.Array
    z: Optional[jax.Array]
    B: Rows
    C: Rows
    restart: jax.Array


def _params(refs, n: int) -> _Params:
    return _Params(_state_rows(refs["A"], n), _state_rows(refs["h0"], n), refs["D"][...], refs["bias"][...])


def _load_step(refs, t, n: int, has_z: bool, need_c: bool = True) -> _Step:
    return _Step(_row(refs["x"], t), _row(refs["dt"], t), _row(refs["z"], t) if has_z else None,
                 tuple(_scalar(refs["B"], t, j) for j in range(n)),
                 tuple(_scalar(refs["C"], t, j) for j in range(n)) if need_c else (),
                 refs["reset"][pl.ds(t, 1), :] > 0)


def _advance(h: Rows, s: _Step, p: _Params):
    """One step of the recurrence. Returns (states before the update, after a reset: h_{t-1};
    states after it: h_t; softplus(dt + bias))."""
    delta = softplus(s.dt + p.bias)
    u = delta * s.x
    before = tuple(jnp.where(s.restart, h0, hj) for h0, hj in zip(p.h0, h))
    after = tuple(jnp.exp(delta * a) * hp + u * b for a, hp, b in zip(p.A, before, s.B))
    return before, after, delta


def _forward_kernel(refs, *, n, chunk, n_chunks, has_z, keep_starts):
    p = _params(refs, n)

    def body(k, h):
        t0 = k * chunk
        if keep_starts:
            _put_state_rows(refs["starts"], h, first=k * n)
        steps = [_load_step(refs, t0 + i, n, has_z) for i in range(chunk)]
        for i, s in enumerate(steps):
            _, h, _ = _advance(h, s, p)
            y = p.D * s.x
            for hj, c in zip(h, s.C):
                y = y + hj * c
            if has_z:
                y = y * (s.z * sigmoid(s.z))
            _put(refs["y"], t0 + i, y)
        return h

    _put_state_rows(refs["last"], jax.lax.fori_loop(0, n_chunks, body, p.h0))


class _Accum(NamedTuple):
    """What a program sums over its time steps: dA and dh0 as N rows, dD and dbias (1, block_d)."""

    dA: Rows
    dD: jax.Array
    dbias: jax.Array
    dh0: Rows


def _backward_chunk(refs, k, dh: Rows, acc: _Accum, p: _Params, *, n, chunk, has_z):
    """Gradients of chunk k given dh = d loss / d (state after it); returns d loss / d (state before it)."""
    t0 = k * chunk
    h = _state_rows(refs["starts"], n, first=k * n)
    before = []
    for i in range(chunk):                              # recompute the chunk's states
        hp, h, _ = _advance(h, _load_step(refs, t0 + i, n, has_z=False, need_c=False), p)
        before.append(hp)
    dA, dD, dbias, dh0 = acc
    for i in reversed(range(chunk)):
        t = t0 + i
        s = _load_step(refs, t, n, has_z)
        hp, h, delta = _advance(before[i], s, p)
        dy = _row(refs["dy"], t)
        if has_z:
            y = p.D * s.x
            for hj, c in zip(h, s.C):
                y = y + hj * c
            zs = sigmoid(s.z)
            _put(refs["dz"], t, dy * y * (zs * (1.0 + s.z * (1.0 - zs))))
            g = dy * (s.z * zs)
        else:
            g = dy
        dD = dD + g * s.x
        for j in range(n):
            _put(refs["dC"], t, jnp.sum(h[j] * g, axis=1, keepdims=True), j)
        dh = tuple(dhj + c * g for dhj, c in zip(dh, s.C))
        u = delta * s.x
        for j in range(n):
            _put(refs["dB"], t, jnp.sum(dh[j] * u, axis=1, keepdims=True), j)
        du = sum(dhj * b for dhj, b in zip(dh, s.B))
        decay = tuple(jnp.exp(delta * a) for a in p.A)
        q = tuple(dhj * d * hpj for dhj, d, hpj in zip(dh, decay, hp))
        dA = tuple(dAj + qj * delta for dAj, qj in zip(dA, q))
        dv = (sum(qj * a for qj, a in zip(q, p.A)) + du * s.x) * sigmoid(s.dt + p.bias)
        dbias = dbias + dv
        _put(refs["ddt"], t, dv)
        _put(refs["dx"], t, du * delta + g * p.D)
        dhp = tuple(dhj * d for dhj, d in zip(dh, decay))
        dh0 = tuple(acc_j + jnp.where(s.restart, v, 0.0) for acc_j, v in zip(dh0, dhp))
        dh = tuple(jnp.where(s.restart, 0.0, v) for v in dhp)
    return dh, _Accum(dA, dD, dbias, dh0)


def _backward_kernel(refs, *, n, chunk, n_chunks, has_z):
    p = _params(refs, n)

    def body(k, carry):
        dh, acc = carry
        return _backward_chunk(refs, n_chunks - 1 - k, dh, acc, p, n=n, chunk=chunk, has_z=has_z)

    zeros = jnp.zeros_like(p.D)
    acc = _Accum((zeros,) * n, zeros, zeros, (zeros,) * n)
    dh, acc = jax.lax.fori_loop(0, n_chunks, body, (_state_rows(refs["dlast"], n), acc))
    _put_state_rows(refs["dA"], acc.dA)
    refs["dD"][...] = acc.dD
    refs["dbias"][...] = acc.dbias
    _put_state_rows(refs["dh0"], tuple(a + b for a, b in zip(acc.dh0, dh)))


def _specs(length: int, n: int, block: int) -> dict:
    """Block specs over the grid (batch, channel block), by operand name."""
    row = pl.BlockSpec((None, length, block), lambda b, j: (b, 0, j))
    per_batch = lambda width: pl.BlockSpec((None, length, width), lambda b, j: (b, 0, 0))
    state = pl.BlockSpec((None, n, block), lambda b, j: (b, 0, j))
    vec = pl.BlockSpec((1, block), lambda b, j: (0, j))
    return dict(x=row, dt=row, z=row, dy=row, y=row, dx=row, ddt=row, dz=row, B=per_batch(n),
                C=per_batch(n), reset=per_batch(1), A=pl.BlockSpec((n, block), lambda b, j: (0, j)), D=vec,
                bias=vec, h0=state, dlast=state, last=state, dA=state, dh0=state,
                dD=pl.BlockSpec((None, 1, block), lambda b, j: (b, 0, j)),
                dbias=pl.BlockSpec((None, 1, block), lambda b, j: (b, 0, j)),
                dB=pl.BlockSpec((None, None, length, n), lambda b, j: (b, j, 0, 0)),
                dC=pl.BlockSpec((None, None, length, n), lambda b, j: (b, j, 0, 0)))


def _call(kernel, inputs: dict, outputs: dict, cfg):
    """pallas_call over the grid (batch, channel blocks); inputs/outputs map names to arrays/shapes."""
    x = inputs["x"]
    batch, length, width = x.shape
    n = inputs["A"].shape[0]
    block = channel_block(width, cfg["block_d"])
    specs = _specs(length, n, block)
    specs["starts"] = pl.BlockSpec((None, length // cfg["chunk"] * n, block), lambda b, j: (b, 0, j))
    names = list(inputs) + list(outputs)

    def body(*refs):
        kernel(dict(zip(names, refs)))

    params = None
    if plgpu is not None and not cfg["interpret"]:
        params = plgpu.CompilerParams(num_warps=cfg["num_warps"], num_stages=1)
    out = pl.pallas_call(body, grid=(batch, width // block), out_shape=list(outputs.values()),
                         in_specs=[specs[k] for k in inputs], out_specs=[specs[k] for k in outputs],
                         compiler_params=params, interpret=cfg["interpret"])(*inputs.values())
    return dict(zip(outputs, out))


def _inputs(c: Canon) -> dict:
    inputs = dict(x=c.x, dt=c.dt, z=c.z, B=c.B, C=c.C, reset=c.reset, A=c.A, D=c.D, bias=c.bias, h0=c.h0)
    return {k: v for k, v in inputs.items() if v is not None}


def _forward(c: Canon, keep_starts: bool, cfg):
    batch, length, width = c.x.shape
    n, chunk = c.A.shape[0], cfg["chunk"]
    outputs = dict(y=jax.ShapeDtypeStruct(c.x.shape, c.x.dtype))
    if keep_starts:
        outputs["starts"] = jax.ShapeDtypeStruct((batch, length // chunk * n, width), f32)
    outputs["last"] = jax.ShapeDtypeStruct((batch, n, width), f32)
    kernel = functools.partial(_forward_kernel, n=n, chunk=chunk, n_chunks=length // chunk,
                               has_z=c.z is not None, keep_starts=keep_starts)
    out = _call(kernel, _inputs(c), outputs, cfg)
    return out["y"], out.get("starts"), out["last"]


def _backward(c: Canon, starts, dy, dlast, cfg):
    batch, length, width = c.x.shape
    n, chunk = c.A.shape[0], cfg["chunk"]
    blocks = width // channel_block(width, cfg["block_d"])
    has_z = c.z is not None
    shape = jax.ShapeDtypeStruct
    outputs = dict(dx=shape(c.x.shape, c.x.dtype), ddt=shape(c.dt.shape, c.dt.dtype))
    if has_z:
        outputs["dz"] = shape(c.z.shape, c.z.dtype)
    outputs.update(dB=shape((batch, blocks, length, n), f32), dC=shape((batch, blocks, length, n), f32),
                   dA=shape((batch, n, width), f32), dD=shape((batch, 1, width), f32),
                   dbias=shape((batch, 1, width), f32), dh0=shape((batch, n, width), f32))
    kernel = functools.partial(_backward_kernel, n=n, chunk=chunk, n_chunks=length // chunk, has_z=has_z)
    g = _call(kernel, dict(_inputs(c), starts=starts, dy=dy, dlast=dlast), outputs, cfg)
    return Canon(g["dx"], g["ddt"], g.get("dz"), g["dB"].sum(1).astype(c.B.dtype),
                 g["dC"].sum(1).astype(c.C.dtype), None, g["dA"].sum(0), g["dD"].sum(0), g["dbias"].sum(0),
                 g["dh0"])


@functools.lru_cache(maxsize=None)
def kernels(chunk: int = CHUNK, block_d: int = BLOCK_D, num_warps: int = NUM_WARPS,
            interpret: bool = False) -> Kernels:
    cfg = dict(chunk=chunk, block_d=block_d, num_warps=num_warps, interpret=interpret)
    return Kernels(chunk, functools.partial(_forward, cfg=cfg), functools.partial(_backward, cfg=cfg))


@register_backend("pallas_gpu")
def pallas_gpu_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    return fused_scan(kernels(), x, dt, A, B, C, D, z, dt_bias, reset, initial_state)


def with_kernels(**options):
    """The backend with other tile sizes, or in interpret mode (`interpret=True`, for CPU tests)."""
    return functools.partial(fused_scan, kernels(**options))
