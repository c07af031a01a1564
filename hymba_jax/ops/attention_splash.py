"""The text part of the 'splash' attention backend: Pallas splash attention (TPU), which skips the tiles
outside the causal or sliding-window band (the mask's block structure is worked out on the host when the
kernel is built) and masks packed documents with segment ids.

The meta tokens are not in this call: they are visible to every document, which splash's segment ids
(equality only) cannot say, so `hymba_jax.ops.attention.merged_attention` attends to them apart and merges
the two through the log-sum-exp. Splash's own VJP recomputes the probabilities from its own output and
log-sum-exp; the merged gradients need the merged ones, so the backward here calls splash's backward
kernels with them (`_splash_attention_bwd`, private in jax 0.10: the one place to update with jax).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

from hymba_jax.ops.attention import SKIPPING_BACKENDS, FlashPart

BLOCK = 512           # q and kv tile (MaxText's default); shorter sequences use one tile
MIN_BLOCK = SKIPPING_BACKENDS["splash"]


def block_size(length: int, block: int = BLOCK) -> int:
    """The tile for `length` tokens: `block`, or the largest multiple of 128 below it dividing `length`."""
    for size in range(min(block, length) // MIN_BLOCK * MIN_BLOCK, MIN_BLOCK - 1, -MIN_BLOCK):
        if length % size == 0:
            return size
    raise ValueError(f"attention_backend='splash': the text length {length} must be a multiple of {MIN_BLOCK}; "
                     "pad the sequence or use attention_backend='xla'")


def _kernel(heads: int, length: int, window: Optional[int], block: int, interpret: bool):
    """A splash kernel over `heads` query heads and `length` text keys, causal or within `window`."""
    shape = (length, length)
    band = masks.CausalMask(shape) if window is None else masks.LocalMask(shape, (window, 0), offset=0)
    tile = block_size(length, block)
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                              block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile, block_kv_dq=tile)
    return splash.make_splash_mha(masks.MultiHeadMask([band] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, save_residuals=True, interpret=interpret)


def _collapsed(info):
    """A MaskInfo as splash's jitted entry point passes it on (partial mask blocks flattened)."""
    if info is None or info.partial_mask_blocks is None:
        return info
    blocks = info.partial_mask_blocks
    return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def splash_part(*, window: Optional[int], scale: float, block: int = BLOCK, interpret: bool = False
                ) -> FlashPart:
    """The `FlashPart` of the text keys: causal (window None) or within `window` positions, documents apart
    where segments differ. q is scaled before the kernel (splash has no scale). `interpret` runs the
    kernels in the Pallas interpreter (tests on the CPU)."""

    def layout(q, k, v):                  # (B, T, N, d) -> (B, N, T, d); q scaled
        return (jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2), jnp.swapaxes(k, 1, 2),
                jnp.swapaxes(v, 1, 2))

    def ids(segments):
        return None if segments is None else splash.SegmentIds(q=segments.astype(jnp.int32),
                                                               kv=segments.astype(jnp.int32))

    def forward(q, k, v, segments, run_time_window):
        del run_time_window                  # None: the window is built into the kernel's mask
        kernel = _kernel(q.shape[2], q.shape[1], window, block, interpret)
        qs, ks, vs = layout(q, k, v)
        out, (lse,) = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=ids(s)))(qs, ks, vs, segments)
        return jnp.swapaxes(out, 1, 2).astype(q.dtype), lse.astype(jnp.float32)

    def backward(q, k, v, segments, run_time_window, out, lse, dout):
        del run_time_window
        kernel = _kernel(q.shape[2], q.shape[1], window, block, interpret)
        kw = kernel.kwargs
        dq_info, dkv_info = _collapsed(kernel.dq_mask_info), _collapsed(kernel.dkv_mask_info)

        def one(qb, kb, vb, sb, ob, lb, dob):
            res = (qb, kb, vb, ids(sb), None, ob, lb, dq_info, dkv_info)
            grads = splash._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
                                                 kw["mask_function"], kw["attn_logits_soft_cap"],
                                                 kw["interpret"], res, dob)
            return grads[3:6]

        qs, ks, vs = layout(q, k, v)
        dq, dk, dv = jax.vmap(one)(qs, ks, vs, segments, jnp.swapaxes(out, 1, 2), lse, jnp.swapaxes(dout, 1, 2))
        dq = dq.astype(jnp.float32) * scale
        return (jnp.swapaxes(dq, 1, 2).astype(q.dtype), jnp.swapaxes(dk, 1, 2).astype(k.dtype),
                jnp.swapaxes(dv, 1, 2).astype(v.dtype))

    return FlashPart(forward, backward)
