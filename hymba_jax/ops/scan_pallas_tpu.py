"""The 'pallas_tpu' scan backend: the fused scan (see scan_fused) as Pallas TPU (Mosaic) kernels.

Grid (batch, channel blocks, chunks), the chunk axis sequential: the (N, bD) state lives in a VMEM scratch
across a program's chunks, and the Pallas pipeline moves one chunk of rows (T, bD) and of transposed B/C
columns (N, T) into VMEM per grid step. Channels sit on the 128 lanes, the state axis on sublanes. The
backward grid walks the chunks in reverse through its index maps. Outputs of a chunk are collected in
fp32 VMEM scratch and stored as whole tiles. `interpret=True` runs the kernels on the CPU (tests); on a
CPU machine with libtpu installed they compile ahead of time for a TPU topology
(benchmarks/scan_tpu_aot.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from hymba_jax.ops.scan import register_backend
from hymba_jax.ops.scan_fused import Accum, Canon, Kernels, Params, backward_chunk, channel_block, \
    forward_chunk, fused_scan, with_initial_state

CHUNK = 128     # a multiple of 128: the transposed B/C tiles have time on the lanes
BLOCK_D = 128


class _IO:
    """Row/column access of one grid step's VMEM tiles; steps are static Python ints."""

    def __init__(self, refs: dict, has_z: bool):
        self.refs, self.has_z = refs, has_z
        self._tiles: dict = {}

    def _tile(self, name):
        if name not in self._tiles:
            self._tiles[name] = self.refs[name][...].astype(jnp.float32)
        return self._tiles[name]

    def row(self, name, i):
        return self._tile(name)[i:i + 1, :]

    def col(self, name, i):
        return self._tile(name)[:, i:i + 1]

    def starts(self, i):
        return self._tile("reset")[i:i + 1, :] > 0

    def put_row(self, name, i, value):
        self.refs[name + "_acc"][pl.ds(i, 1), :] = value

    def fma(self, a, b, c):
        return a * b + c

    def state_dot(self, a, b):
        return jnp.sum(a * b, axis=0, keepdims=True)

    def put_sums(self, i, dC_terms, dB_terms):
        for name, terms in (("dC", dC_terms), ("dB", dB_terms)):
            self.refs[name + "_acc"][:, pl.ds(i, 1)] = jnp.sum(terms, axis=1, keepdims=True)

    def flush(self, names):
        for name in names:
            self.refs[name][...] = self.refs[name + "_acc"][...].astype(self.refs[name].dtype)


def _common(c: Canon, cfg, reverse: bool):
    batch, length, width = c.x.shape
    n = c.A.shape[0]
    chunk, block = cfg["chunk"], channel_block(width, cfg["block_d"])
    n_chunks = length // chunk
    time = (lambda k: n_chunks - 1 - k) if reverse else (lambda k: k)
    specs = dict(
        row=pl.BlockSpec((None, chunk, block), lambda b, j, k: (b, time(k), j)),
        col=pl.BlockSpec((None, n, chunk), lambda b, j, k: (b, 0, time(k))),
        flag=pl.BlockSpec((None, chunk, 1), lambda b, j, k: (b, time(k), 0)),
        param=pl.BlockSpec((n, block), lambda b, j, k: (0, j)),
        vec=pl.BlockSpec((1, block), lambda b, j, k: (0, j)),
        state=pl.BlockSpec((None, n, block), lambda b, j, k: (b, 0, j)),
        start=pl.BlockSpec((None, None, n, block), lambda b, j, k: (b, time(k), 0, j)),
    )
    names = ["x", "dt"] + (["z"] if c.z is not None else []) + ["B", "C", "reset", "A", "D", "bias", "h0"]
    values = dict(c._asdict(), B=jnp.swapaxes(c.B, 1, 2), C=jnp.swapaxes(c.C, 1, 2))
    kinds = dict(x="row", dt="row", z="row", B="col", C="col", reset="flag", A="param", D="vec", bias="vec",
                 h0="state")
    in_specs = [specs[kinds[k]] for k in names]
    dims = dict(batch=batch, length=length, width=width, n=n, chunk=chunk, block=block, n_chunks=n_chunks)
    return names, [values[k] for k in names], in_specs, specs, dims


def _call(kernel, names_in, names_out, scratch, out_shape, in_specs, out_specs, dims, cfg):
    def body(*refs):
        kernel(dict(zip(names_in + names_out + [k for k, _ in scratch], refs)))

    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    grid = (dims["batch"], dims["width"] // dims["block"], dims["n_chunks"])
    return pl.pallas_call(body, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          scratch_shapes=[pltpu.VMEM(shape, jnp.float32) for _, shape in scratch],
                          compiler_params=params, interpret=cfg["interpret"])


def _forward(c: Canon, keep_starts: bool, cfg):
    del keep_starts  # the pipeline writes the chunk-start states either way
    c = with_initial_state(c)
    names_in, operands, in_specs, specs, d = _common(c, cfg, reverse=False)
    has_z = c.z is not None
    out_shape = (jax.ShapeDtypeStruct(c.x.shape, c.x.dtype),
                 jax.ShapeDtypeStruct((d["batch"], d["n_chunks"], d["n"], d["width"]), jnp.float32),
                 jax.ShapeDtypeStruct((d["batch"], d["n"], d["width"]), jnp.float32))
    scratch = [("h", (d["n"], d["block"])), ("y_acc", (d["chunk"], d["block"]))]

    def kernel(refs):
        k = pl.program_id(2)
        p = Params.from_refs(refs)

        @pl.when(k == 0)
        def _():
            refs["h"][...] = p.h0

        h = refs["h"][...]
        refs["starts"][...] = h
        io = _IO(refs, has_z)
        h = forward_chunk(io, h, p, d["chunk"])
        io.flush(["y"])
        refs["h"][...] = h

        @pl.when(k == d["n_chunks"] - 1)
        def _():
            refs["last"][...] = h

    out_specs = (specs["row"], specs["start"], specs["state"])
    return _call(kernel, names_in, ["y", "starts", "last"], scratch, out_shape, in_specs, out_specs, d,
                 cfg)(*operands)


def _backward(c: Canon, starts, dy, dlast, cfg):
    has_h0, c = c.h0 is not None, with_initial_state(c)
    names_in, operands, in_specs, specs, d = _common(c, cfg, reverse=True)
    has_z = c.z is not None
    batch, n, width, length = d["batch"], d["n"], d["width"], d["length"]
    n_blocks, n_chunks, chunk, block = width // d["block"], d["n_chunks"], d["chunk"], d["block"]
    f32 = jnp.float32
    names_in = names_in + ["starts", "dy", "dlast"]
    operands = operands + [starts, dy, dlast]
    in_specs = in_specs + [specs["start"], specs["row"], specs["state"]]
    rows = ["dx", "ddt"] + (["dz"] if has_z else [])
    names_out = rows + ["dB", "dC", "dA", "dD", "dbias", "dh0"]
    partial_col = pl.BlockSpec((None, None, n, chunk), lambda b, j, k: (b, j, 0, n_chunks - 1 - k))
    partial_vec = pl.BlockSpec((None, 1, block), lambda b, j, k: (b, 0, j))
    shapes = dict(dx=(c.x.shape, c.x.dtype), ddt=(c.dt.shape, c.dt.dtype),
                  dz=(c.x.shape, c.z.dtype if has_z else None),
                  dB=((batch, n_blocks, n, length), f32), dC=((batch, n_blocks, n, length), f32),
                  dA=((batch, n, width), f32), dD=((batch, 1, width), f32), dbias=((batch, 1, width), f32),
                  dh0=((batch, n, width), f32))
    out_specs = dict(dx=specs["row"], ddt=specs["row"], dz=specs["row"], dB=partial_col, dC=partial_col,
                     dA=specs["state"], dD=partial_vec, dbias=partial_vec, dh0=specs["state"])
    scratch = ([(k + "_acc", (chunk, block)) for k in rows] + [("dB_acc", (n, chunk)), ("dC_acc", (n, chunk))]
               + [("dh", (n, block)), ("sA", (n, block)), ("sD", (1, block)), ("sbias", (1, block)),
                  ("sh0", (n, block))])

    def kernel(refs):
        k = pl.program_id(2)
        p = Params.from_refs(refs)

        @pl.when(k == 0)
        def _():
            refs["dh"][...] = refs["dlast"][...]
            for name in ("sA", "sD", "sbias", "sh0"):
                refs[name][...] = jnp.zeros(refs[name].shape, f32)

        io = _IO(refs, has_z)
        acc = Accum(refs["sA"][...], refs["sD"][...], refs["sbias"][...], refs["sh0"][...])
        dh, acc = backward_chunk(io, refs["starts"][...], refs["dh"][...], acc, p, chunk)
        io.flush(rows + ["dB", "dC"])
        refs["dh"][...] = dh
        refs["sA"][...], refs["sD"][...], refs["sbias"][...], refs["sh0"][...] = acc

        @pl.when(k == n_chunks - 1)
        def _():
            refs["dA"][...] = acc.dA
            refs["dD"][...] = acc.dD
            refs["dbias"][...] = acc.dbias
            refs["dh0"][...] = acc.dh0 + dh

    out_shape = [jax.ShapeDtypeStruct(*shapes[k]) for k in names_out]
    outs = dict(zip(names_out, _call(kernel, names_in, names_out, scratch, out_shape, in_specs,
                                     [out_specs[k] for k in names_out], d, cfg)(*operands)))
    return Canon(outs["dx"], outs["ddt"], outs.get("dz"),
                 jnp.swapaxes(outs["dB"].sum(1), 1, 2).astype(c.B.dtype),
                 jnp.swapaxes(outs["dC"].sum(1), 1, 2).astype(c.C.dtype),
                 None, outs["dA"].sum(0), outs["dD"].sum(0), outs["dbias"].sum(0), outs["dh0"] if has_h0 else None)


@functools.lru_cache(maxsize=None)
def kernels(chunk: int = CHUNK, block_d: int = BLOCK_D, interpret: bool = False) -> Kernels:
    cfg = dict(chunk=chunk, block_d=block_d, interpret=interpret)
    return Kernels(chunk, functools.partial(_forward, cfg=cfg), functools.partial(_backward, cfg=cfg))


@register_backend("pallas_tpu")
def pallas_tpu_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    return fused_scan(kernels(), x, dt, A, B, C, D, z, dt_bias, reset, initial_state)


def with_kernels(**options):
    """The backend with other tile sizes, or in interpret mode (`interpret=True`, for CPU tests)."""
    return functools.partial(fused_scan, kernels(**options))
