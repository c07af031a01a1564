"""The 'pallas_gpu_parallel' scan backend: the fused scan (see scan_fused) parallel over time inside each
Pallas Triton program. Not chosen by `auto`: on the H200 this channel-major layout is 1.4-1.6x slower than
`pallas_gpu` forward+backward at 8 x 2048 and 4 x 4096 (docs/performance.md, "Time-parallel kernel"), and
since 'pallas_gpu' splits time into segments its forward on few rows is slower too (2 x 4096 x 3200: 0.94
against 0.66 ms, 1 x 8192: 2.07 against 0.70).

Grid (batch, channel blocks); a program walks the sequence in tiles of bD channels x T steps. Inside a
tile, for each of the N states (a static Python loop), the recurrence h_t = a_t h_{t-1} + b_t runs as one
Triton block scan along the tile's time axis (`tile_scan`, lowered to `tt.scan`: serial within a thread,
shuffles within a warp, shared memory across warps), so each decay exp(delta A) is computed once and a
tile's elements are spread over all threads, instead of one thread walking one channel's steps one by one
(`pallas_gpu`). The state entering a tile and each reset are folded into the tile's first element and
the reset steps (a = 0, b = a h_start + b), so the scan starts from zero.

Layout: the kernels work channel-major, (B, D, L) with time contiguous (the wrapper transposes). A
tile's loads are then contiguous along time, so Triton gives each thread consecutive steps and the scan is
mostly serial within threads. The first version kept the model's (B, L, D) layout: its (T, bD) tiles put
one step per lane, so every element paid log2(32) shuffle rounds per scan (PTX: 4.9k shuffles against 288
exps per tile loop) and it ran 6x slower than `pallas_gpu`.

State between tiles goes through memory, not registers: the forward writes each tile's N start states
(B, tiles + 1, D, N), which the backward also reads, and the next tile reads them back after a barrier;
the backward's d/dh carry and its sums over time (dA, dh0, dD, d dt_bias) are likewise read-modify-written
in their outputs once per tile. (Kept in registers, N carries of a bD-channel column each would cost
several registers per thread in Triton's replicated layouts.)

Backward, per tile in reverse: recompute h from the stored start state (one forward tile scan), then the
adjoint dh_t = C_t g_t + a_{t+1} dh_{t+1} as one reverse tile scan of (value, product, first decay)
triples, which needs no shifted decay. a_t h_{t-1} = h_t - b_t, so no shifted state either. dB and dC
are summed over the program's channels and written as (B, channel blocks, N, L) partials, summed outside.
`interpret=True` runs the same kernels on the CPU (tests): `tile_scan` is then `lax.associative_scan`.
Its Triton lowering uses Pallas' private lowering API (`jax._src.pallas.triton.lowering`; the same
signatures in jax 0.10.2, where it lowers on the CPU, and 0.11.2, where it ran on the H200).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.extend.core import Primitive
from jax.interpreters import mlir

from hymba_jax.ops.scan import register_backend
from hymba_jax.ops.scan_fused import Canon, Kernels, channel_block, decay, exp2_rates, fused_scan, sigmoid, \
    softplus, with_initial_state
from hymba_jax.ops.scan_pallas_gpu import pow2_state_kernels, triton_call

try:  # the Triton compiler parameters and lowering (absent from some jaxlib builds)
    from jax.experimental.pallas import triton as plgpu
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.lib.mlir import ir
except ImportError:  # pragma: no cover
    plgpu = triton_lowering = tt_dialect = ir = None

CHUNK = 64              # time steps per tile of the training kernels (forward and backward)
INFERENCE_CHUNK = 64    # the forward's tile when no backward follows (128 at 16 channels: spills, ptxas)
# Channels per program and warps, forward and backward (PTX from Triton 3.9 for sm_90, docs/performance.md;
# the timed defaults). Forward: one warp of 4 channels, which Triton lays out as 8 consecutive steps
# per thread, 8 lanes along time and 4 along channels: no shared memory, 2 barriers, 192 shuffles per
# 64-step tile. Backward: its dB and dC are written as one (B, L, N) partial per channel block, 0.42 GB
# together at 8 x 2048 x 3200 with 16 channels (1.7 GB with 4), so it takes 16 channels over 4 warps and
# pays shared-memory sums over channels instead.
BLOCK_D, NUM_WARPS = 4, 1
BACKWARD_BLOCK_D, BACKWARD_NUM_WARPS = 16, 4


# --------------------------------------------------------------------------------------------------
# tile_scan: an inclusive scan along one axis of a tile, lowered to Triton's tt.scan.

def _linear(earlier, later):
    """Compose h -> a h + b maps: first `earlier`, then `later`."""
    (a1, b1), (a2, b2) = earlier, later
    return a1 * a2, a2 * b1 + b2


def _adjoint(earlier, later):
    """Segments of the adjoint recurrence dh_t = c_t + a_{t+1} dh_{t+1}. A segment [i..j] is
    (v, p, f): v = sum_s (prod_{i<r<=s} a_r) c_s, p = prod_{i<r<=j} a_r, f = a_i (its first decay, which
    links it to the segment before it). A reverse scan gives v = dh_t for the suffix [t..end]."""
    (v1, p1, f1), (v2, p2, f2) = earlier, later
    link = p1 * f2
    return v1 + link * v2, link * p2, f1


_COMBINES: dict[str, Callable] = {"linear": _linear, "adjoint": _adjoint}

tile_scan_p = Primitive("hymba_tile_scan")
tile_scan_p.multiple_results = True


def tile_scan(kind: str, operands: tuple, *, axis: int = 0, reverse: bool = False) -> list:
    """Inclusive scan of `operands` (same shapes, fp32) along `axis` with the combine `kind` (written
    for (earlier, later) elements); reverse=True scans from the end (suffixes)."""
    return tile_scan_p.bind(*operands, kind=kind, axis=axis, reverse=reverse)


def _tile_scan_impl(*operands, kind, axis, reverse):
    fn = _COMBINES[kind]
    # lax.associative_scan(reverse=True) calls its function with (later, earlier).
    combine = (lambda x, y: fn(y, x)) if reverse else fn
    return list(jax.lax.associative_scan(combine, tuple(operands), axis=axis, reverse=reverse))


tile_scan_p.def_impl(_tile_scan_impl)
tile_scan_p.def_abstract_eval(lambda *avals, **_: list(avals))
mlir.register_lowering(tile_scan_p, mlir.lower_fun(_tile_scan_impl, multiple_results=True))


def _tile_scan_triton(ctx, *operands, kind, axis, reverse):
    """tt.scan's region gets (accumulated..., current...). A reverse tt.scan is flip(scan(flip(x))), so
    there the accumulated operands are the later elements."""
    fn = _COMBINES[kind]
    n = len(operands)

    def region(*args):
        acc, cur = tuple(args[:n]), tuple(args[n:])
        return fn(cur, acc) if reverse else fn(acc, cur)

    scalar = jax.ShapeDtypeStruct((), ctx.avals_in[0].dtype)
    closed = jax.make_jaxpr(region)(*([scalar] * (2 * n)))
    if closed.consts:
        raise NotImplementedError("tile_scan combine functions must not capture constants")
    element = triton_lowering._element_type(operands[0].type)
    op = tt_dialect.ScanOp(list(operands), axis, reverse)
    entry = op.regions[0].blocks.append(*([element] * (2 * n)))
    with ir.InsertionPoint.at_block_begin(entry):
        results = triton_lowering.lower_jaxpr_to_triton_ir(ctx.context, closed.jaxpr, None, *entry.arguments)
        tt_dialect.scan_return(results)
    op.verify()
    return list(op.result)


if triton_lowering is not None:
    triton_lowering.register_lowering(tile_scan_p)(_tile_scan_triton)


# --------------------------------------------------------------------------------------------------
# The kernels.

def _barrier(cfg):
    """Order a tile's writes of carried values before the next tile's reads (other threads may hold them)."""
    if not cfg["interpret"]:
        plgpu.debug_barrier()


def _t(a):
    """(B, L, D) <-> (B, D, L): the kernels work channel-major, time contiguous (see the module doc)."""
    return None if a is None else jnp.swapaxes(a, 1, 2)


def _inputs(c: Canon):
    """Kernel operands, channel-major: x, dt, z (B, D, Lp); B, C (B, N, Lp); reset (B, 1, Lp); A (D, N);
    D, bias (D, 1); h0 (B, D, N). A tile of one state is then (bD, T) with time contiguous, and B_t, C_t
    and the reset flags of a tile are (1, T) rows."""
    names = ["x", "dt"] + (["z"] if c.z is not None else []) + ["B", "C", "reset", "A", "D", "bias", "h0"]
    values = dict(x=_t(c.x), dt=_t(c.dt), z=_t(c.z), B=_t(c.B), C=_t(c.C), reset=_t(c.reset), A=c.A.T,
                  D=c.D.T, bias=c.bias.T, h0=_t(c.h0))
    return names, [values[k] for k in names]


def _specs(length: int, n: int, block: int, n_tiles: int) -> dict:
    return dict(
        row=pl.BlockSpec((None, block, length), lambda b, j: (b, j, 0)),
        col=pl.BlockSpec((None, n, length), lambda b, j: (b, 0, 0)),
        flag=pl.BlockSpec((None, 1, length), lambda b, j: (b, 0, 0)),
        param=pl.BlockSpec((block, n), lambda b, j: (j, 0)),
        vec=pl.BlockSpec((block, 1), lambda b, j: (j, 0)),
        state=pl.BlockSpec((None, block, n), lambda b, j: (b, j, 0)),
        batch_vec=pl.BlockSpec((None, block, 1), lambda b, j: (b, j, 0)),
        starts=pl.BlockSpec((None, n_tiles + 1, block, n), lambda b, j: (b, 0, j, 0)),
        partial=pl.BlockSpec((None, None, n, length), lambda b, j: (b, j, 0, 0)))


def _in_specs(names, s):
    kinds = dict(x=s["row"], dt=s["row"], z=s["row"], dy=s["row"], B=s["col"], C=s["col"], reset=s["flag"],
                 A=s["param"], D=s["vec"], bias=s["vec"], h0=s["state"], starts=s["starts"], dlast=s["state"])
    return [kinds[k] for k in names]


def _broadcast_row(ref, i: int, steps, block: int):
    """Row i of ref over the tile's steps, loaded as a (bD, T) tile (every channel reads the same row):
    a (1, T) load would make Triton lay the tile out with one step per thread (its coalescing gives each
    of the 128 threads one of the row's 128 elements), which the whole tile then follows."""
    chans = jnp.full((block, 1), i, jnp.int32)
    times = steps.start + jax.lax.broadcasted_iota(jnp.int32, (1, steps.size), 1)
    return ref[chans, times].astype(jnp.float32)


def _tile_loads(refs, steps, has_z: bool, names=("x", "dt", "z")):
    out = {k: refs[k][:, steps].astype(jnp.float32) for k in names if k != "z" or has_z}     # (bD, T)
    out["reset"] = _broadcast_row(refs["reset"], 0, steps, out["x"].shape[0]) > 0
    out["delta"] = softplus(out["dt"] + refs["bias"][...])
    out["u"] = out["delta"] * out["x"]
    return out


def _state_tile(refs, s: dict, steps, i: int, h_start, first):
    """The tile's states of state index i (bD, T) from the state before the tile (bD, 1), with resets;
    also returns the decays a and the inputs b (unfolded)."""
    state = pl.ds(i, 1)
    A = refs["A"][:, state]
    a = decay(s["delta"], A, exp2_rates(A, refs["x"].dtype))
    b = s["u"] * _broadcast_row(refs["B"], i, steps, s["u"].shape[0])
    start = s["reset"] | first
    h_prev = jnp.where(s["reset"], refs["h0"][:, state], h_start)
    _, h = tile_scan("linear", (jnp.where(start, 0.0, a), jnp.where(start, a * h_prev + b, b)), axis=1)
    return h, a, b


def _forward(c: Canon, keep_starts: bool, cfg):
    c = with_initial_state(c)
    batch, length, width = c.x.shape
    n = c.A.shape[0]
    # The start states also carry the state between tiles, so they are always written; with a backward
    # pass to follow, the tiles are the backward's (it reads a start state per tile).
    chunk = cfg["chunk"] if keep_starts else cfg["inference_chunk"]
    block = channel_block(width, cfg["block_d"])
    n_tiles = length // chunk
    has_z = c.z is not None
    names_in, operands = _inputs(c)
    s = _specs(length, n, block, n_tiles)
    names_out = ["y", "starts"]
    out_shape = [jax.ShapeDtypeStruct((batch, width, length), c.x.dtype),
                 jax.ShapeDtypeStruct((batch, n_tiles + 1, width, n), jnp.float32)]

    def kernel(refs):
        starts = refs["starts"]
        for i in range(n):
            starts[0, :, pl.ds(i, 1)] = refs["h0"][:, pl.ds(i, 1)]
        _barrier(cfg)
        iota = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        first, last = iota == 0, iota == chunk - 1

        def body(k, carry):
            steps = pl.ds(pl.multiple_of(k * chunk, chunk), chunk)
            s_ = _tile_loads(refs, steps, has_z)
            y = refs["D"][...] * s_["x"]
            for i in range(n):
                state = pl.ds(i, 1)
                h, _, _ = _state_tile(refs, s_, steps, i, starts[k, :, state], first)
                y = y + h * _broadcast_row(refs["C"], i, steps, block)
                starts[k + 1, :, state] = jnp.sum(jnp.where(last, h, 0.0), axis=1, keepdims=True)
            if has_z:
                y = y * (s_["z"] * sigmoid(s_["z"]))
            refs["y"][:, steps] = y.astype(refs["y"].dtype)
            _barrier(cfg)
            return carry

        jax.lax.fori_loop(0, n_tiles, body, 0)

    y, starts = triton_call("selective_scan_parallel_forward", kernel, names_in, names_out, out_shape,
                      _in_specs(names_in, s), [s["row"], s["starts"]], (batch, width // block), cfg,
                      cfg["num_warps"])(*operands)
    return _t(y), starts, _t(starts[:, -1])


def _backward(c: Canon, starts, dy, dlast, cfg):
    has_h0, c = c.h0 is not None, with_initial_state(c)
    batch, length, width = c.x.shape
    n = c.A.shape[0]
    chunk, block = cfg["chunk"], channel_block(width, cfg["backward_block_d"])
    n_tiles, n_blocks = length // chunk, width // block
    has_z = c.z is not None
    names_in, operands = _inputs(c)
    names_in = names_in + ["starts", "dy", "dlast"]
    operands = operands + [starts, _t(dy), _t(dlast)]
    s = _specs(length, n, block, starts.shape[1] - 1)
    f32 = jnp.float32
    names_out = ["dx", "ddt"] + (["dz"] if has_z else []) + ["dB", "dC", "dA", "dD", "dbias", "dh0", "dcarry"]
    big = (batch, width, length)
    shapes = dict(dx=(big, c.x.dtype), ddt=(big, c.dt.dtype), dz=(big, c.z.dtype if has_z else None),
                  dB=((batch, n_blocks, n, length), f32), dC=((batch, n_blocks, n, length), f32),
                  dA=((batch, width, n), f32), dD=((batch, width, 1), f32), dbias=((batch, width, 1), f32),
                  dh0=((batch, width, n), f32), dcarry=((batch, width, n), f32))
    specs = dict(dx=s["row"], ddt=s["row"], dz=s["row"], dB=s["partial"], dC=s["partial"], dA=s["state"],
                 dD=s["batch_vec"], dbias=s["batch_vec"], dh0=s["state"], dcarry=s["state"])

    def kernel(refs):
        dcarry, dA, dh0 = refs["dcarry"], refs["dA"], refs["dh0"]
        zeros = jnp.zeros((block, 1), f32)
        for i in range(n):
            state = pl.ds(i, 1)
            dcarry[:, state] = refs["dlast"][:, state]
            dA[:, state] = zeros
            dh0[:, state] = zeros
        refs["dD"][...] = zeros
        refs["dbias"][...] = zeros
        _barrier(cfg)
        iota = jax.lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        first, last = iota == 0, iota == chunk - 1
        ones = jnp.ones((block, chunk), f32)

        def body(kk, carry):
            k = n_tiles - 1 - kk
            steps = pl.ds(pl.multiple_of(k * chunk, chunk), chunk)
            s_ = _tile_loads(refs, steps, has_z, ("x", "dt", "z", "dy"))
            x, delta, u, dy_ = s_["x"], s_["delta"], s_["u"], s_["dy"]
            if has_z:
                zs = sigmoid(s_["z"])
                g = dy_ * (s_["z"] * zs)
                y_pre = refs["D"][...] * x
            else:
                g = dy_
            du = jnp.zeros_like(x)
            dA_delta = jnp.zeros_like(x)         # sum over states of q A (the delta gradient through the decays)
            for i in range(n):
                state = pl.ds(i, 1)
                h, a, b = _state_tile(refs, s_, steps, i, refs["starts"][k, :, state], first)
                C_i = _broadcast_row(refs["C"], i, steps, block)
                B_i = _broadcast_row(refs["B"], i, steps, block)
                if has_z:
                    y_pre = y_pre + h * C_i
                refs["dC"][state, steps] = jnp.sum(h * g, axis=0, keepdims=True)
                c_ = C_i * g + jnp.where(last, dcarry[:, state], 0.0)
                dh, _, _ = tile_scan("adjoint", (c_, ones, jnp.where(s_["reset"], 0.0, a)), axis=1, reverse=True)
                refs["dB"][state, steps] = jnp.sum(dh * u, axis=0, keepdims=True)
                du = du + dh * B_i
                q = dh * (h - b)                                   # dh_t a_t h_{t-1}
                dA[:, state] = dA[:, state] + jnp.sum(q * delta, axis=1, keepdims=True)
                dA_delta = dA_delta + q * refs["A"][:, state]
                dh_prev = dh * a                                   # d loss / d h_{t-1} through step t
                dh0[:, state] = dh0[:, state] + jnp.sum(jnp.where(s_["reset"], dh_prev, 0.0), axis=1,
                                                        keepdims=True)
                dcarry[:, state] = jnp.sum(jnp.where(first & ~s_["reset"], dh_prev, 0.0), axis=1,
                                           keepdims=True)
            dv = (dA_delta + du * x) * sigmoid(s_["dt"] + refs["bias"][...])
            refs["ddt"][:, steps] = dv.astype(refs["ddt"].dtype)
            refs["dx"][:, steps] = (du * delta + g * refs["D"][...]).astype(refs["dx"].dtype)
            if has_z:
                refs["dz"][:, steps] = (dy_ * y_pre * (zs * (1.0 + s_["z"] * (1.0 - zs)))).astype(refs["dz"].dtype)
            refs["dD"][...] = refs["dD"][...] + jnp.sum(g * x, axis=1, keepdims=True)
            refs["dbias"][...] = refs["dbias"][...] + jnp.sum(dv, axis=1, keepdims=True)
            _barrier(cfg)
            return carry

        jax.lax.fori_loop(0, n_tiles, body, 0)

    out_shape = [jax.ShapeDtypeStruct(*shapes[k]) for k in names_out]
    outs = dict(zip(names_out, triton_call("selective_scan_parallel_backward", kernel, names_in, names_out, out_shape,
                                     _in_specs(names_in, s), [specs[k] for k in names_out],
                                     (batch, n_blocks), cfg, cfg["backward_num_warps"])(*operands)))
    return Canon(_t(outs["dx"]), _t(outs["ddt"]), _t(outs.get("dz")),
                 _t(outs["dB"].sum(1)).astype(c.B.dtype), _t(outs["dC"].sum(1)).astype(c.C.dtype),
                 None, outs["dA"].sum(0).T, outs["dD"].sum(0).T, outs["dbias"].sum(0).T,
                 _t(outs["dh0"] + outs["dcarry"]) if has_h0 else None)


@functools.lru_cache(maxsize=None)
def kernels(chunk: int = CHUNK, inference_chunk: int = INFERENCE_CHUNK, block_d: int = BLOCK_D,
            num_warps: int = NUM_WARPS, backward_block_d: int = BACKWARD_BLOCK_D,
            backward_num_warps: int = BACKWARD_NUM_WARPS, interpret: bool = False) -> Kernels:
    """chunk: time steps per tile of the training kernels; inference_chunk: the forward's tile when no
    backward follows; block_d, num_warps: the forward's channels per program (the largest power of two
    <= it dividing d_inner) and warps; backward_block_d, backward_num_warps: the backward's. Tiles and
    blocks are powers of two (Triton tensors)."""
    for name, value in (("chunk", chunk), ("inference_chunk", inference_chunk), ("block_d", block_d),
                        ("backward_block_d", backward_block_d)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"pallas_gpu_parallel {name}={value}: must be a power of two")
    cfg = dict(chunk=chunk, inference_chunk=inference_chunk, block_d=block_d, num_warps=num_warps,
               backward_block_d=backward_block_d, backward_num_warps=backward_num_warps, interpret=interpret)
    return pow2_state_kernels(_forward, _backward, 3, max(chunk, inference_chunk), cfg)


@register_backend("pallas_gpu_parallel")
def pallas_gpu_parallel_scan(x, dt, A, B, C, D, z, dt_bias, reset, initial_state):
    return fused_scan(kernels(), x, dt, A, B, C, D, z, dt_bias, reset, initial_state)


def with_kernels(**options):
    """The backend with other tile sizes, or in interpret mode (`interpret=True`, for CPU tests)."""
    return functools.partial(fused_scan, kernels(**options))
