"""The 'pallas_gpu' scan backend: the fused scan (see scan_fused) as Pallas kernels lowered through Triton.

Programs (row, channel block, time segment); each keeps its (N, bD) state in registers and runs a
`fori_loop` over chunks of `chunk` time steps. With one warp and bD = 32 (the defaults) Triton gives each
thread one channel and its N states, so the recurrence and the sums over
the state axis (y; the x and dt gradients) never leave the thread, and the backward's sums over channels
(dB, dC) are one reduce-scatter of warp shuffles per step (`_channel_sums`: 31 shuffles where Triton's
reductions took 160): no shared memory and no barrier in the per-step path. More warps per program spread
a tile's states across warps, and every step then pays cross-warp sums (measured in docs/performance.md).

The kernels are bound by latency and parallelism, not bytes, so both passes split time into segments run by
separate programs (`_segments`): the forward's programs start from the state entering their segment, found first by
a pass of the state recurrence alone over each earlier segment (`_segment_entries`), the backward's from the
adjoint at their segment's end, found likewise in reverse (`_segment_ends`); a small kernel carries the passes'
results across segments (`_through_segments`). The products of a segment's decays are one exp of its summed deltas
(`Span`). A forward without a backward on a grid of INFERENCE_GRID programs runs whole, on half that in two
segments (where they fit in one WAVE), its second segment's entry found from finer pieces that keep the state
pass's GPU busy. All but the backward kernel branch per chunk on whether a document starts in it (`_per_chunk`), so
most chunks run without restart selects. Multiply-adds are spelled out as fma instructions (`_fma`, `_state_dot`):
the Triton that jax uses contracts none. The backward kernel keeps neither the initial state nor its gradient in
registers: it reads h0 once per chunk, and the adjoint pass gathers the gradient from the adjoints entering the
document starts (`StartAdjoints`; 255 registers leave no room for either, and kept they made the kernel spill).
Rows are read straight from global memory at (t, channel block), so nothing but y (forward) and the input gradients
(backward) crosses memory at (B, L, D) size; the forward writes the state once per chunk, and only when a backward
pass follows. The forward loads the next chunk's rows before computing the current one: with six one-warp programs
per SM (8 x 2048 x 3200) nothing else hides their HBM latency, and Nsight Compute put half of the forward's stalls
on them. The backward does not: carrying its four rows per step through the loop made it spill and run 1.4x
slower (H200, docs/performance.md). The forward and the entry-state pass load each step's B and C columns (from
L2) a few steps ahead, across chunks (`_Columns`): each thread holds whole columns, so a chunk's at once made the
forward spill, and each at its step left the L2's latency exposed. dB and dC are summed over channel blocks
outside the kernel (one (B, L, 2N) partial per block). `interpret=True` runs the same kernels on the CPU (tests).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hymba_jax.ops.scan import register_backend
from hymba_jax.ops.scan_fused import Accum, Canon, Kernels, Params, backward_chunk, channel_block, decay, \
    fast_math, forward_chunk, forward_rows, fused_scan, load_rows, require_powers_of_two, restart, sigmoid, \
    softplus, with_initial_state

try:  # the Triton compiler parameters (absent from some jaxlib builds; not needed in interpret mode)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

T = TypeVar("T")

CHUNK = 4              # H200, 8 x 2048 x 3200: fastest forward+backward (docs/performance.md)
INFERENCE_CHUNK = 8    # fastest forward alone (1.25 ms against 1.60 at 4)
BLOCK_D = 32
NUM_WARPS = 1
# The backward splits time into segments run by separate programs until its grid has this many programs
# (`_segments`). H200, forward+backward, d_inner 3200, with the meta tokens' initial state (docs/performance.md,
# 2026-12-04): 8 x 2048 (800 programs a segment) 4.56 / 4.44 / 4.57 ms at 8 / 16 / 32 segments, 4 x 4096 (400)
# 4.47 / 4.60 at 32 / 64: short programs, many waves.
SEGMENT_GRID = 12800
# The forward splits time likewise (`_forward`), a pass finding each segment's entry state first. H200, d_inner
# 3200 (docs/performance.md, 2026-12-03, evening; kernel times from a profile): the forward keeping states at
# 8 x 2048 1.22 ms whole against 1.13 in 8 segments (0.73 + 0.41 for the entry states), forward+backward at
# 4 x 4096 6.07 against 5.04 in 16.
FORWARD_SEGMENT_GRID = 6400
# A forward without a backward runs whole on grids of INFERENCE_GRID programs or more, and in two segments on
# grids of half as many whose two segments fit in one WAVE, its second segment's entry state found from
# FORWARD_SEGMENT_GRID pieces of the first (`_segment_entries`); on other grids in those pieces, as with a
# backward. Long segments run slower per step, which pays only where it spares half the entry pass and adds no
# second wave. H200 (docs/performance.md, 2026-12-04, evening), forward alone: 8 x 2048 (800 programs) 0.72 ms
# whole; 4 x 4096 0.932 in 2 segments against 0.978 in 16 (kernels 0.661 + 0.205 for the entry states against
# 0.569 + 0.345), 5 x 4096 1.014 against 1.237; 6 x 4096 (1200 programs in 2 segments, two waves) 1.722
# against 1.488 in 16; 2 x 4096 and 1 x 8192 0.563 and 0.598 in 4 and 8 segments against 0.534 and 0.569 in
# 32 and 64.
INFERENCE_GRID = 800
# Programs the H200 runs at once: 132 SMs x 8 (the forward alone's 241 registers leave room for 8 one-warp
# programs).
WAVE = 1056
# How many steps ahead of its use each pass loads a step's B and C columns (`_Columns`): the forward keeping
# states (chunks of CHUNK), the forward alone (INFERENCE_CHUNK) and the entry-state pass. H200, 4 x 4096 x 3200
# (docs/performance.md, 2026-12-04, night), kernel times: the forward keeping states 0.646 ms at 3 against
# 0.746 with each chunk's columns loaded at its start (243 registers), 0.889 / 0.679 at 2 / 4; the forward
# alone 0.655 at 2 against 0.659 (255 registers and spills), 0.685 / 0.700 at 3 / 4, 0.94 loading each
# column at its step (168 registers, no spills: the L2's latency exposed); the entry pass of
# forward+backward 0.359 at 2 against 0.400 loading at the step. The adjoint pass loads at the step: ahead
# it ran slower (0.473 / 0.599 / 0.557 ms at 2 / 1 / 4 against 0.418).
COLUMN_LOOKAHEAD = 3
INFERENCE_COLUMN_LOOKAHEAD = 2
ENTRY_COLUMN_LOOKAHEAD = 2


class _IO:
    """Row/column access of one program at chunk offset t0, and its multiply-adds (`fma`, `state_dot`).
    Refs: rows (Lp, bD), columns (Lp, N, 1), resets (Lp, 1). restarts False: no document starts in this
    chunk (`_per_chunk`), so `starts` is None. scatter: a backward writes dB and dC as one reduce-scattered
    row per step (`_channel_sums`) to "dBC", else as columns to "dB" and "dC"; misplaced carries that
    function's layout check."""

    keeps_states = False        # registers: the backward recomputes each state on its walk back

    def __init__(self, refs: dict, t0, has_z: bool, *, restarts: bool = True, scatter: bool = False,
                 interpret: bool = False, misplaced=None):
        self.refs, self.t0, self.has_z, self.restarts = refs, t0, has_z, restarts
        self.scatter, self.interpret, self.misplaced = scatter, interpret, misplaced
        self.fast = fast_math(refs["x"].dtype)

    def row(self, name, i):
        return self.refs[name][pl.ds(self.t0 + i, 1), :].astype(jnp.float32)

    def col(self, name, i):
        return self.refs[name][self.t0 + i].astype(jnp.float32)

    def starts(self, i):
        if not self.restarts:
            return None
        return self.refs["reset"][pl.ds(self.t0 + i, 1), :] > 0

    def put_row(self, name, i, value):
        ref = self.refs[name]
        ref[pl.ds(self.t0 + i, 1), :] = value.astype(ref.dtype)

    def fma(self, a, b, c):
        return _fma(a, b, c, self.interpret)

    def softplus(self, v):
        return softplus(v, self.reciprocal if self.fast else None)

    def sigmoid(self, v):
        return sigmoid(v, self.reciprocal if self.fast else None)

    def reciprocal(self, v):
        """1 / v by one `rcp.approx.ftz.f32` (MUFU rcp, within an ulp), where a division is a Newton iteration
        around it and a branch for large and tiny v; 1 / v in interpret mode. For the fast forms only
        (`fast_math`)."""
        if self.interpret:
            return 1.0 / v
        return _asm("rcp.approx.ftz.f32 $0, $1;", "=f,f", [v], jnp.float32)

    def state_dot(self, a, b):
        return _state_dot(a, b, self.fma)

    def put_sums(self, i, dC_terms, dB_terms):
        if self.scatter:
            sums, misplaced = _channel_sums(dC_terms, dB_terms, self.interpret)
            self.put_row("dBC", i, sums)
            self.misplaced = self.misplaced | misplaced
            return
        for name, terms in (("dC", dC_terms), ("dB", dB_terms)):
            self.refs[name][self.t0 + i] = jnp.sum(terms, axis=1, keepdims=True)


def _asm(code: str, constraints: str, args: list, dtype):
    """One PTX instruction per element (Triton inline asm), its result of `dtype` shaped as args[0]."""
    [out] = plgpu.elementwise_inline_asm(code, args=args, constraints=constraints, pack=1,
                                         result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, dtype)])
    return out


def _fma(a, b, c, interpret: bool):
    """a * b + c, broadcast, fp32, as one `fma.rn.f32` (one rounding). The H200's jax 0.11 compiles Pallas
    kernels with Triton's FP fusion off, so a multiply and an add stay two instructions there (Nsight Compute,
    the backward: 39M FFMA against 439M FMUL and 281M FADD executed); spelled out, each is one (the forward
    6-8% faster, docs/performance.md, 2026-12-03, late). Interpret mode: a * b + c."""
    if interpret:
        return a * b + c
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b), jnp.shape(c))
    args = [jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape) for v in (a, b, c)]
    return _asm("fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f", args, jnp.float32)


def _state_dot(a, b, fma):
    """The sum over the state axis (0) of a * b, each (N, bD) or an (N, 1) column, as (1, bD): the products
    of up to four blocks of rows chained by fma, then the rows of that block summed as a tree. At N = 16: 4
    multiplies, 12 fma and 3 adds, the longest chain 6 deep, where `jnp.sum(a * b, axis=0)` is 16 multiplies
    and a chain of 15 adds (a thread's elements are summed in order, and nothing contracts them)."""
    shape = jnp.broadcast_shapes(a.shape, b.shape)        # a (N, 1) column split alone gets loaded unvectorized
    parts = min(4, shape[0])
    a_parts, b_parts = (jnp.split(jnp.broadcast_to(v, shape), parts, axis=0) for v in (a, b))
    acc = a_parts[0] * b_parts[0]
    for a_part, b_part in zip(a_parts[1:], b_parts[1:]):
        acc = fma(a_part, b_part, acc)
    while acc.shape[0] > 1:
        low, high = jnp.split(acc, 2, axis=0)
        acc = low + high
    return acc


def _shuffle_xor(v, mask: int, interpret: bool):
    """Each lane's v from lane (its own XOR mask), by one `shfl.sync.bfly` per register. The lanes are
    the channel axis (axis 1) of a one-warp program's tiles; interpret mode permutes that axis instead."""
    if interpret:
        return jnp.take(v, jnp.arange(v.shape[1]) ^ mask, axis=1)
    return _asm(f"shfl.sync.bfly.b32 $0, $1, {mask}, 0x1f, -1;", "=f,f", [v], v.dtype)


def _misplaced(v, interpret: bool):
    """(1, bD) int32: 1 where some element of v's column is not held by the lane of that column's index
    (Triton chose another layout for v: the lane of each element, read by the same kind of elementwise op
    as the shuffles, against its column). All zeros in interpret mode."""
    if interpret:
        return jnp.zeros((1, v.shape[1]), jnp.int32)
    column = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
    lane = _asm("mov.u32 $0, %laneid;", "=r,f", [v], jnp.int32)
    return jnp.max((lane != column).astype(jnp.int32), axis=0, keepdims=True)


def _channel_sums(p_terms, q_terms, interpret: bool):
    """The sums over channels (axis 1) of two (N, bD) tiles with 2N = bD, as one (1, bD) row: element j
    is sum(p_terms[j]) for j < N, then sum(q_terms[j - N]); and a (1, bD) int32 row, nonzero if the
    tiles were not laid out one channel per lane (`_misplaced`; the sums are then wrong).

    A reduce-scatter: each round of shuffles halves the values a lane keeps, 2N - 1 shuffles in all,
    where `jnp.sum` over the lanes takes log2(bD) for each of the 2N values (2N = bD = 32: 31 against
    160 per step, PTX from Triton 3.9). Triton does lay these tiles out one channel per lane (TTGIR,
    docs/performance.md), but nothing in Pallas promises it, hence the check."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, p_terms.shape[1]), 1)
    half = p_terms.shape[1] // 2
    upper = lane >= half
    send = jnp.where(upper, p_terms, q_terms)
    misplaced = _misplaced(send, interpret)
    sums = jnp.where(upper, q_terms, p_terms) + _shuffle_xor(send, half, interpret)
    while sums.shape[0] > 1:
        half //= 2
        low, high = jnp.split(sums, 2, axis=0)
        upper = (lane & half) != 0
        send = jnp.where(upper, low, high)
        misplaced = misplaced | _misplaced(send, interpret)
        sums = jnp.where(upper, high, low) + _shuffle_xor(send, half, interpret)
    return sums, misplaced


def _specs(length: int, n: int, block: int):
    row = pl.BlockSpec((None, length, block), lambda b, j: (b, 0, j))
    col = pl.BlockSpec((None, length, n, 1), lambda b, j: (b, 0, 0, 0))
    flag = pl.BlockSpec((None, length, 1), lambda b, j: (b, 0, 0))
    param = pl.BlockSpec((n, block), lambda b, j: (0, j))
    vec = pl.BlockSpec((1, block), lambda b, j: (0, j))
    state = pl.BlockSpec((None, n, block), lambda b, j: (b, 0, j))
    return row, col, flag, param, vec, state


def triton_call(name, kernel, names_in, names_out, out_shape, in_specs, out_specs, grid, cfg):
    """pallas_call of `kernel(refs)`, its refs by name (inputs, then outputs); Triton's warps from
    cfg["num_warps"]; cfg["interpret"] runs it in the Pallas interpreter."""
    def body(*refs):
        kernel(dict(zip(names_in + names_out, refs)))

    params = None
    if plgpu is not None and not cfg["interpret"]:
        params = plgpu.CompilerParams(num_warps=cfg["num_warps"], num_stages=1)
    return pl.pallas_call(body, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          compiler_params=params, interpret=cfg["interpret"], name=name)


def _inputs(c: Canon, chunk: int | None = None):
    """Kernel operands: columns get a trailing unit axis so one step's column loads as (N, 1). They are
    passed in fp32: every thread reads the whole column, so converting them here saves each thread 2N
    conversions per step (H200, 8 x 2048: forward 0.97 ms against 1.06 with bf16 columns). With a chunk,
    also chunk_starts (B, Lp / chunk, 1): 1 where a document starts in a chunk of that many steps
    (`_per_chunk`)."""
    names = (["x", "dt"] + (["z"] if c.z is not None else []) + ["B", "C", "reset"]
             + (["chunk_starts"] if chunk else []) + ["A", "D", "bias"] + (["h0"] if c.h0 is not None else []))
    f32 = jnp.float32
    values = dict(c._asdict(), B=c.B.astype(f32)[..., None], C=c.C.astype(f32)[..., None])
    if chunk:
        batch, length, _ = c.reset.shape
        values["chunk_starts"] = c.reset.reshape(batch, length // chunk, chunk).max(-1, keepdims=True)
    return names, [values[k] for k in names]


def _in_specs(names, length, n, block, chunk: int | None = None):
    row, col, flag, param, vec, state = _specs(length, n, block)
    kinds = dict(x=row, dt=row, z=row, dy=row, B=col, C=col, reset=flag, A=param, D=vec, bias=vec, h0=state)
    if chunk:
        kinds["chunk_starts"] = pl.BlockSpec((None, length // chunk, 1), lambda b, j: (b, 0, 0))
    return [kinds[k] for k in names]


def _per_chunk(refs, chunk_index, chunk: int, has_z: bool, interpret: bool, step: Callable[[_IO], T]) -> T:
    """step(io) for chunk `chunk_index` (of `chunk` steps) of the program's row, io with restarts False
    where no document starts in it (chunk_starts, `_inputs`), as in most chunks of a packed batch: that
    code has no restart selects. A branch on the row's flag, the same for the whole program. The forward,
    the entry-state pass and the adjoint pass take it (H200, with an initial state: forward alone at 4 x
    4096 1.27 -> 1.09 ms, the two passes 9-16% faster); the backward kernel does not: with the branch it
    ran 3.76 ms against 3.19, also with its initial state and that gradient kept in memory and the flag
    loaded a chunk ahead (docs/performance.md, 2026-12-03, night)."""
    def on(restarts: bool):
        return step(_IO(refs, chunk_index * chunk, has_z, restarts=restarts, interpret=interpret))

    return jax.lax.cond(refs["chunk_starts"][chunk_index, 0] > 0, lambda: on(True), lambda: on(False))


def _block(cfg, width: int) -> int:
    """Channels per program: cfg's block_d, else BLOCK_D (one channel per lane), the largest power of two
    up to it dividing width."""
    return channel_block(width, cfg["block_d"] or BLOCK_D)


def _chunk_io(refs, first, count: int, chunk: int, has_z: bool):
    """io_of(k): the `_IO` of chunk first + k of a walk over `count` chunks, for loads ahead of the chunk's
    arithmetic; past the walk's end its last chunk's (the last look-ahead is unused)."""
    def io_of(k):
        return _IO(refs, (first + jnp.minimum(k, count - 1)) * chunk, has_z)

    return io_of


class _Columns:
    """A chunk's columns `names` (B, C: (N, 1) each) by step, each loaded `len(first)` steps before the step
    that reads it, those of the chunk's last steps reaching into the next chunk (`next_io`). first: the
    columns of the chunk's first steps, loaded by the chunk before (`first_of` before the first chunk);
    after the walk, `next` holds the next chunk's. Indexed once per step, in step order. Every thread holds
    whole columns, 2N registers a step, so how far ahead trades registers against the L2's latency
    (`COLUMN_LOOKAHEAD`)."""

    def __init__(self, io: _IO, next_io: _IO, first: list[dict], steps: int, names: tuple[str, ...]):
        self.io, self.next_io, self.steps, self.names = io, next_io, steps, names
        self.ahead, self.loaded, self.next = len(first), dict(enumerate(first)), []

    @staticmethod
    def load(io: _IO, i: int, names: tuple[str, ...]) -> dict:
        return {k: io.col(k, i) for k in names}

    @classmethod
    def first_of(cls, io: _IO, ahead: int, steps: int, names: tuple[str, ...]) -> list[dict]:
        return [cls.load(io, i, names) for i in range(min(ahead, steps))]

    def __getitem__(self, i: int) -> dict:
        for j in (i, i + self.ahead):
            if j >= self.steps:
                self.next.append(self.load(self.next_io, j - self.steps, self.names))
            elif j not in self.loaded:
                self.loaded[j] = self.load(self.io, j, self.names)
        return self.loaded[i]


def _forward(c: Canon, keep_starts: bool, cfg):
    """The forward kernel, over a grid (rows, channel blocks, time segments): each program runs its segment's
    chunks from the state at the segment's start (`_segment_entries`), writing y, the chunk-start states
    when keep_starts (a backward follows), and, in the last segment, the last state."""
    batch, length, width = c.x.shape
    # The forward selects against h0 zeros rather than specializing on a missing initial state: it has the
    # registers, and the specialized kernel ran slower (H200, 8 x 2048: 0.90 against 0.79 ms alone).
    c = with_initial_state(c)
    n = c.A.shape[0]
    # Without a backward pass there are no chunk-start states to keep, so the loop can unroll further.
    chunk = cfg["chunk"] if keep_starts else cfg["inference_chunk"]
    n_chunks = length // chunk
    block, pieces = _segments(cfg, batch, width, n_chunks, "forward_")
    segments = pieces if keep_starts else _inference_segments(cfg, batch * (width // block), pieces)
    per_segment = n_chunks // segments
    has_z = c.z is not None
    names_in, operands = _inputs(c, chunk)
    names_in = names_in + ["entry"]
    operands = operands + [_segment_entries(c, cfg, chunk, block, segments, pieces)]
    row, _, _, _, _, state = _specs(length, n, block)
    split = pieces // segments          # `_segment_entries` gives the state entering every piece
    by_segment = pl.BlockSpec((None, None, n, block), lambda b, j, s: (b, s * split, 0, j))
    in_specs = [_lift(spec) for spec in _in_specs(names_in[:-1], length, n, block, chunk)] + [by_segment]
    starts_spec = pl.BlockSpec((None, n_chunks, n, block), lambda b, j, s: (b, 0, 0, j))
    names_out = ["y"] + (["starts"] if keep_starts else []) + ["last"]
    shapes = dict(y=(c.x.shape, c.x.dtype), starts=((batch, n_chunks, n, width), jnp.float32),
                  last=((batch, n, width), jnp.float32))
    specs = dict(y=_lift(row), starts=starts_spec, last=_lift(state))

    def kernel(refs):
        p = Params.from_refs(refs)
        segment = _segment_index(segments)
        first = segment * per_segment
        io_of = _chunk_io(refs, first, per_segment, chunk, has_z)
        rows_of = lambda k: load_rows(io_of(k), chunk, forward_rows(has_z))

        def body(k, carry):
            h, rows, cols = carry
            if keep_starts:
                refs["starts"][first + k] = h
            ahead = rows_of(k + 1)       # issued before this chunk's arithmetic, which hides their latency

            def step(io):
                columns = _Columns(io, io_of(k + 1), cols, chunk, ("B", "C"))
                return forward_chunk(io, h, p, chunk, rows, columns), columns.next

            h, cols = _per_chunk(refs, first + k, chunk, has_z, cfg["interpret"], step)
            return h, ahead, cols

        lookahead = cfg["column_lookahead" if keep_starts else "inference_column_lookahead"]
        cols = _Columns.first_of(io_of(0), lookahead, chunk, ("B", "C"))
        h, _, _ = jax.lax.fori_loop(0, per_segment, body, (refs["entry"][...], rows_of(0), cols))

        @pl.when(segment == segments - 1)
        def _():
            refs["last"][...] = h

    outs = _segmented_call("selective_scan_forward", kernel, names_in, names_out,
                           tuple(jax.ShapeDtypeStruct(*shapes[k]) for k in names_out), in_specs,
                           [specs[k] for k in names_out], batch, width // block, segments, cfg)(*operands)
    outs = dict(zip(names_out, outs))
    return outs["y"], outs.get("starts"), outs["last"]


def _inference_segments(cfg, programs: int, pieces: int) -> int:
    """Time segments of a forward without a backward on a grid of `programs` (row, channel block) programs,
    its entry-state pass cut into `pieces`: one from cfg's inference_grid programs; two from half that, while
    they fit in one of cfg's waves; else the pieces (`INFERENCE_GRID`)."""
    if programs >= cfg["inference_grid"]:
        return 1
    if cfg["inference_grid"] <= 2 * programs <= cfg["wave"]:
        return min(2, pieces)
    return pieces


class Span(NamedTuple):
    """What the product of a run of steps' decays needs: the sum of their deltas (1, bD) and whether a
    document starts in the run (1, 1), fp32. `Span.decays` multiplies them out once per segment rather than
    once per step: 2N instructions per step fewer (the product and its reset select)."""

    deltas: jax.Array
    restarts: jax.Array

    @classmethod
    def empty(cls, p: Params) -> "Span":
        return cls(jnp.zeros_like(p.D), jnp.zeros((1, 1), jnp.float32))

    def add(self, delta, start) -> "Span":
        """The span one step longer; start: whether a document starts at the step, None if not (`_IO.starts`)."""
        return Span(self.deltas + delta, self.restarts if start is None else jnp.where(start, 1.0, self.restarts))

    def decays(self, p: Params):
        """(N, bD): the product of the run's decays exp(delta_t A), zero if a document starts in it."""
        return jnp.where(self.restarts > 0, 0.0, decay(self.deltas, p.A, p.A_log2))


def state_chunk(io: _IO, h, span: Span, p: Params, steps: int, rows: list[dict], cols):
    """The state recurrence alone over one chunk (no y): h <- a_t h + delta_t x_t B_t, from h0 where a
    document starts, and the chunk's `Span`: the state after the chunk = span.decays * (the state before
    it) + (this h, from h = 0). rows: the chunk's x and dt rows; cols: its B columns (`_Columns`)."""
    for i in range(steps):
        start = io.starts(i)
        delta = io.softplus(rows[i]["dt"] + p.bias)
        h = io.fma(decay(delta, p.A, p.A_log2), restart(start, h, p.h0), (delta * rows[i]["x"]) * cols[i]["B"])
        span = span.add(delta, start)
    return h, span


def _through_segments(first, decays, sums, cfg, block: int, reverse: bool = False, skip: int = 0):
    """(B, S, N, D): first (B, N, D), then each next state = decays[:, k] * state + sums[:, k] over the
    segments' decay products and sums (B, skip + S - 1, N, D), their first `skip` entries not taken;
    reverse builds from the end (first is the last state). One program per (row, channel block) walks the
    segments, each one's tiles loaded a step ahead. (In XLA the same recurrence became one concatenation
    that recomputes every state's chain from the first: 0.04-0.09 ms where its bytes take 0.02, H200.)"""
    batch, total, n, width = decays.shape
    count = total - skip
    if count == 0:
        return first[:, None]
    index = (lambda k: skip + count - 1 - k) if reverse else (lambda k: skip + k)

    def kernel(refs):
        def load(k):
            i = index(jnp.minimum(k, count - 1))
            return refs["decays"][i], refs["sums"][i]

        def body(k, carry):
            h, (a, b) = carry
            ahead = load(k + 1)
            h = _fma(a, h, b, cfg["interpret"])
            refs["states"][count - 1 - k if reverse else k + 1] = h
            return h, ahead

        h = refs["first"][...]
        refs["states"][count if reverse else 0] = h
        jax.lax.fori_loop(0, count, body, (h, load(0)))

    state = pl.BlockSpec((None, n, block), lambda b, j: (b, 0, j))
    stack = lambda size: pl.BlockSpec((None, size, n, block), lambda b, j: (b, 0, 0, j))
    return triton_call("selective_scan_segment_carry", kernel, ["first", "decays", "sums"], ["states"],
                       jax.ShapeDtypeStruct((batch, count + 1, n, width), jnp.float32),
                       [state, stack(total), stack(total)], stack(count + 1), (batch, width // block),
                       cfg)(first, decays, sums)


def _segment_entries(c: Canon, cfg, chunk: int, block: int, segments: int, pieces: int):
    """The state entering each of `pieces` time pieces (a multiple of segments) up to the last segment's first,
    (B, pieces - pieces / segments + 1, N, D), so that every (pieces / segments)-th enters a segment: h0 for
    the first; for the others, from the piece before it alone (`state_chunk`, one program per (row, channel
    block, piece), all at once) carried forward through the pieces' decay products. One segment: (B, 1, N, D),
    h0."""
    if segments == 1:
        return c.h0[:, None]
    batch, length, width = c.x.shape
    n = c.A.shape[0]
    split = pieces // segments
    count = pieces - split                    # the pieces before the last segment
    per_piece = length // chunk // pieces
    has_z = c.z is not None
    names_in, operands = _inputs(c, chunk)
    in_specs = [_lift(spec) for spec in _in_specs(names_in, length, n, block, chunk)]
    out = pl.BlockSpec((None, None, n, block), lambda b, j, s: (b, s, 0, j))
    shape = jax.ShapeDtypeStruct((batch, count, n, width), jnp.float32)

    def kernel(refs):
        p = Params.from_refs(refs)
        first = _segment_index(count) * per_piece        # the piece whose end this finds
        io_of = _chunk_io(refs, first, per_piece, chunk, has_z)
        rows_of = lambda k: load_rows(io_of(k), chunk, ("x", "dt"))

        def body(k, carry):
            h, span, rows, cols = carry
            ahead = rows_of(k + 1)

            def step(io):
                columns = _Columns(io, io_of(k + 1), cols, chunk, ("B",))
                return state_chunk(io, h, span, p, chunk, rows, columns) + (columns.next,)

            h, span, cols = _per_chunk(refs, first + k, chunk, has_z, cfg["interpret"], step)
            return h, span, ahead, cols

        cols = _Columns.first_of(io_of(0), cfg["entry_column_lookahead"], chunk, ("B",))
        h, span, _, _ = jax.lax.fori_loop(0, per_piece, body, (jnp.zeros_like(p.A), Span.empty(p), rows_of(0), cols))
        refs["sums"][...] = h
        refs["decays"][...] = span.decays(p)

    sums, decays = _segmented_call("selective_scan_segment_states", kernel, names_in, ["sums", "decays"],
                                   (shape, shape), in_specs, (out, out), batch, width // block, count,
                                   cfg)(*operands)
    return _through_segments(c.h0, decays, sums, cfg, block)


def _segmented_call(name, kernel, names_in, names_out, out_shape, in_specs, out_specs, batch: int, blocks: int,
                    segments: int, cfg):
    """`triton_call` over programs (row, channel block, time segment), the specs' index maps taking (b, j, s);
    kernels read their segment by `_segment_index`. The grid is (rows, channel blocks, segments), without
    the last axis for one segment. H200 (docs/performance.md, 2026-12-03, evening): with a third axis of size one
    the forward ran 1.4x slower (1.105 against 0.785 ms at 8 x 2048), and flattening the segments into the
    rows axis made forward+backward 4% slower (4.90 against 4.70 ms)."""
    if segments > 1:
        grid = (batch, blocks, segments)
    else:
        grid = (batch, blocks)
        in_specs, out_specs = ([pl.BlockSpec(spec.block_shape, functools.partial(_first_segment, spec.index_map))
                                for spec in specs] for specs in (in_specs, out_specs))
    return triton_call(name, kernel, names_in, names_out, out_shape, in_specs, tuple(out_specs), grid, cfg)


def _first_segment(index_map, b, j):
    return index_map(b, j, 0)


def _segment_index(segments: int):
    return pl.program_id(2) if segments > 1 else 0


def _lift(spec: pl.BlockSpec) -> pl.BlockSpec:
    """A (batch, channel block) spec for a grid with a third axis (time segments) it does not depend on."""
    return pl.BlockSpec(spec.block_shape, lambda b, j, s: spec.index_map(b, j))


def _segments(cfg, batch: int, width: int, n_chunks: int, kind: str = "") -> tuple[int, int]:
    """Channels per program (`_block`) and time segments of the backward (kind "") or the forward (kind
    "forward_"): cfg's `kind`segments where given, else the fewest, a power of two dividing the chunks,
    that make cfg's `kind`segment_grid programs."""
    block = _block(cfg, width)
    segments = cfg[kind + "segments"]
    if segments is None:
        segments = 1
        while (batch * (width // block) * segments < cfg[kind + "segment_grid"]
               and n_chunks % (2 * segments) == 0):
            segments *= 2
    if n_chunks % segments:
        raise ValueError(f"pallas_gpu {kind}segments={segments}: must divide the {n_chunks} chunks")
    return block, segments


class StartAdjoints(NamedTuple):
    """What a segment's adjoint pass gathers for the gradient of the initial state, the sum of the adjoints
    entering the document starts (`_segment_ends`): `local` (N, bD), that sum over the segment's starts with
    the adjoint from zero at the segment's end; `to_start` (1, bD), the deltas summed from the segment's end
    back through its last start, so the adjoint from beyond the segment reaches that start decayed by
    exp(to_start A) (and no earlier start)."""

    local: jax.Array
    to_start: jax.Array

    @classmethod
    def empty(cls, p: Params) -> "StartAdjoints":
        return cls(jnp.zeros_like(p.A), jnp.zeros_like(p.D))


def adjoint_chunk(io: _IO, dh, span: Span, p: Params, steps: int, at_starts: StartAdjoints | None = None):
    """The adjoint recurrence alone over one chunk, walking back: dh <- a_t (dh + C_t g_t), zero where a
    document starts (what `backward_chunk` carries from step to step), and the chunk's `Span`: dh before
    the chunk = span.decays * (dh after it) + (this dh, from dh = 0). at_starts (with an initial state): the
    `StartAdjoints` so far, returned updated (else None)."""
    names = ("dt", "z", "dy") if io.has_z else ("dt", "dy")
    rows = load_rows(io, steps, names)
    starts = [io.starts(i) for i in range(steps)]
    for i in reversed(range(steps)):
        s = rows[i]
        g = s["dy"] * (s["z"] * io.sigmoid(s["z"])) if io.has_z else s["dy"]
        delta = io.softplus(s["dt"] + p.bias)
        dh = io.fma(io.col("C", i), g, dh) * decay(delta, p.A, p.A_log2)
        walked = span.add(delta, starts[i])
        if starts[i] is not None:
            if at_starts is not None:
                last_start = jnp.logical_and(starts[i], span.restarts == 0)     # the first met walking back
                at_starts = StartAdjoints(at_starts.local + jnp.where(starts[i], dh, 0.0),
                                          jnp.where(last_start, walked.deltas, at_starts.to_start))
            dh = jnp.where(starts[i], 0.0, dh)
        span = walked
    return dh, span, at_starts


def _segment_ends(c: Canon, dy, dlast, cfg, block: int, segments: int):
    """d loss / d (state at the end of each time segment), (B, segments, N, D), and with an initial state
    its gradient (B, N, D), else None. The last segment's end is dlast; the others come from the next
    segment's adjoint alone (`adjoint_chunk`, one program per (row, channel block, segment), all segments
    at once) carried back through the segments' decay products. With an initial state every segment runs
    (its first one too): the initial state's gradient is the adjoint entering the sequence plus those
    entering the document starts (`StartAdjoints`), gathered here so the backward kernel keeps neither in
    registers."""
    batch, length, width = c.x.shape
    n = c.A.shape[0]
    has_h0 = c.h0 is not None
    if segments == 1 and not has_h0:
        return dlast[:, None], None
    first = 0 if has_h0 else 1                  # the first segment whose start a program finds
    chunk, has_z = cfg["chunk"], c.z is not None
    per_segment = length // chunk // segments
    names_in, operands = _inputs(c, chunk)
    names_in, operands = names_in + ["dy"], operands + [dy]
    row = _specs(length, n, block)[0]
    in_specs = [_lift(spec) for spec in _in_specs(names_in[:-1], length, n, block, chunk)] + [_lift(row)]
    out = pl.BlockSpec((None, None, n, block), lambda b, j, s: (b, s, 0, j))
    names_out = ["sums", "decays"] + (["start_sums", "start_decays"] if has_h0 else [])
    shape = jax.ShapeDtypeStruct((batch, segments - first, n, width), jnp.float32)

    def kernel(refs):
        p = Params.from_refs(refs, initial_state=False)
        segment = _segment_index(segments - first) + first

        def body(k, carry):
            chunk_index = (segment + 1) * per_segment - 1 - k
            dh, span, at_starts = carry
            return _per_chunk(refs, chunk_index, chunk, has_z, cfg["interpret"],
                              lambda io: adjoint_chunk(io, dh, span, p, chunk, at_starts))

        at_starts = StartAdjoints.empty(p) if has_h0 else None
        dh, span, at_starts = jax.lax.fori_loop(0, per_segment, body, (jnp.zeros_like(p.A), Span.empty(p), at_starts))
        refs["sums"][...] = dh
        refs["decays"][...] = span.decays(p)
        if has_h0:
            refs["start_sums"][...] = at_starts.local
            refs["start_decays"][...] = jnp.where(span.restarts > 0, decay(at_starts.to_start, p.A, p.A_log2), 0.0)

    outs = dict(zip(names_out, _segmented_call(
        "selective_scan_segment_adjoints", kernel, names_in, names_out, (shape,) * len(names_out), in_specs,
        (out,) * len(names_out), batch, width // block, segments - first, cfg)(*operands)))
    sums, decays = outs["sums"], outs["decays"]
    # From segment 1 on: the first segment's start ends no segment.
    ends = _through_segments(dlast, decays, sums, cfg, block, reverse=True, skip=1 - first)
    if not has_h0:
        return ends, None
    entering = decays[:, 0] * ends[:, 0] + sums[:, 0]
    return ends, entering + (outs["start_sums"] + outs["start_decays"] * ends).sum(1)


def _backward(c: Canon, starts, dy, dlast, cfg):
    """The backward kernel, over a grid (rows, channel blocks, time segments): each program walks its
    segment's chunks in reverse from the adjoint at the segment's end (`_segment_ends`), so a grid of a
    few rows still has enough programs (4 x 4096 x 3200: 400 per segment)."""
    batch, length, width = c.x.shape
    n = c.A.shape[0]
    chunk = cfg["chunk"]
    n_chunks = length // chunk
    block, segments = _segments(cfg, batch, width, n_chunks)
    per_segment, n_blocks = n_chunks // segments, width // block
    has_z = c.z is not None
    has_h0 = c.h0 is not None
    names_in, operands = _inputs(c)
    ends, dh0 = _segment_ends(c, dy, dlast, cfg, block, segments)
    names_in = names_in + ["starts", "dy", "ends"]
    operands = operands + [starts, dy, ends]
    row = _specs(length, n, block)[0]
    by_segment = pl.BlockSpec((None, None, n, block), lambda b, j, s: (b, s, 0, j))
    in_specs = [_lift(spec) for spec in _in_specs(names_in[:-3], length, n, block)] + [
        pl.BlockSpec((None, n_chunks, n, block), lambda b, j, s: (b, 0, 0, j)), _lift(row), by_segment]
    partial_col = pl.BlockSpec((None, None, length, n, 1), lambda b, j, s: (b, j, 0, 0, 0))
    partial_row = pl.BlockSpec((None, None, length, block), lambda b, j, s: (b, j, 0, 0))
    partial_vec = pl.BlockSpec((None, None, 1, block), lambda b, j, s: (b, s, 0, j))
    f32 = jnp.float32
    scatter = _scatters_sums(cfg, n, block)
    sums = ["dBC"] if scatter else ["dB", "dC"]
    names_out = ["dx", "ddt"] + (["dz"] if has_z else []) + sums + ["dA", "dD", "dbias"]
    shapes = dict(dx=(c.x.shape, c.x.dtype), ddt=(c.dt.shape, c.dt.dtype),
                  dz=(c.x.shape, c.z.dtype if has_z else None),
                  dB=((batch, n_blocks, length, n, 1), f32), dC=((batch, n_blocks, length, n, 1), f32),
                  dBC=((batch, n_blocks, length, 2 * n), f32), dA=((batch, segments, n, width), f32),
                  dD=((batch, segments, 1, width), f32), dbias=((batch, segments, 1, width), f32))
    specs = dict(dx=_lift(row), ddt=_lift(row), dz=_lift(row), dB=partial_col, dC=partial_col, dBC=partial_row,
                 dA=by_segment, dD=partial_vec, dbias=partial_vec)
    out_shape = [jax.ShapeDtypeStruct(*shapes[k]) for k in names_out]

    def kernel(refs):
        p = Params.from_refs(refs, initial_state=False)
        segment = _segment_index(segments)

        def body(k, carry):
            chunk_index = (segment + 1) * per_segment - 1 - k
            dh, acc, misplaced = carry
            io = _IO(refs, chunk_index * chunk, has_z, scatter=scatter, interpret=cfg["interpret"],
                     misplaced=misplaced)
            # The initial state is read where a chunk's states are recomputed, not kept through the loop.
            chunk_p = p._replace(h0=refs["h0"][...]) if has_h0 else p
            dh, acc = backward_chunk(io, refs["starts"][chunk_index], dh, acc, chunk_p, chunk)
            return dh, acc, io.misplaced

        zeros_state, zeros_vec = jnp.zeros_like(p.A), jnp.zeros_like(p.D)
        acc = Accum(zeros_state, zeros_vec, zeros_vec, None)       # dh0: `_segment_ends`
        misplaced = jnp.zeros(p.D.shape, jnp.int32)
        _, acc, misplaced = jax.lax.fori_loop(0, per_segment, body, (refs["ends"][...], acc, misplaced))
        # Sums from a layout `_channel_sums` does not expect are wrong: make the gradients NaN (the training
        # loop skips non-finite steps, then stops) rather than wrong.
        refs["dA"][...] = jnp.where(jnp.max(misplaced) > 0, jnp.nan, acc.dA)
        refs["dD"][...] = acc.dD
        refs["dbias"][...] = acc.dbias

    outs = dict(zip(names_out, _segmented_call("selective_scan_backward", kernel, names_in, names_out, out_shape,
                                               in_specs, [specs[k] for k in names_out], batch, n_blocks, segments,
                                               cfg)(*operands)))
    if scatter:
        dC, dB = jnp.split(outs["dBC"].sum(1), 2, axis=-1)
    else:
        dB, dC = outs["dB"].sum(1)[..., 0], outs["dC"].sum(1)[..., 0]
    return Canon(outs["dx"], outs["ddt"], outs.get("dz"), dB.astype(c.B.dtype), dC.astype(c.C.dtype),
                 None, outs["dA"].sum((0, 1)), outs["dD"].sum((0, 1)), outs["dbias"].sum((0, 1)),
                 dh0)


def _scatters_sums(cfg, n: int, block: int) -> bool:
    """Whether the backward sums dB and dC by `_channel_sums`: 2N = bD, and on a GPU one channel per lane
    (bD = 32 in one warp; other tiles spread states over lanes too). Interpret mode takes it whenever
    2N = bD (tests)."""
    if 2 * n != block:
        return False
    return cfg["interpret"] or (block == 32 and cfg["num_warps"] == 1)


def _grow(t, axis: int, size: int):
    return jnp.pad(t, [(0, size - t.shape[axis]) if a == axis else (0, 0) for a in range(t.ndim)])


def _pow2_state(c: Canon) -> Canon:
    """Triton loads need power-of-two sizes: pad the state axis (A = B = C = h0 = 0 keeps the padded
    states at zero and y unchanged)."""
    n = pl.next_power_of_2(c.A.shape[0])
    h0 = None if c.h0 is None else _grow(c.h0, 1, n)
    return c._replace(B=_grow(c.B, 2, n), C=_grow(c.C, 2, n), A=_grow(c.A, 0, n), h0=h0)


def pow2_state_kernels(forward: Callable, backward: Callable, starts_axis: int, chunk: int, cfg: dict) -> Kernels:
    """The `Kernels` of Triton kernels `forward(c, keep_starts, cfg)`, `backward(c, starts, dy, dlast, cfg)`
    for any state size N: they need a power of two, so the state axis is padded (`_pow2_state`; the
    chunk-start states' at `starts_axis`) and their results are cut back to N."""

    def forward_any_state(c: Canon, keep_starts: bool):
        n = c.A.shape[0]
        y, starts, last = forward(_pow2_state(c), keep_starts, cfg)
        return y, None if starts is None else jax.lax.slice_in_dim(starts, 0, n, axis=starts_axis), last[:, :n]

    def backward_any_state(c: Canon, starts, dy, dlast):
        n = c.A.shape[0]
        m = pl.next_power_of_2(n)
        g = backward(_pow2_state(c), _grow(starts, starts_axis, m), dy, _grow(dlast, 1, m), cfg)
        return g._replace(B=g.B[..., :n], C=g.C[..., :n], A=g.A[:n], h0=None if g.h0 is None else g.h0[:, :n])

    return Kernels(chunk, forward_any_state, backward_any_state)


@functools.lru_cache(maxsize=None)
def kernels(chunk: int = CHUNK, block_d: int | None = None, num_warps: int = NUM_WARPS,
            inference_chunk: int = INFERENCE_CHUNK, segments: int | None = None, segment_grid: int = SEGMENT_GRID,
            forward_segments: int | None = None, forward_segment_grid: int = FORWARD_SEGMENT_GRID,
            inference_grid: int = INFERENCE_GRID, wave: int = WAVE, column_lookahead: int = COLUMN_LOOKAHEAD,
            inference_column_lookahead: int = INFERENCE_COLUMN_LOOKAHEAD,
            entry_column_lookahead: int = ENTRY_COLUMN_LOOKAHEAD, interpret: bool = False) -> Kernels:
    """chunk: time steps per backward chunk (and between the states the forward keeps for it);
    inference_chunk: the forward's unroll when no backward follows. Both powers of two. block_d: channels
    per program (None: BLOCK_D). segments, forward_segments: the backward's and the forward's time
    segments, or None for the fewest that make segment_grid, forward_segment_grid programs (`_segments`);
    a forward without a backward runs whole on a grid of inference_grid programs or more, in two segments on
    half that where they fit in one wave of programs (`INFERENCE_GRID`). column_lookahead,
    inference_column_lookahead, entry_column_lookahead: how many steps ahead the forward keeping states, the
    forward alone and the entry-state pass load each step's columns (`COLUMN_LOOKAHEAD`)."""
    require_powers_of_two("pallas_gpu", chunk=chunk, inference_chunk=inference_chunk)
    cfg = dict(chunk=chunk, inference_chunk=inference_chunk, block_d=block_d, num_warps=num_warps,
               segments=segments, segment_grid=segment_grid, forward_segments=forward_segments,
               forward_segment_grid=forward_segment_grid, inference_grid=inference_grid, wave=wave,
               column_lookahead=column_lookahead, inference_column_lookahead=inference_column_lookahead,
               entry_column_lookahead=entry_column_lookahead, interpret=interpret)
    return pow2_state_kernels(_forward, _backward, 2, max(chunk, inference_chunk), cfg)


@register_backend("pallas_gpu")
def pallas_gpu_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    return fused_scan(kernels(), x, dt, A, B, C, D, z, dt_bias, reset, initial_state)


def with_kernels(**options):
    """The backend with other tile sizes, or in interpret mode (`interpret=True`, for CPU tests)."""
    return functools.partial(fused_scan, kernels(**options))
