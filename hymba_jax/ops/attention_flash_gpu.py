"""The text part of the 'pallas_flash' attention backend: a Pallas (Triton) flash-attention kernel for the
Hymba mask, the alternative to cuDNN's masks ('cudnn_skip'); not yet measured on a GPU (docs/performance.md).

Each program owns a block of `block` queries of one query head (GQA: it reads K/V head h // group) and
loops only over the key blocks the band can reach: causal, keys from q - window for local layers.
Segment ids (documents) are masked elementwise inside those blocks. The forward returns the output and the
fp32 log-sum-exp; the backward takes the merged output's D = rowsum(dO * O) and log-sum-exp (see
`hymba_jax.ops.attention.FlashPart`): a dq kernel walks the same key blocks, a dk/dv kernel walks, per key
block and query head, the query blocks that can see it; the per-query-head dk/dv are summed over each GQA
group outside. q/k heads keep their own width (64), v heads theirs (128). `interpret=True` runs the same
kernels on the CPU (tests).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hymba_jax.ops.attention import FlashPart, SKIPPING_BACKENDS

try:  # the Triton compiler parameters (not needed in interpret mode)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

BLOCK = SKIPPING_BACKENDS["pallas_flash"]     # queries and keys per program / loop step
NEG = -1e30          # masked logits; every row sees its own key, so no row is left all masked


def _bounds(i, block: int, nblocks: int, window: Optional[int]):
    """Key blocks [lo, hi) that queries i*block .. (i+1)*block-1 can see (causal, within window)."""
    hi = jnp.minimum(i + 1, nblocks)
    lo = 0 if window is None else jnp.maximum(i * block - window, 0) // block
    return lo, hi


def _query_bounds(j, block: int, nblocks: int, window: Optional[int]):
    """Query blocks [lo, hi) that can see keys j*block .. (j+1)*block-1."""
    hi = nblocks if window is None else jnp.minimum(((j + 1) * block - 1 + window) // block + 1, nblocks)
    return j, hi


def _masked_logits(q, k, qpos, kpos, qseg, kseg, scale, window):
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    keep = (kpos[None, :] <= qpos[:, None]) & (qseg[:, None] == kseg[None, :])
    if window is not None:
        keep = keep & (qpos[:, None] - kpos[None, :] <= window)
    return jnp.where(keep, s, NEG)


def flash_gpu_part(*, window: Optional[int], scale: float, block: int = BLOCK, num_warps: int = 4,
                   interpret: bool = False) -> FlashPart:
    """The `FlashPart` of the text keys on Triton, causal or within `window`, documents apart by segments."""

    def call(kernel, grid, in_specs, out_specs, out_shape, name):
        params = None
        if plgpu is not None and not interpret:
            params = plgpu.CompilerParams(num_warps=num_warps, num_stages=2)
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              compiler_params=params, interpret=interpret, name=name)

    def specs(q, k, v):
        batch, length, heads, dk = q.shape
        group = heads // k.shape[2]
        rows = pl.BlockSpec((None, block, None, dk), lambda b, h, i: (b, i, h, 0))
        keys = pl.BlockSpec((None, length, None, dk), lambda b, h, i: (b, 0, h // group, 0))
        vals = pl.BlockSpec((None, length, None, v.shape[-1]), lambda b, h, i: (b, 0, h // group, 0))
        out_rows = pl.BlockSpec((None, block, None, v.shape[-1]), lambda b, h, i: (b, i, h, 0))
        stat = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))
        seg_rows = pl.BlockSpec((None, block), lambda b, h, i: (b, i))
        seg_all = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
        return rows, keys, vals, out_rows, stat, seg_rows, seg_all

    def check(q):
        if q.shape[1] % block:
            raise ValueError(f"flash_gpu_part: the text length {q.shape[1]} must be a multiple of block={block}")

    def segs(q, segments):
        return jnp.zeros(q.shape[:2], jnp.int32) if segments is None else segments.astype(jnp.int32)

    def forward(q, k, v, segments):
        check(q)
        batch, length, heads, _ = q.shape
        nblocks = length // block
        rows, keys, vals, out_rows, stat, seg_rows, seg_all = specs(q, k, v)

        def kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref):
            i = pl.program_id(2)
            qb, qseg = q_ref[...], qs_ref[...]
            qpos = i * block + jnp.arange(block)

            def body(j, carry):
                m, l, acc = carry
                at = pl.ds(j * block, block)
                s = _masked_logits(qb, k_ref[at, :], qpos, j * block + jnp.arange(block), qseg, ks_ref[at],
                                   scale, window)
                m_new = jnp.maximum(m, s.max(axis=1))
                p = jnp.exp(s - m_new[:, None])
                alpha = jnp.exp(m - m_new)
                acc = acc * alpha[:, None] + jnp.dot(p.astype(v_ref.dtype), v_ref[at, :],
                                                     preferred_element_type=jnp.float32)
                return m_new, l * alpha + p.sum(axis=1), acc

            lo, hi = _bounds(i, block, nblocks, window)
            init = (jnp.full((block,), NEG, jnp.float32), jnp.zeros((block,), jnp.float32),
                    jnp.zeros((block, v_ref.shape[-1]), jnp.float32))
            m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
            o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
            lse_ref[...] = m + jnp.log(l)

        out, lse = call(kernel, (batch, heads, nblocks), [rows, keys, vals, seg_rows, seg_all], [out_rows, stat],
                        [jax.ShapeDtypeStruct(q.shape[:3] + v.shape[-1:], q.dtype),
                         jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)], "hymba_flash_fwd")(
            q, k, v, segs(q, segments), segs(q, segments))
        return out, lse

    def backward(q, k, v, segments, out, lse, dout):
        check(q)
        batch, length, heads, dk = q.shape
        group = heads // k.shape[2]
        nblocks = length // block
        rows, keys, vals, out_rows, stat, seg_rows, seg_all = specs(q, k, v)
        d = jnp.swapaxes(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), 1, 2)
        seg = segs(q, segments)

        def dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, d_ref, dq_ref):
            i = pl.program_id(2)
            qb, qseg, do = q_ref[...], qs_ref[...], do_ref[...]
            qpos = i * block + jnp.arange(block)
            lse_i, d_i = lse_ref[...], d_ref[...]

            def body(j, dq):
                at = pl.ds(j * block, block)
                kb, vb = k_ref[at, :], v_ref[at, :]
                s = _masked_logits(qb, kb, qpos, j * block + jnp.arange(block), qseg, ks_ref[at], scale, window)
                p = jnp.exp(s - lse_i[:, None])
                dp = jax.lax.dot_general(do, vb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                ds = (p * (dp - d_i[:, None])).astype(kb.dtype)
                return dq + jnp.dot(ds, kb, preferred_element_type=jnp.float32)

            lo, hi = _bounds(i, block, nblocks, window)
            dq = jax.lax.fori_loop(lo, hi, body, jnp.zeros((block, qb.shape[-1]), jnp.float32))
            dq_ref[...] = (dq * scale).astype(dq_ref.dtype)

        dq = call(dq_kernel, (batch, heads, nblocks), [rows, keys, vals, seg_rows, seg_all, out_rows, stat, stat],
                  rows, jax.ShapeDtypeStruct(q.shape, q.dtype), "hymba_flash_dq")(
            q, k, v, seg, seg, dout, lse, d)

        q_all = pl.BlockSpec((None, length, None, dk), lambda b, h, j: (b, 0, h, 0))
        do_all = pl.BlockSpec((None, length, None, v.shape[-1]), lambda b, h, j: (b, 0, h, 0))
        key_rows = pl.BlockSpec((None, block, None, dk), lambda b, h, j: (b, j, h // group, 0))
        val_rows = pl.BlockSpec((None, block, None, v.shape[-1]), lambda b, h, j: (b, j, h // group, 0))
        stat_all = pl.BlockSpec((None, None, length), lambda b, h, j: (b, h, 0))
        dk_rows = pl.BlockSpec((None, block, None, dk), lambda b, h, j: (b, j, h, 0))
        dv_rows = pl.BlockSpec((None, block, None, v.shape[-1]), lambda b, h, j: (b, j, h, 0))

        def dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref):
            j = pl.program_id(2)
            kb, vb, kseg = k_ref[...], v_ref[...], ks_ref[...]
            kpos = j * block + jnp.arange(block)

            def body(i, carry):
                dk_acc, dv_acc = carry
                at = pl.ds(i * block, block)
                qb, do = q_ref[at, :], do_ref[at, :]
                s = _masked_logits(qb, kb, i * block + jnp.arange(block), kpos, qs_ref[at], kseg, scale, window)
                p = jnp.exp(s - lse_ref[at][:, None])
                dv_acc = dv_acc + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                                      preferred_element_type=jnp.float32)
                dp = jax.lax.dot_general(do, vb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                ds = (p * (dp - d_ref[at][:, None])).astype(qb.dtype)
                dk_acc = dk_acc + jax.lax.dot_general(ds, qb, (((0,), (0,)), ((), ())),
                                                      preferred_element_type=jnp.float32)
                return dk_acc, dv_acc

            lo, hi = _query_bounds(j, block, nblocks, window)
            init = (jnp.zeros((block, kb.shape[-1]), jnp.float32), jnp.zeros((block, vb.shape[-1]), jnp.float32))
            dk_acc, dv_acc = jax.lax.fori_loop(lo, hi, body, init)
            dk_ref[...] = dk_acc * scale
            dv_ref[...] = dv_acc

        dk_h, dv_h = call(dkv_kernel, (batch, heads, nblocks),
                          [q_all, key_rows, val_rows, seg_all, seg_rows, do_all, stat_all, stat_all],
                          [dk_rows, dv_rows],
                          [jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           jax.ShapeDtypeStruct(q.shape[:3] + v.shape[-1:], jnp.float32)], "hymba_flash_dkv")(
            q, k, v, seg, seg, dout, lse, d)
        per_group = lambda t: t.reshape(batch, length, heads // group, group, t.shape[-1]).sum(axis=3)
        return dq, per_group(dk_h).astype(k.dtype), per_group(dv_h).astype(v.dtype)

    return FlashPart(forward, backward)
