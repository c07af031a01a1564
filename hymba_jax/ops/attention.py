"""Fused attention for the model's masks, behind `HymbaConfig.attention_backend`.

Dense (every tile of the (T, P + T) scores computed, the mask applied elementwise):

* 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`, cuDNN's flash attention (GPU, bf16 or
  fp16). Our masks (global causal or sliding window, the meta tokens always visible, packed documents
  apart) are not one of cuDNN's built-in patterns (its causal mask is aligned to the first key, not to the
  last, and its sliding window knows no always-visible prefix), so the boolean mask goes in as it is; cuDNN
  turns it into an additive bias tile by tile, and the (T, S) probabilities are never stored.
  cuDNN also needs equal query/key and value head sizes: the smaller side is padded with zeros (zeros add
  nothing to q.k or to the output), with the softmax scale kept at 1 / sqrt(qk_head_dim).

Tile-skipping (`SKIPPING_BACKENDS`, for a pass over text with the meta tokens as prefix, `skipping_attention`):
the text keys go to a flash kernel that knows the causal or sliding-window band and skips the tiles outside
it, the P prefix keys (always visible, to every document) to a second call, and the two are merged exactly
through their log-sum-exps (`_merged`):

* 'cudnn_skip' (GPU): cuDNN's own causal / sliding-window mask for the text (`hymba_jax.ops.attention_cudnn`).
* 'splash' (TPU): Pallas splash attention (`hymba_jax.ops.attention_splash`), prefix keys in XLA.
* 'pallas_flash' (GPU): our Pallas Triton kernels (`hymba_jax.ops.attention_flash_gpu`), the prefix keys
  in the same kernels when they are whole key blocks (then nothing is merged), else in XLA; the window is
  an operand of the kernels, so one compiled set serves global and sliding-window layers.

Decode (`cache_attention`, GPU): one query position against a K/V cache in the cache's own layout, one
Pallas (Triton) program per (row, KV head) with an online softmax, merged with the position's own key.

The plain XLA reference stays in `hymba_jax.model.attention.dot_product_attention`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

try:  # the Triton compiler parameters (absent from some jaxlib builds; not needed in interpret mode)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

from hymba_jax.parallel import kernel_mesh_axes

# The tile-skipping backends and the multiple of which the text length must be (other lengths run densely):
# splash tiles the keys in whole 128-lane vregs, the Triton kernels in their blocks (a multiple of
# `attention_flash_gpu.DEFAULT_CONFIG.length_multiple`).
SKIPPING_BACKENDS = {"cudnn_skip": 1, "splash": 128, "pallas_flash": 64}
ATTENTION_BACKENDS = ("xla", "cudnn") + tuple(SKIPPING_BACKENDS)   # for HymbaConfig.attention_backend
# The backends whose masks need the sliding window at trace time (splash and cuDNN build their band into the
# kernel); every other backend takes a layer's window as data, so global and sliding-window layers are one
# compiled layer (`hymba_jax.model.lm.uses_one_layer_body`).
STATIC_WINDOW_BACKENDS = ("cudnn_skip", "splash")


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


# Tile-skipping attention: a text part and a prefix part, merged through the log-sum-exp.


class FlashPart(NamedTuple):
    """One flash-attention call over a block of keys, in the layout of `dot_product_attention`.

    forward(q (B, T, H, dk), k (B, S, KV, dk), v (B, S, KV, dv), segments (B, T) or None, window) returns
    the output (B, T, H, dv) in q's dtype and the fp32 log-sum-exp of each query's scaled scores (B, H, T).
    backward(q, k, v, segments, window, out, lse, dout) returns (dq, dk, dv) for the softmax normalised by
    `lse` (B, H, T) with D = rowsum(dout * out): given the merged output and log-sum-exp of several parts,
    each part's backward gives exactly its share of the full attention's gradients (probabilities
    exp(s - lse) are the full softmax restricted to the part's keys).

    window: the band as data, an int32 scalar (a global layer's is the text length) for the parts that
    take it at run time (the 'pallas_flash' kernels), so one compiled kernel serves every layer;
    None for the parts built for one window (splash, cuDNN's masks) and the prefix parts, which ignore it.
    """

    forward: Callable
    backward: Callable


def xla_prefix_part(scale: float) -> FlashPart:
    """A `FlashPart` in plain XLA with every key visible (the meta tokens: P keys, a (B, H, T, P) score
    block, small next to the text's)."""

    def logits(q, k):
        batch, length, heads, dk = q.shape
        qg = q.reshape(batch, length, k.shape[2], heads // k.shape[2], dk)
        return jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale

    def to_bht(x):                                   # (B, KV, G, T) -> (B, H, T)
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward(q, k, v, segments, window):
        del segments, window
        s = logits(q, k)
        lse = jax.nn.logsumexp(s, axis=-1)
        probs = jnp.exp(s - lse[..., None]).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
        return out.reshape(q.shape[:3] + (v.shape[-1],)).astype(q.dtype), to_bht(lse)

    def backward(q, k, v, segments, window, out, lse, dout):
        del segments, window
        batch, length, heads, _ = q.shape
        kv_heads = k.shape[2]
        group = lambda x: x.reshape(batch, length, kv_heads, heads // kv_heads, x.shape[-1])
        s = logits(q, k)
        probs = jnp.exp(s - lse.reshape(s.shape[:-1])[..., None])
        do = group(dout)
        dv = jnp.einsum("bkgts,btkgd->bskd", probs.astype(v.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.einsum("btkgd,bskd->bkgts", do, v, preferred_element_type=jnp.float32)
        rows = jnp.einsum("btkgd,btkgd->bkgt", do.astype(jnp.float32), group(out).astype(jnp.float32))
        ds = (probs * (dp - rows[..., None])).astype(q.dtype)
        dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=jnp.float32) * scale
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, group(q), preferred_element_type=jnp.float32) * scale
        return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)

    return FlashPart(forward, backward)


def _merge_outputs(parts):
    """[(out (B, T, H, dv), lse (B, H, T))] -> their softmax-weighted sum in fp32 and the total lse."""
    lse = parts[0][1]
    for _, other in parts[1:]:
        lse = jnp.logaddexp(lse, other)
    weight = lambda part_lse: jnp.swapaxes(jnp.exp(part_lse - lse), 1, 2)[..., None]
    return sum(out.astype(jnp.float32) * weight(part_lse) for out, part_lse in parts), lse


class _Parts(NamedTuple):
    text: FlashPart
    prefix: Optional[FlashPart]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _merged(parts: _Parts, q, k, v, prefix_k, prefix_v, segments, window):
    return _merged_fwd(parts, q, k, v, prefix_k, prefix_v, segments, window)[0]


def _expand(t, batch):
    return jnp.broadcast_to(t, (batch,) + t.shape[1:])


def _merged_fwd(parts, q, k, v, prefix_k, prefix_v, segments, window):
    outs = [parts.text.forward(q, k, v, segments, window)]
    if parts.prefix is not None:
        batch = q.shape[0]
        outs.append(parts.prefix.forward(q, _expand(prefix_k, batch).astype(q.dtype),
                                         _expand(prefix_v, batch).astype(q.dtype), None, None))
    out, lse = _merge_outputs(outs) if len(outs) > 1 else outs[0]
    out = out.astype(q.dtype)
    return out, (q, k, v, prefix_k, prefix_v, segments, window, out, lse)


def _merged_bwd(parts, res, dout):
    q, k, v, prefix_k, prefix_v, segments, window, out, lse = res
    dout = dout.astype(q.dtype)
    dq, dk, dv = parts.text.backward(q, k, v, segments, window, out, lse, dout)
    dpk = dpv = None
    if parts.prefix is not None:
        batch = q.shape[0]
        dq_p, dpk, dpv = parts.prefix.backward(q, _expand(prefix_k, batch).astype(q.dtype),
                                               _expand(prefix_v, batch).astype(q.dtype), None, None, out, lse,
                                               dout)
        dq = (dq.astype(jnp.float32) + dq_p.astype(jnp.float32)).astype(q.dtype)
        unbroadcast = lambda g, like: jnp.sum(g.astype(jnp.float32), axis=0, keepdims=like.shape[0] == 1
                                              ).reshape(like.shape).astype(like.dtype)
        dpk, dpv = unbroadcast(dpk, prefix_k), unbroadcast(dpv, prefix_v)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), dpk, dpv, None, None


_merged.defvjp(_merged_fwd, _merged_bwd)


def merged_attention(text: FlashPart, prefix_part: Optional[FlashPart], q, k, v, prefix, segments,
                     window: Optional[jax.Array] = None):
    """Attention of q over [prefix | k, v] as `text` over k, v and `prefix_part` over the prefix keys
    (B|1, P, KV, d), merged exactly through the log-sum-exp, forward and backward. prefix: a
    `(k, v)` pair or None; window: the text part's run-time window (see `FlashPart`) or None. Returns
    (B, T, H, dv) in q's dtype."""
    if prefix is None:
        prefix_part = None
        prefix = (jnp.zeros((1, 0) + k.shape[2:], k.dtype), jnp.zeros((1, 0) + v.shape[2:], v.dtype))
    return _merged(_Parts(text, prefix_part), q, k, v, prefix[0], prefix[1], segments, window)


def per_device(fn: Callable, q, k, v, prefix, segments, window=None):
    """fn(q, k, v, prefix, segments, window) on each device's rows and heads (window: the same on every
    device, or None).

    A kernel is a custom call XLA cannot split, so under a multi-device mesh (`parallel.sharding_context`)
    shard_map runs it on the local block: rows as the rules split 'batch', query and KV heads as they split
    'heads' (only when the split divides both, so a device keeps whole GQA groups). Outside a mesh, or on
    one device, fn runs as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    prefix = None if prefix is None else tuple(prefix)
    if mesh.empty or mesh.size == 1:
        return fn(q, k, v, prefix, segments, window)
    rows = kernel_mesh_axes("batch", (q.shape[0],), mesh)
    heads = kernel_mesh_axes("heads", (q.shape[2], k.shape[2]), mesh)
    big = PartitionSpec(rows, None, heads, None)
    pre = None if prefix is None else (PartitionSpec(None, None, heads, None),) * 2
    seg = None if segments is None else PartitionSpec(rows, None)
    everywhere = None if window is None else PartitionSpec()
    return jax.shard_map(fn, mesh=mesh, in_specs=(big, big, big, pre, seg, everywhere), out_specs=big,
                         check_vma=False)(q, k, v, prefix, segments, window)


def skipping_attention(q, k, v, prefix, segments, *, window: Union[None, int, jax.Array], backend: str
                       ) -> jax.Array:
    """Attention of text queries q (B, T, H, dk) over the prefix keys (all visible) and the text keys
    k (B, T, KV, dk), v (B, T, KV, dv) at or before each query (within `window` positions unless None, in
    its own document where `segments` (B, T) differ), on a tile-skipping `backend`; equal to
    `dot_product_attention` with the `TextMask` of the same structure. `window` may be an int32 scalar
    array (known at run time) except on `STATIC_WINDOW_BACKENDS`. Returns (B, T, H, dv)."""
    scale = q.shape[-1] ** -0.5
    if backend in STATIC_WINDOW_BACKENDS and isinstance(window, jax.Array):
        raise ValueError(f"attention_backend={backend!r} builds the window into its kernel: it needs an int "
                         "window, not an array (run its layers kind by kind, `layer_runs`)")
    if backend == "splash":
        from hymba_jax.ops.attention_splash import splash_part
        text = splash_part(window=window, scale=scale)
        prefix_part = xla_prefix_part(scale)
    elif backend == "cudnn_skip":
        from hymba_jax.ops.attention_cudnn import cudnn_part
        text = cudnn_part(window=window, causal=True, scale=scale)
        prefix_part = cudnn_part(window=None, causal=False, scale=scale)
    elif backend == "pallas_flash":
        from hymba_jax.ops.attention_flash_gpu import flash_attention
        return per_device(functools.partial(flash_attention, scale=scale), q, k, v, prefix, segments, window)
    else:
        raise ValueError(f"attention_backend={backend!r} does not skip tiles; choose one of {SKIPPING_BACKENDS}")
    return per_device(lambda *a: merged_attention(text, prefix_part, *a), q, k, v, prefix, segments)
