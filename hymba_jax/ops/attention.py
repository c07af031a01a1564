"""Fused attention for the model's masks, behind `HymbaConfig.attention_backend`.

* 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's flash attention (GPU, bf16 or
  fp16). Our masks (global causal or sliding window, the meta tokens always visible, packed documents
  apart) are not one of cuDNN's built-in patterns (its causal mask is aligned to the first key, not to the
  last, and its sliding window knows no always-visible prefix), so the boolean mask goes in as it is; cuDNN
  turns it into an additive bias tile by tile, and the (T, S) probabilities are never stored.
  cuDNN also needs equal query/key and value head sizes: the smaller side is padded with zeros (zeros add
  nothing to q.k or to the output), with the softmax scale kept at 1 / sqrt(qk_head_dim).

The plain XLA reference stays in `hymba_jax.model.attention.dot_product_attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:  # the Triton compiler parameters (absent from some jaxlib builds; not needed in interpret mode)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

ATTENTION_BACKENDS = ("xla", "cudnn")   # names for HymbaConfig.attention_backend ("auto" picks one)


def _pad_last(t: jax.Array, size: int) -> jax.Array:
    return jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, size - t.shape[-1])])


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, prefix=None, *,
                    implementation: str = "cudnn") -> jax.Array:
    """q (B, T, H, dk); k (B, S, KV, dk); v (B, S, KV, dv); mask (B|1, T, P + S) bool; prefix: (k, v)
    of P keys before k/v (B|1, P, KV, d), e.g. the meta tokens, or None.

    Returns (B, T, H, dv) in q's dtype, equal to the reference `dot_product_attention`.
    `implementation` is passed to jax.nn.dot_product_attention ('cudnn'; 'xla' runs the same padding and
    mask handling anywhere, for tests).
    """
    if prefix is not None:
        batch = q.shape[0]
        expand = lambda t: jnp.broadcast_to(t, (batch,) + t.shape[1:]).astype(q.dtype)
        k = jnp.concatenate([expand(prefix[0]), k.astype(q.dtype)], axis=1)
        v = jnp.concatenate([expand(prefix[1]), v.astype(q.dtype)], axis=1)
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    width = max(qk_dim, v_dim)
    q, k, v = (_pad_last(t, width) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), mask=mask[:, None], scale=qk_dim ** -0.5,
                                       implementation=implementation)
    return out[..., :v_dim]


# --------------------------------------------------------------------------------------------------
# Decode attention: one query position against a K/V cache, as one Pallas (Triton) kernel.

DECODE_BLOCK = 128     # cache slots per iteration (the largest power of two up to this dividing the slots)
DECODE_MIN_ROWS = 16   # Triton's smallest matmul tile: the G query heads of a KV head are padded to it


def _decode_block(slots: int) -> int:
    return math.gcd(slots, DECODE_BLOCK)


def decode_kernel_fits(slots: int, qk_dim: int, v_dim: int) -> bool:
    """Whether `cache_attention`'s kernel takes this cache: a slot block of at least 16 divides the slots
    and both head sizes are powers of two of at least 16 (Triton's tiles)."""
    pow2 = lambda n: n >= 16 and n & (n - 1) == 0
    return _decode_block(slots) >= 16 and pow2(qk_dim) and pow2(v_dim)


def _cache_attention_kernel(q_ref, k_ref, v_ref, mask_ref, acc_ref, max_ref, sum_ref, *, block: int,
                            scale: float):
    """One (row, KV head): its padded query heads q (G', dk) against the slots of k (S, dk), v (S, dv)
    in blocks, with a running maximum and sum (online softmax): each K/V byte is read once and no logits
    leave the kernel."""
    q = q_ref[...]
    rows = q.shape[0]
    low = jnp.finfo(jnp.float32).min

    def body(i, carry):
        top, total, acc = carry
        k = k_ref[pl.ds(i * block, block), :]
        v = v_ref[pl.ds(i * block, block), :]
        visible = mask_ref[pl.ds(i * block, block)] != 0
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale           # (G', block)
        logits = jnp.where(visible[None, :], logits, low)
        new_top = jnp.maximum(top, jnp.max(logits, axis=1))
        weights = jnp.exp(logits - new_top[:, None])
        rescale = jnp.exp(top - new_top)
        total = total * rescale + jnp.sum(weights, axis=1)
        acc = acc * rescale[:, None] + jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return new_top, total, acc

    init = (jnp.full((rows,), low, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, v_ref.shape[-1]), jnp.float32))
    top, total, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block, body, init)
    acc_ref[...] = acc
    max_ref[...] = top
    sum_ref[...] = total


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, interpret: bool = False
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax attention of one query position over a cache, unnormalised, for merging with other keys.

    q (B, KV, G, dk); k (B, KV, S, dk), v (B, KV, S, dv) in the cache's own layout (read in place);
    mask (B, S) bool. Returns acc (B, KV, G, dv) = sum_s e^(l_s - m) v_s, the maximum m (B, KV, G) and
    sum (B, KV, G) = sum_s e^(l_s - m) over the visible slots, with l_s = q.k_s / sqrt(dk), all fp32.
    (Where no slot is visible m is float32's lowest, and a merge with any visible key drops this part.)
    `interpret=True` runs the kernel on the CPU (tests).
    """
    batch, kv_heads, groups, qk_dim = q.shape
    slots, v_dim = k.shape[2], v.shape[-1]
    if not decode_kernel_fits(slots, qk_dim, v_dim):
        raise ValueError(f"cache_attention: {slots} slots, head sizes {qk_dim}/{v_dim} do not fit the kernel "
                         "(check decode_kernel_fits first)")
    rows = max(DECODE_MIN_ROWS, pl.next_power_of_2(groups))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - groups), (0, 0))).astype(k.dtype)
    per_head = lambda *shape: pl.BlockSpec((None, None) + shape, lambda b, h: (b, h) + (0,) * len(shape))
    kernel = functools.partial(_cache_attention_kernel, block=_decode_block(slots), scale=qk_dim ** -0.5)
    params = None if interpret or plgpu is None else plgpu.CompilerParams(num_warps=4, num_stages=2)
    acc, top, total = pl.pallas_call(
        kernel, grid=(batch, kv_heads),
        in_specs=[per_head(rows, qk_dim), per_head(slots, qk_dim), per_head(slots, v_dim),
                  pl.BlockSpec((None, slots), lambda b, h: (b, 0))],
        out_specs=[per_head(rows, v_dim), per_head(rows), per_head(rows)],
        out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, rows, v_dim), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, rows), jnp.float32),
                   jax.ShapeDtypeStruct((batch, kv_heads, rows), jnp.float32)],
        compiler_params=params, interpret=interpret, name="cache_attention",
    )(q, k, v, mask.astype(jnp.int8))
    return acc[:, :, :groups], top[:, :, :groups], total[:, :, :groups]
