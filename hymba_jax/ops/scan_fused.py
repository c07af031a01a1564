"""What the fused (Pallas) scan kernels share: the canonical layout, the custom VJP, and the math of one
chunk of time steps, forward and backward.

Every fused kernel walks the sequence chunk by chunk (a chunk is `T` time steps unrolled in Python, so a
chunk's loads are issued before its sequential arithmetic). The forward pass writes y and, when a backward
pass follows, the state at each chunk start; the backward pass runs the chunks in reverse, recomputes each
chunk's states from its start state, then walks the chunk backwards. softplus(dt + bias), the D skip and
the silu(z) gate are fused in, so y and the input gradients are the only (B, L, D) tensors that move.

The math of one chunk (`forward_chunk`, `backward_chunk`) is written once, on values: a program keeps its
state as an fp32 array with the N states on the leading axis and its channels after it, and reads a row
(the channels), a column (N states, broadcast over the channels) and a reset of step i through a `ChunkIO`.
The platform modules (`scan_pallas_gpu`, `scan_pallas_tpu`) only say how a program reads and writes those,
and how the arrays map to the hardware (GPU: state (N, bD), one warp, one channel and its N states per
thread; TPU: state (N, 8, 128), a block of channels filling each register, columns from SMEM scalars).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from hymba_jax.ops.scan_chunked import PAD_DT, pad_time
from hymba_jax.parallel import kernel_mesh_axes

Array = jax.Array
LOG2E = math.log2(math.e)


class Canon(NamedTuple):
    """The kernels' inputs. x, dt, z (B, Lp, D) in their dtypes (z may be None); B, C (B, Lp, N);
    reset (B, Lp, 1) fp32 (1 where a document starts); A (N, D), D and bias (1, D) fp32; h0 (B, N, D) fp32,
    or None without an initial state (a model without meta tokens): documents then start from zeros and
    the kernels neither keep h0 nor sum its gradient. Lp is the length padded to a multiple of
    the chunk (padding steps leave the state unchanged)."""

    x: Array
    dt: Array
    z: Optional[Array]
    B: Array
    C: Array
    reset: Array
    A: Array
    D: Array
    bias: Array
    h0: Optional[Array]


class Kernels(NamedTuple):
    """A platform's kernels. forward(c, keep_starts) -> (y (B, Lp, D), starts, last (B, N, D)), where
    starts are the states at the chunk starts in the platform's layout (what its backward reads; a kernel
    may skip them, returning None, when keep_starts is False: no backward follows);
    backward(c, starts, dy, dlast) -> Canon of gradients (reset's is None, h0's too when c.h0 is)."""

    chunk: int
    forward: Callable
    backward: Callable


def fused_scan(kernels: Kernels, x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    """The `selective_scan` interface over a platform's kernels (see hymba_jax.ops.scan)."""
    f32 = jnp.float32
    batch, length, width = x.shape
    n = A.shape[1]
    h0 = None
    if initial_state is not None:
        h0 = jnp.broadcast_to(jnp.swapaxes(initial_state.astype(f32), 1, 2), (batch, n, width))
    reset = jnp.zeros((batch, length), f32) if reset is None else reset.astype(f32)
    bias = jnp.zeros((width,), f32) if dt_bias is None else dt_bias.astype(f32)
    x, dt, z, B, C, reset = pad_time(length, kernels.chunk, (x, 0), (dt, PAD_DT), (z, 0), (B, 0), (C, 0),
                                     (reset, 0))
    canon = Canon(x, dt, z, B, C, reset[..., None], A.astype(f32).T, D.astype(f32)[None],
                  bias[None], h0)
    y, last = _per_device(functools.partial(_fused, kernels), canon)
    return y[:, :length], jnp.swapaxes(last, 1, 2)


def _per_device(fn: Callable, c: Canon):
    """Run the kernels on each device's block of rows and channels.

    A Pallas kernel is one custom call that XLA cannot split, so under a multi-device mesh (inside
    `parallel.sharding_context`) the compiler would gather the whole batch onto every device and run the
    scan there in full. The scan is independent across rows and channels: shard_map runs it on the local
    block, rows split as the rules split 'batch' and channels as they split 'inner' (tensor parallelism).
    Outside a mesh, or on one device, fn runs as it is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(c)
    rows = kernel_mesh_axes("batch", (c.x.shape[0],), mesh)
    chans = kernel_mesh_axes("inner", (c.x.shape[2],), mesh)
    big, col, chan = PartitionSpec(rows, None, chans), PartitionSpec(rows, None, None), PartitionSpec(None, chans)
    specs = Canon(x=big, dt=big, z=None if c.z is None else big, B=col, C=col, reset=col, A=chan, D=chan,
                  bias=chan, h0=None if c.h0 is None else big)
    return jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=(big, big), check_vma=False)(c)


# Tracing a Pallas kernel costs a good fraction of a second; as jitted functions the kernels are traced
# once per shape and reused by every layer (the 1.5B step calls them 64 times).
@functools.partial(jax.jit, static_argnums=(0, 2))
def _forward(kernels: Kernels, c: Canon, keep_starts: bool):
    return kernels.forward(c, keep_starts)


@functools.partial(jax.jit, static_argnums=0)
def _backward(kernels: Kernels, c: Canon, starts, dy, dlast):
    return kernels.backward(c, starts, dy, dlast)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(kernels: Kernels, c: Canon):
    y, _, last = _forward(kernels, c, False)
    return y, last


def _fused_fwd(kernels: Kernels, c: Canon):
    y, starts, last = _forward(kernels, c, True)
    return (y, last), (c, starts)


def _fused_bwd(kernels: Kernels, res, cotangents):
    c, starts = res
    dy, dlast = cotangents
    return (_backward(kernels, c, starts, dy.astype(c.x.dtype), dlast.astype(jnp.float32)),)


_fused.defvjp(_fused_fwd, _fused_bwd)


# --------------------------------------------------------------------------------------------------
# The math of one chunk, on values. Rows are (1, bD), columns (N, 1), all fp32.

class ChunkIO(Protocol):
    has_z: bool
    keeps_states: bool      # the backward keeps each step's state for its walk back, rather than recomputing it

    def softplus(self, v: Array) -> Array: ...          # `softplus`, in the kernel's form (`fast_math`)
    def sigmoid(self, v: Array) -> Array: ...           # `sigmoid` likewise

    def row(self, name: str, i: int) -> Array: ...      # x, dt, z, dy
    def col(self, name: str, i: int) -> Array: ...      # B, C
    def starts(self, i: int) -> Optional[Array]: ...    # bool, broadcast: a document starts at step i;
                                                         # None: no document starts in this chunk
    def put_row(self, name: str, i: int, value: Array) -> None: ...   # y, dx, ddt, dz
    def fma(self, a: Array, b: Array, c: Array) -> Array: ...          # a * b + c, broadcast
    def state_dot(self, a: Array, b: Array) -> Array: ...              # sum over the states (axis 0) of a * b

    def put_sums(self, i: int, dC_terms: Array, dB_terms: Array) -> None:
        """Write step i's dC and dB: the sums over this program's channels of the state-shaped terms."""


def with_initial_state(c: Canon) -> Canon:
    """c with zeros for a missing initial state, for kernels written for one (their h0 gradient is then
    dropped: `Canon.h0`)."""
    if c.h0 is not None:
        return c
    return c._replace(h0=jnp.zeros((c.x.shape[0],) + c.A.shape, jnp.float32))


def fast_math(dtype) -> bool:
    """Whether kernels whose inputs x have `dtype` take the fast forms of exp, softplus and sigmoid: for
    inputs narrower than fp32. On a GPU exp2 is one instruction (MUFU ex2) where an exact exp takes about ten
    (a range reduction to extra precision around the same ex2), log1p a dozen more and a division a branch;
    a scan takes N exps per channel and step, and softplus and sigmoid once or twice. The fast forms' errors
    put the gradients a few 1e-6 from 'sequential' (dA; measured on the H200, docs/performance.md): a
    thousandth of a bf16 ulp, but above the 1e-6 that fp32 inputs keep with the exact functions. A platform's
    `ChunkIO.softplus` and `sigmoid` may keep the exact forms where the fast ones gain nothing (the TPU)."""
    return jnp.dtype(dtype) != jnp.float32


def exp2_rates(A: Array, dtype) -> Optional[Array]:
    """`decay`'s A_log2 for a kernel whose inputs x have `dtype`: A log2(e) where the kernel takes the fast
    forms (`fast_math`; the decays then take the hardware exp2), None for the exact exp."""
    return A * LOG2E if fast_math(dtype) else None


def decay(delta: Array, A: Array, A_log2: Optional[Array] = None) -> Array:
    """exp(delta A); with A_log2 (= A log2(e)) as exp2(delta A_log2) (see `exp2_rates`)."""
    return jnp.exp(delta * A) if A_log2 is None else jnp.exp2(delta * A_log2)


class Params(NamedTuple):
    """A program's share of the parameters: A (N, bD), D and bias (1, bD), h0 (N, bD) or None (`Canon.h0`),
    fp32; A_log2 = A log2(e) when the decays take exp2 (`exp2_rates`), else None."""

    A: Array
    D: Array
    bias: Array
    h0: Optional[Array]
    A_log2: Optional[Array]

    @classmethod
    def from_refs(cls, refs, initial_state: bool = True) -> "Params":
        """Read from a kernel's refs named A, D, bias, h0 if given and initial_state (each program's block),
        and x (its dtype). A kernel that reads h0 itself where it needs it passes initial_state=False."""
        A = refs["A"][...]
        h0 = refs["h0"][...] if initial_state and "h0" in refs else None
        return cls(A, refs["D"][...], refs["bias"][...], h0, exp2_rates(A, refs["x"].dtype))


def softplus(v, reciprocal: Optional[Callable] = None):
    """log(1 + e^v), fp32. With `reciprocal` (a kernel's 1/x, possibly approximate: `fast_math`), e^-|v| by
    exp2 and the log1p by `log1p_unit`; else the exact functions."""
    if reciprocal is None:
        return jnp.maximum(v, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(v)))
    return jnp.maximum(v, 0.0) + log1p_unit(jnp.exp2(-LOG2E * jnp.abs(v)), reciprocal)


def sigmoid(v, reciprocal: Optional[Callable] = None):
    """1 / (1 + e^-v), fp32; with `reciprocal` (as `softplus`), e^-v by exp2 and the division by it."""
    if reciprocal is None:
        return 1.0 / (1.0 + jnp.exp(-v))
    return reciprocal(1.0 + jnp.exp2(-LOG2E * v))


def log1p_unit(e, reciprocal: Callable):
    """log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) <= 1/3, by its series to s^13 (the next term
    is below 1.3e-8 of the sum), in Horner form: one reciprocal and eight multiply-adds, where a GPU's log1p
    reduces its argument first, and branches."""
    s = e * reciprocal(2.0 + e)
    t = s * s
    series = 1.0 / 13.0
    for k in (11, 9, 7, 5, 3, 1):
        series = series * t + 1.0 / k
    return 2.0 * s * series


def _load_step(io: ChunkIO, i: int, names: tuple[str, ...], cols: tuple[str, ...] = ("B", "C")) -> dict:
    step = {k: io.row(k, i) for k in names}
    step.update({k: io.col(k, i) for k in cols}, start=io.starts(i))
    return step


def restart(start: Optional[Array], h: Array, h0: Optional[Array]) -> Array:
    """The state entering a step: h, or where a document starts there h0 (zeros if None). start None: the
    chunk has no document start (`ChunkIO.starts`), so no select."""
    if start is None:
        return h
    return jnp.where(start, 0.0 if h0 is None else h0, h)


def forward_rows(has_z: bool) -> tuple[str, ...]:
    """The rows a forward step reads."""
    return ("x", "dt", "z") if has_z else ("x", "dt")


def load_rows(io: ChunkIO, steps: int, names: tuple[str, ...]) -> list[dict]:
    """Rows `names` of each of the chunk's steps, (1, bD) fp32."""
    return [{k: io.row(k, i) for k in names} for i in range(steps)]


def forward_chunk(io: ChunkIO, h: Array, p: Params, steps: int, rows: Optional[list[dict]] = None,
                  cols: Optional[Sequence[dict]] = None) -> Array:
    """Advance the (N, bD) state over `steps` positions, writing y; returns the state after them.

    All of a chunk's loads come first: they do not depend on the state, so their latency overlaps. rows,
    cols: the chunk's rows (`load_rows` of `forward_rows`) and B and C columns (`cols[i]["B"]`, indexed in
    step order) when the caller loads them itself: the GPU kernel loads the next chunk's rows before computing
    this one, as they come from HBM and their latency would otherwise stall every chunk, and each step's
    columns (from L2: every program of a row reads them) a few steps before it, across chunks."""
    if rows is None:
        rows = load_rows(io, steps, forward_rows(io.has_z))
    if cols is None:
        cols = [dict(B=io.col("B", i), C=io.col("C", i)) for i in range(steps)]
    starts = [io.starts(i) for i in range(steps)]
    for i in range(steps):
        s = dict(rows[i], **cols[i], start=starts[i])
        h = restart(s["start"], h, p.h0)
        delta = io.softplus(s["dt"] + p.bias)
        h = io.fma(decay(delta, p.A, p.A_log2), h, (delta * s["x"]) * s["B"])
        y = io.fma(p.D, s["x"], io.state_dot(h, s["C"]))
        if io.has_z:
            y = y * (s["z"] * io.sigmoid(s["z"]))
        io.put_row("y", i, y)
    return h


class Accum(NamedTuple):
    """Gradients a program sums over its positions: dA (N, bD); dD, dbias (1, bD); dh0 (N, bD), None
    without an initial state."""

    dA: Array
    dD: Array
    dbias: Array
    dh0: Optional[Array]


def backward_chunk(io: ChunkIO, h_start: Array, dh: Array, acc: Accum, p: Params, steps: int
                   ) -> tuple[Array, Accum]:
    """Gradients of one chunk. h_start: the state before it; dh: d loss / d (state after it).
    Writes dx, ddt, dz rows and dB, dC sums (this program's channels only); returns
    d loss / d h_start and the updated sums."""
    saved = []
    h = h_start
    for i in range(steps):                                   # recompute the chunk's states
        s = _load_step(io, i, ("x", "dt"), cols=("B",))
        hp = restart(s["start"], h, p.h0)
        delta = io.softplus(s["dt"] + p.bias)
        a = decay(delta, p.A, p.A_log2)
        h = io.fma(a, hp, (delta * s["x"]) * s["B"])
        # A GPU recomputes h on the way back (an FMA costs less than its registers); a TPU keeps it in VMEM
        # (v5p: 11% fewer backward bundles, docs/performance.md), `ChunkIO.keeps_states`.
        saved.append((hp, a, delta, h if io.keeps_states else None))
    # The walk back loads each step's inputs again rather than keeping them: on a GPU the loaded values
    # of a whole chunk would not fit in registers next to the saved states (nor would the next chunk's
    # rows: loading them ahead, as the forward does, made the kernel spill and run 1.4x slower).
    names = ("x", "dt", "z", "dy") if io.has_z else ("x", "dt", "dy")
    # d/d delta sums dh a h A over the states; with exp2 decays the rate array is A log2(e), and using it
    # there (times ln 2) spares the GPU kernel a second (N, bD) array of registers.
    rate, rate_scale = (p.A, 1.0) if p.A_log2 is None else (p.A_log2, math.log(2.0))
    dA, dD, dbias, dh0 = acc
    for i in reversed(range(steps)):
        s = _load_step(io, i, names)
        hp, a, delta, h = saved[i]
        x, dy = s["x"], s["dy"]
        u = delta * x
        if h is None:
            h = io.fma(a, hp, u * s["B"])
        if io.has_z:
            zs = io.sigmoid(s["z"])
            y_pre = io.fma(p.D, x, io.state_dot(h, s["C"]))
            io.put_row("dz", i, dy * y_pre * (zs * (1.0 + s["z"] * (1.0 - zs))))
            g = dy * (s["z"] * zs)
        else:
            g = dy
        dD = io.fma(g, x, dD)
        dh = io.fma(s["C"], g, dh)
        io.put_sums(i, h * g, dh * u)
        du = io.state_dot(dh, s["B"])
        dhp = dh * a
        q = dhp * hp
        dA = io.fma(q, delta, dA)
        dv = io.fma(io.state_dot(q, rate), rate_scale, du * x) * io.sigmoid(s["dt"] + p.bias)
        dbias = dbias + dv
        io.put_row("ddt", i, dv)
        io.put_row("dx", i, io.fma(du, delta, g * p.D))
        if s["start"] is None:              # no document starts in the chunk (`ChunkIO.starts`)
            dh = dhp
            continue
        if dh0 is not None:
            dh0 = dh0 + jnp.where(s["start"], dhp, 0.0)
        dh = jnp.where(s["start"], 0.0, dhp)
    return dh, Accum(dA, dD, dbias, dh0)


def require_powers_of_two(backend: str, **sizes: int) -> None:
    """A ValueError naming the backend's option that is not a power of two (kernel tile sizes)."""
    for name, value in sizes.items():
        if value < 1 or value & (value - 1):
            raise ValueError(f"{backend} {name}={value}: must be a power of two")


def channel_block(width: int, largest: int) -> int:
    """The largest power of two <= `largest` dividing `width` (kernels tile channels by it)."""
    block = largest
    while block > 1 and width % block:
        block //= 2
    return block
