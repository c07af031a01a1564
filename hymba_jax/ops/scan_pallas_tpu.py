"""The 'pallas_tpu' scan backend: the fused scan (see scan_fused) as Pallas TPU (Mosaic) kernels.

Grid (batch, channel blocks, time), the time axis sequential (the backward's index maps walk it in
reverse): a program's state lives in a VMEM scratch across its grid steps, and the Pallas pipeline moves a
step's rows (T, S x L) and its B, C and reset flags: T is one chunk of 32 steps in the backward, up to 4
chunks in the forward, which writes the state at each chunk start for the backward.

Layout: a block of S x L channels fills whole vector registers, channels on both the 8 sublanes and the
128 lanes (S = 8, L = 128; d_inner 3200 takes 4 blocks, the last one partial), and the state is N such
registers, (N, S, L). The state-wide arithmetic then takes N full registers per time step, with no
broadcast of a row across the state axis and no reduction over sublanes for y. B_t, C_t and the reset
flag are the same for every channel, so they come from SMEM as scalars (`_steps`). A time step's row
(S, L) is channels from S lane-tiles of the chunk: each chunk's input tiles are first copied into a scratch
where they lie step by step (a strided store per lane-tile), outputs the other way round. The backward's dB
and dC, sums over the block's channels, are one cross-lane sum per state and a sum over sublanes per step.
Chunks without a document start run a branch without restart selects (`_per_chunk`). Static schedule
(libtpu's bundles for v5p, `benchmarks/scan_tpu_aot.py --bundles`, docs/performance.md): 6.5 for the
forward and 21.1 for the backward per time step and 128 channels, where an earlier layout (channels on
lanes, the N states on sublanes, B_t and C_t broadcast across lanes each step) took 17.6 and 45.6.

`interpret=True` runs the kernels on the CPU (tests); on a CPU machine with libtpu installed they compile
ahead of time for a TPU topology (benchmarks/scan_tpu_aot.py).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hymba_jax.ops.scan import register_backend
from hymba_jax.ops.scan_fused import Accum, Canon, Kernels, Params, backward_chunk, channel_block, \
    forward_chunk, fused_scan, require_powers_of_two, sigmoid, softplus, with_initial_state

T = TypeVar("T")

CHUNK = 32          # time steps per backward grid step: a power of two, 16 or more (whole bf16 tiles of rows);
                    # the backward keeps a chunk's states in VMEM (128 steps: 32 MiB, v4 has 16)
FORWARD_CHUNKS = 4  # chunks per forward grid step
LANES = 128
SUBLANES = 8
_STEP = 8           # scratch rows per time step: a step's (S, L) row starts on a register boundary


class _IO:
    """One chunk of a grid step, from its step `first` on, for `forward_chunk` / `backward_chunk`: rows (S, L)
    from the step-major scratches (`_stage`), columns (N, 1, 1) and the reset flag from SMEM scalars; outputs
    into step-major scratches (`_unstage`); the backward's channel sums into the lanes of one row per step
    (`put_sums`)."""

    keeps_states = True         # VMEM: the backward keeps each step's state for its walk back

    def __init__(self, refs: dict, d: dict, first: int, restarts: bool):
        self.refs, self.n, self.sub, self.record = refs, d["n"], d["sub"], d["record"]
        self.first, self.restarts, self.has_z = first, restarts, "z" in refs

    def row(self, name, i):
        return self.refs[name + "_rows"][pl.ds((self.first + i) * _STEP, self.sub), :]

    def col(self, name, i):
        at = (self.first + i) * self.record + (0 if name == "B" else self.n)
        return jnp.stack([jnp.full((1, 1), _word(self.refs, at + k), jnp.float32) for k in range(self.n)])

    def starts(self, i):
        if not self.restarts:
            return None
        return _word(self.refs, (self.first + i) * self.record + 2 * self.n) > 0

    def put_row(self, name, i, value):
        self.refs[name + "_rows"][pl.ds((self.first + i) * _STEP, self.sub), :] = value

    def fma(self, a, b, c):
        return a * b + c

    def softplus(self, v):
        # The exact forms also with bf16 inputs: the fast ones (`fast_math`) left the v5p schedule the same to
        # the bundle, its steps bound by the scalar loads of B_t and C_t (docs/performance.md).
        return softplus(v)

    def sigmoid(self, v):
        return sigmoid(v)

    def state_dot(self, a, b):
        return jnp.sum(a * b, axis=0)

    def put_sums(self, i, dC_terms, dB_terms):
        """Row i of "dBC": lane k < N holds dB's state k summed over the block's channels, lane N + k dC's:
        a cross-lane sum per state, the (S, 1) columns side by side, then the sum over sublanes (v5p: 3.5%
        fewer backward bundles than selecting each column into its lane)."""
        columns = [jnp.sum(terms, axis=1, keepdims=True) for terms in list(dB_terms) + list(dC_terms)]
        row = jnp.sum(jnp.concatenate(columns, axis=1), axis=0, keepdims=True)
        width = self.refs["dBC"].shape[-1]
        self.refs["dBC"][pl.ds(self.first + i, 1), :] = jnp.pad(row, ((0, 0), (0, width - row.shape[1])))


def _record(n: int, chunk: int) -> int:
    """SMEM words per time step in "steps": B_t (N), C_t (N), the reset flag, whether a document starts
    anywhere in the step's chunk; a power of two, and 1024 / chunk at least, so that a chunk's block is
    whole groups of 8 rows of 128 words (Mosaic's rule for a block's last two dimensions). N = 16: 64
    words, 32 KiB per forward grid step, twice (pipelined), of the 1 MiB of SMEM of v4 and later."""
    return pl.next_power_of_2(max(2 * n + 2, pl.cdiv(1024, chunk)))


def _steps(c: Canon, chunk: int):
    """(B x Lp x record / 128, 128) fp32: each step's B_t, C_t, reset flag and chunk flag, one SMEM record
    per step (`_record`), rows of 128 words (a chunk's block then spans whole rows of every batch row)."""
    batch, length, n = c.B.shape
    record = _record(n, chunk)
    f32 = jnp.float32
    in_chunk = c.reset.reshape(batch, length // chunk, chunk).max(-1, keepdims=True)
    parts = [c.B.astype(f32), c.C.astype(f32), c.reset.astype(f32),
             jnp.repeat(in_chunk, chunk, axis=1).reshape(batch, length, 1),
             jnp.zeros((batch, length, record - 2 * n - 2), f32)]
    return jnp.concatenate(parts, axis=-1).reshape(-1, 128)


def _per_chunk(refs, d: dict, q: int, step: Callable[[_IO], T]) -> T:
    """step(io) for chunk q of the grid step, io without restarts (no selects, no initial state read) when
    no document starts in the chunk, as in most chunks of a packed batch: a branch on the chunk's flag."""
    first = q * d["chunk"]
    on = lambda restarts: step(_IO(refs, d, first, restarts))
    restarts = _word(refs, first * d["record"] + 2 * d["n"] + 1) > 0
    return jax.lax.cond(restarts, lambda: on(True), lambda: on(False))


def _word(refs, index: int):
    """Word `index` of the grid step's "steps" block (`_steps`), a scalar."""
    return refs["steps"][index // 128, index % 128]


def _stage(refs, names, sub: int, lanes: int, width: int):
    """Copy the grid step's (T, S x L) input tiles to step-major scratches, fp32: lane-tile g of row t to
    scratch row t * _STEP + g, so a step's (S, L) row is one aligned load. Channels past the width (a
    partial last block, `_blocks`) become zeros: the stale VMEM there must not reach the channel sums."""
    for name in names:
        tile = refs[name][...].astype(jnp.float32)
        steps = tile.shape[0]
        if width % (sub * lanes):
            channel = pl.program_id(1) * sub * lanes + jax.lax.broadcasted_iota(jnp.int32, tile.shape, 1)
            tile = jnp.where(channel < width, tile, 0.0)
        for g in range(sub):
            refs[name + "_rows"][pl.ds(g, steps, stride=_STEP), :] = tile[:, g * lanes:(g + 1) * lanes]


def _unstage(refs, names, sub: int, lanes: int):
    """The inverse of `_stage` for output rows: scratch to the grid step's (T, S x L) output tiles."""
    for name in names:
        out = refs[name]
        steps = out.shape[0]
        for g in range(sub):
            out[:, g * lanes:(g + 1) * lanes] = refs[name + "_rows"][pl.ds(g, steps, stride=_STEP), :].astype(
                out.dtype)


def _blocks(width: int, cfg) -> tuple[int, int, int]:
    """(S, L, blocks): lanes L, the largest power of two up to cfg's dividing the width; sublanes S, cfg's,
    or fewer for a width of fewer lane-tiles; blocks of S x L channels to cover the width, the last one
    partial where S x L does not divide it (d_inner 3200: 4 blocks of 8 x 128, the last one 128 wide;
    `_stage` zeroes its missing channels)."""
    lanes = channel_block(width, cfg["lanes"])
    sub = min(cfg["sublanes"], width // lanes)
    return sub, lanes, pl.cdiv(width, sub * lanes)


def _to_blocks(t, sub: int, lanes: int, blocks: int):
    """(..., D) -> (..., blocks, S, L), zero-padded to whole blocks, the blocks axis moved in front of the
    axis before the channels: (N, D) -> (blocks, N, S, L); (B, N, D) -> (B, blocks, N, S, L)."""
    *lead, width = t.shape
    t = jnp.pad(t, [(0, 0)] * len(lead) + [(0, blocks * sub * lanes - width)])
    return jnp.moveaxis(t.reshape(*lead, blocks, sub, lanes), -3, -4)


def _from_blocks(t, width: int):
    """The inverse of `_to_blocks`: (..., blocks, X, S, L) -> (..., X, D)."""
    t = jnp.moveaxis(t, -4, -3)
    *lead, blocks, sub, lanes = t.shape
    return t.reshape(*lead, blocks * sub * lanes)[..., :width]


def _setup(c: Canon, cfg, reverse: bool, group: int = 1):
    """Operands by name, their BlockSpecs, and the sizes, for a grid (batch, channel blocks, time) whose
    steps take `group` chunks each."""
    batch, length, width = c.x.shape
    n = c.A.shape[0]
    chunk = cfg["chunk"]
    n_chunks = length // chunk
    span, grid_steps, record = group * chunk, n_chunks // group, _record(n, chunk)
    sub, lanes, n_blocks = _blocks(width, cfg)
    sum_lanes = pl.cdiv(2 * n, lanes) * lanes        # the backward's dB, dC sums per step (`_IO.put_sums`)
    time = (lambda k: grid_steps - 1 - k) if reverse else (lambda k: k)
    smem = pltpu.SMEM if not cfg["interpret"] else None
    specs = dict(
        row=pl.BlockSpec((None, span, sub * lanes), lambda b, j, k: (b, time(k), j)),
        steps=pl.BlockSpec((span * record // 128, 128), lambda b, j, k: (b * grid_steps + time(k), 0),
                           memory_space=smem),
        param=pl.BlockSpec((None, n, sub, lanes), lambda b, j, k: (j, 0, 0, 0)),
        vec=pl.BlockSpec((None, sub, lanes), lambda b, j, k: (j, 0, 0)),
        state=pl.BlockSpec((None, None, n, sub, lanes), lambda b, j, k: (b, j, 0, 0, 0)),
        vecs=pl.BlockSpec((None, None, sub, lanes), lambda b, j, k: (b, j, 0, 0)),
        start=pl.BlockSpec((None, None, group, n, sub, lanes), lambda b, j, k: (b, j, time(k), 0, 0, 0)),
        sums=pl.BlockSpec((None, None, span, sum_lanes), lambda b, j, k: (b, j, time(k), 0)),
    )
    blocks = lambda t: _to_blocks(t, sub, lanes, n_blocks)
    values = dict(x=c.x, dt=c.dt, z=c.z, steps=_steps(c, chunk), A=blocks(c.A), D=blocks(c.D)[:, 0],
                  bias=blocks(c.bias)[:, 0], h0=blocks(c.h0))
    kinds = dict(x="row", dt="row", z="row", steps="steps", A="param", D="vec", bias="vec", h0="state")
    names = ["x", "dt"] + (["z"] if c.z is not None else []) + ["steps", "A", "D", "bias", "h0"]
    dims = dict(batch=batch, length=length, width=width, n=n, chunk=chunk, n_chunks=n_chunks, group=group,
                span=span, grid_steps=grid_steps, record=record, sub=sub, lanes=lanes, blocks=n_blocks,
                sum_lanes=sum_lanes)
    return names, [values[k] for k in names], [specs[kinds[k]] for k in names], specs, dims, blocks


def _call(name, kernel, names_in, names_out, scratch, out_shape, in_specs, out_specs, dims, cfg):
    def body(*refs):
        kernel(dict(zip(names_in + names_out + [k for k, _ in scratch], refs)))

    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    grid = (dims["batch"], dims["blocks"], dims["grid_steps"])
    return pl.pallas_call(body, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for _, shape in scratch],
                          compiler_params=params, interpret=cfg["interpret"], name=name)


def _row_scratch(names, d):
    return [(k + "_rows", (d["span"] * _STEP, d["lanes"])) for k in names]


def _forward(c: Canon, keep_starts: bool, cfg):
    """Grid steps of up to cfg's forward_chunks chunks: fewer, longer steps spread a step's fixed work
    (pipeline, staging, the state's load and store) over more time steps (v5p: 248 -> 209 bundles per time
    step at 1 -> 4 chunks of 32; docs/performance.md)."""
    c = with_initial_state(c)
    group = forward_group(c.x.shape[1] // cfg["chunk"], cfg)
    names_in, operands, in_specs, specs, d, _ = _setup(c, cfg, reverse=False, group=group)
    has_z = c.z is not None
    n, sub, lanes = d["n"], d["sub"], d["lanes"]
    rows_in = ["x", "dt"] + (["z"] if has_z else [])
    state_shape = (d["batch"], d["blocks"], n, sub, lanes)
    names_out = ["y"] + (["starts"] if keep_starts else []) + ["last"]
    shapes = dict(y=jax.ShapeDtypeStruct(c.x.shape, c.x.dtype),
                  starts=jax.ShapeDtypeStruct((d["batch"], d["blocks"], d["n_chunks"], n, sub, lanes), jnp.float32),
                  last=jax.ShapeDtypeStruct(state_shape, jnp.float32))
    out_specs = dict(y=specs["row"], starts=specs["start"], last=specs["state"])
    scratch = _row_scratch(rows_in + ["y"], d) + [("h", (n, sub, lanes))]

    def kernel(refs):
        k = pl.program_id(2)
        p = Params.from_refs(refs)

        @pl.when(k == 0)
        def _():
            refs["h"][...] = p.h0

        h = refs["h"][...]
        _stage(refs, rows_in, sub, lanes, d["width"])
        for q in range(d["group"]):
            if keep_starts:
                refs["starts"][q] = h
            h = _per_chunk(refs, d, q, lambda io: forward_chunk(io, h, p, d["chunk"]))
        _unstage(refs, ["y"], sub, lanes)
        refs["h"][...] = h

        @pl.when(k == d["grid_steps"] - 1)
        def _():
            refs["last"][...] = h

    outs = _call("selective_scan_forward", kernel, names_in, names_out, scratch,
                 tuple(shapes[k] for k in names_out), in_specs, tuple(out_specs[k] for k in names_out), d,
                 cfg)(*operands)
    outs = dict(zip(names_out, outs))
    return outs["y"], outs.get("starts"), _from_blocks(outs["last"], d["width"])


def forward_group(n_chunks: int, cfg) -> int:
    """Chunks per forward grid step: the most, a power of two up to cfg's forward_chunks, dividing n_chunks."""
    group = 1
    while group < cfg["forward_chunks"] and n_chunks % (2 * group) == 0:
        group *= 2
    return group


def _backward(c: Canon, starts, dy, dlast, cfg):
    has_h0, c = c.h0 is not None, with_initial_state(c)
    names_in, operands, in_specs, specs, d, blocks = _setup(c, cfg, reverse=True)
    has_z = c.z is not None
    batch, n, sub, lanes, chunk = d["batch"], d["n"], d["sub"], d["lanes"], d["chunk"]
    f32 = jnp.float32
    names_in = names_in + ["starts", "dy", "dlast"]
    operands = operands + [starts, dy, blocks(dlast)]
    in_specs = in_specs + [specs["start"], specs["row"], specs["state"]]
    rows_in = ["x", "dt"] + (["z"] if has_z else []) + ["dy"]
    rows_out = ["dx", "ddt"] + (["dz"] if has_z else [])
    names_out = rows_out + ["dBC", "dA", "dD", "dbias", "dh0"]
    state = (batch, d["blocks"], n, sub, lanes)
    vecs = (batch, d["blocks"], sub, lanes)
    shapes = dict(dx=(c.x.shape, c.x.dtype), ddt=(c.dt.shape, c.dt.dtype),
                  dz=(c.x.shape, c.z.dtype if has_z else None),
                  dBC=((batch, d["blocks"], d["length"], d["sum_lanes"]), f32), dA=(state, f32), dD=(vecs, f32),
                  dbias=(vecs, f32), dh0=(state, f32))
    out_specs = dict(dx=specs["row"], ddt=specs["row"], dz=specs["row"], dBC=specs["sums"], dA=specs["state"],
                     dD=specs["vecs"], dbias=specs["vecs"], dh0=specs["state"])
    scratch = (_row_scratch(rows_in + rows_out, d)
               + [("dh", (n, sub, lanes)), ("sA", (n, sub, lanes)), ("sD", (sub, lanes)), ("sbias", (sub, lanes)),
                  ("sh0", (n, sub, lanes))])

    def kernel(refs):
        k = pl.program_id(2)
        p = Params.from_refs(refs)

        @pl.when(k == 0)
        def _():
            refs["dh"][...] = refs["dlast"][...]
            for name in ("sA", "sD", "sbias", "sh0"):
                refs[name][...] = jnp.zeros(refs[name].shape, f32)

        _stage(refs, rows_in, sub, lanes, d["width"])
        acc = Accum(refs["sA"][...], refs["sD"][...], refs["sbias"][...], refs["sh0"][...])
        dh, acc = _per_chunk(refs, d, 0, lambda io: backward_chunk(io, refs["starts"][0], refs["dh"][...], acc, p,
                                                                   chunk))
        _unstage(refs, rows_out, sub, lanes)
        refs["dh"][...] = dh
        refs["sA"][...], refs["sD"][...], refs["sbias"][...], refs["sh0"][...] = acc

        @pl.when(k == d["grid_steps"] - 1)
        def _():
            refs["dA"][...] = acc.dA
            refs["dD"][...] = acc.dD
            refs["dbias"][...] = acc.dbias
            refs["dh0"][...] = acc.dh0 + dh

    out_shape = [jax.ShapeDtypeStruct(*shapes[k]) for k in names_out]
    outs = dict(zip(names_out, _call("selective_scan_backward", kernel, names_in, names_out, scratch, out_shape,
                                     in_specs, [out_specs[k] for k in names_out], d, cfg)(*operands)))
    sums = outs["dBC"].sum(1)
    channels = lambda t: t.sum(0).reshape(1, -1)[:, :d["width"]]     # (B, blocks, S, L) -> (1, D)
    dh0 = _from_blocks(outs["dh0"], d["width"]) if has_h0 else None
    return Canon(outs["dx"], outs["ddt"], outs.get("dz"), sums[..., :n].astype(c.B.dtype),
                 sums[..., n:2 * n].astype(c.C.dtype), None, _from_blocks(outs["dA"].sum(0), d["width"]),
                 channels(outs["dD"]), channels(outs["dbias"]), dh0)


@functools.lru_cache(maxsize=None)
def kernels(chunk: int = CHUNK, forward_chunks: int = FORWARD_CHUNKS, lanes: int = LANES, sublanes: int = SUBLANES,
            interpret: bool = False) -> Kernels:
    """chunk: time steps per backward grid step and between the states the forward keeps, a power of two
    (`_record`); forward_chunks: chunks per forward grid step, at most; lanes, sublanes: the channel block's
    register shape (`_blocks`)."""
    require_powers_of_two("pallas_tpu", chunk=chunk, forward_chunks=forward_chunks)
    cfg = dict(chunk=chunk, forward_chunks=forward_chunks, lanes=lanes, sublanes=sublanes, interpret=interpret)
    return Kernels(chunk, functools.partial(_forward, cfg=cfg), functools.partial(_backward, cfg=cfg))


@register_backend("pallas_tpu")
def pallas_tpu_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    return fused_scan(kernels(), x, dt, A, B, C, D, z, dt_bias, reset, initial_state)


def with_kernels(**options):
    """The backend with other tile sizes, or in interpret mode (`interpret=True`, for CPU tests)."""
    return functools.partial(fused_scan, kernels(**options))
