"""The attention branch: GQA over the meta tokens and the text, global or sliding-window, with
cross-layer KV sharing (a consumer layer reuses its producer's post-RoPE keys and values)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from hymba_jax.config import HymbaConfig
from hymba_jax.model.params import Dense, accum_dtype
from hymba_jax.model.rope import apply_rope
from hymba_jax.ops.attention import (SKIPPING_BACKENDS, cache_attention, decode_kernel_fits, fused_attention,
                                     skipping_attention)
from hymba_jax.ops.auto import attention_backend


class KV(NamedTuple):
    """Keys (B, S, kv_heads, qk_head_dim) after RoPE and values (B, S, kv_heads, v_head_dim)."""

    k: jax.Array
    v: jax.Array


def attention_mask(query_index: jax.Array, key_index: jax.Array, *, window: Optional[int],
                   query_segment: Optional[jax.Array] = None, key_segment: Optional[jax.Array] = None
                   ) -> jax.Array:
    """Which keys each query sees among the tokens of the current pass (meta/prefix keys are handled
    by the caller: they are always visible).

    Indices are positions in one sequence ((B, Tq) and (B, Tk), or unbatched). A query sees keys at or
    before it, within `window` positions (q - k <= window) unless `window` is None (global layers), and
    in its own document when segments are given. Returns (B, Tq, Tk) bool.
    """
    q = query_index[..., :, None]
    k = key_index[..., None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (q - k <= window)
    if query_segment is not None:
        mask = mask & (query_segment[..., :, None] == key_segment[..., None, :])
    return mask


def with_prefix(mask: jax.Array, num_prefix: int) -> jax.Array:
    """Prepend `num_prefix` always-visible key columns (the meta tokens) to a (B, Tq, Tk) mask."""
    if num_prefix == 0:
        return mask
    visible = jnp.ones(mask.shape[:-1] + (num_prefix,), bool)
    return jnp.concatenate([visible, mask], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TextMask:
    """The mask of a pass over text positions 0..T-1 (queries and keys the same tokens) after
    `num_prefix` always-visible keys (the meta tokens), in two forms: `dense` (B|1, T, P + T) bool for
    the dense backends, and its structure (causal or a `window`, `segments` (B, T) for packed documents
    or None) for the kernels that skip masked tiles (`SKIPPING_BACKENDS`). Build it with `text_mask`, or
    with `layer_kind_mask` for a layer whose kind is data: then `window` is None and `run_time_window`
    an int32 scalar (a global layer's is T, which hides nothing)."""

    dense: jax.Array
    segments: Optional[jax.Array]
    window: Optional[int] = dataclasses.field(metadata=dict(static=True))
    num_prefix: int = dataclasses.field(metadata=dict(static=True))
    run_time_window: Optional[jax.Array] = None


def text_mask(length: int, *, window: Optional[int], segments: Optional[jax.Array], num_prefix: int
              ) -> TextMask:
    """The `TextMask` of `length` text positions: `attention_mask` over them (documents apart where
    `segments` (B, T) differ) behind `num_prefix` always-visible keys."""
    index = jnp.arange(length)[None]
    dense = with_prefix(attention_mask(index, index, window=window, query_segment=segments,
                                       key_segment=segments), num_prefix)
    return TextMask(dense, segments, window, num_prefix)


Mask = Union[jax.Array, TextMask]


def layer_kind_mask(masks: dict[bool, Mask], is_global: jax.Array) -> Mask:
    """The mask of a layer whose kind is data (the one-body layer scan, `hymba_jax.model.lm`): masks[True]
    where `is_global` (a bool scalar), else masks[False]. TextMasks stay TextMasks, their window given at
    run time, so one compiled layer serves both kinds."""
    if masks[True] is masks[False]:
        return masks[True]
    if not isinstance(masks[True], TextMask):
        return jnp.where(is_global, masks[True], masks[False])
    global_mask, local_mask = masks[True], masks[False]
    width = lambda mask: mask.dense.shape[-2] if mask.window is None else mask.window
    window = jnp.where(is_global, width(global_mask), width(local_mask)).astype(jnp.int32)
    return TextMask(jnp.where(is_global, global_mask.dense, local_mask.dense), global_mask.segments, None,
                    global_mask.num_prefix, window)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          prefix: Optional[KV] = None) -> jax.Array:
    """Grouped-query attention, softmax in fp32.

    q (B, T, H, dk); k (B, S, KV, dk); v (B, S, KV, dv); mask (B|1, T, P + S) bool over the P prefix keys
    then the S keys. prefix: keys/values (B|1, P, KV, d) before k/v (the meta tokens, or a decode cache),
    attended in place rather than concatenated to k/v, so a large cache is read once and never copied:
    each block of keys gets its own logits, and the softmax is taken across the blocks (shared maximum
    and denominator) without concatenating them; the output is normalised after the value products.
    Query head h uses KV head h // (H / KV); the query heads of one KV head form a (G, T) block of one
    batched matmul per (row, KV head), no KV head is repeated. Returns (B, T, H, dv) in q's dtype.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    acc = accum_dtype(q.dtype)
    blocks = [KV(k, v)] if prefix is None else [prefix, KV(k, v)]
    masks = [mask] if prefix is None else jnp.split(mask, [prefix.k.shape[1]], axis=-1)
    logits = []
    for block, block_mask in zip(blocks, masks):
        block_logits = jnp.einsum("btkgd,bskd->bkgts", q, block.k, preferred_element_type=acc)
        block_logits = block_logits * (1.0 / head_dim ** 0.5)
        logits.append(jnp.where(block_mask[:, None, None], block_logits, jnp.finfo(acc).min))
    top = functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in logits])
    weights = [jnp.exp(x - top) for x in logits]
    total = sum(jnp.sum(w, axis=-1) for w in weights)                              # (B, KV, G, T)
    out = sum(jnp.einsum("bkgts,bskd->btkgd", w.astype(v.dtype), block.v).astype(acc)
              for w, block in zip(weights, blocks))
    out = out / jnp.moveaxis(total, 3, 1)[..., None]
    return out.astype(q.dtype).reshape(batch, length, heads, v.shape[-1])


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, prefix: KV, *,
                     interpret: bool = False) -> jax.Array:
    """`dot_product_attention` for one query position (T = 1) after a cache, through the Pallas kernel.

    q (B, 1, H, dk); k, v (B, 1, KV, d) this position's own key and value; mask (B, 1, P + 1); prefix
    (B, P, KV, d): the cache buffers as the engine passes them, a transposed view of buffers stored
    (B, KV, P, d). They are transposed back here (XLA cancels the pair), so the kernel reads each buffer
    in place, once, for all G = H / KV query heads of a KV head, and no logits or probabilities are
    stored. Its partial softmax is merged with the position's own key here. Returns (B, 1, H, dv).
    """
    batch, _, heads, head_dim = q.shape
    kv_heads, slots = k.shape[2], prefix.k.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    acc, top, total = cache_attention(q, jnp.swapaxes(prefix.k, 1, 2), jnp.swapaxes(prefix.v, 1, 2),
                                      mask[:, 0, :slots], interpret=interpret)
    f32 = jnp.float32
    own = jnp.einsum("bkgd,bskd->bkgs", q, k, preferred_element_type=f32) * (1.0 / head_dim ** 0.5)
    own = jnp.where(mask[:, :, slots:][:, None], own, jnp.finfo(f32).min)               # (B, KV, G, 1)
    new_top = jnp.maximum(top, jnp.max(own, axis=-1))
    weights = jnp.exp(own - new_top[..., None])
    rescale = jnp.exp(top - new_top)
    out = acc * rescale[..., None] + jnp.einsum("bkgs,bskd->bkgd", weights.astype(v.dtype), v).astype(f32)
    out = out / (total * rescale + jnp.sum(weights, axis=-1))[..., None]
    return out.astype(q.dtype).reshape(batch, 1, heads, v.shape[-1])


class AttentionBranch(nn.Module):
    """Attention heads of one hybrid layer. Projections come from the layer's shared in_proj input.

    There is no output projection of its own: the layer's out_proj follows the fusion.
    """

    config: HymbaConfig
    owns_kv: Optional[bool]     # None: the layer of the one-body scan, its ownership given at run time

    @nn.compact
    def __call__(self, u: jax.Array, positions: jax.Array, mask: Mask, prefix_kv: Optional[KV],
                 shared_kv: Optional[KV], owns: Optional[jax.Array] = None) -> tuple[jax.Array, KV]:
        """u (B, T, d) normalised input; positions (B|1, T); mask (B|1, T, S_prefix + T) or its TextMask;
        prefix_kv (B|1, S_prefix, ...) or None. With `owns_kv` None, `owns` (a bool scalar) says whether
        this layer's own K/V or `shared_kv` are used (both are computed: a consumer's K/V projections are
        zeros in the one-body scan, `hymba_jax.model.lm`).

        Returns the attention output (B, T, heads * v_head_dim) and this pass's K/V (own or shared).
        """
        cfg = self.config
        dense = lambda features, axes, name: Dense(features, ("embed",) + axes, cfg.param_dtype,
                                                  cfg.initializer_range, name=name)
        base = cfg.rope_base
        q = dense((cfg.num_heads, cfg.qk_head_dim), ("heads", "head_dim"), "q_proj")(u)
        q = apply_rope(q, positions, base)
        if self.owns_kv is False:
            kv = shared_kv
        else:
            k = dense((cfg.num_kv_heads, cfg.qk_head_dim), ("kv_heads", "head_dim"), "k_proj")(u)
            v = dense((cfg.num_kv_heads, cfg.v_head_dim), ("kv_heads", "head_dim"), "v_proj")(u)
            kv = KV(apply_rope(k, positions, base), v)
            if self.owns_kv is None:
                kv = KV(*(jnp.where(owns, own, shared.astype(own.dtype)) for own, shared in zip(kv, shared_kv)))
        out = attend(q, kv.k, kv.v, mask, prefix_kv, attention_backend(cfg.attention_backend, cfg.dtype))
        return out.reshape(out.shape[:2] + (-1,)), kv


GPU_BACKENDS = ("cudnn", "cudnn_skip", "pallas_flash")   # the attention backends that run on NVIDIA GPUs only


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, prefix: Optional[KV], backend: str
           ) -> jax.Array:
    """Attention of q (B, T, H, dk) over [prefix | k, v] on a concrete backend (see `dot_product_attention`
    for the shapes). A tile-skipping backend needs a `TextMask` whose prefix is `prefix`; any other mask (a
    decode step's, the meta tokens' own pass) runs densely: on cuDNN for the GPU backends, in XLA for
    'splash', and so do text lengths the kernel cannot tile (`SKIPPING_BACKENDS`: not a multiple of 128 for
    splash, of 64 for pallas_flash). A decode step (one query after the batch's cache) takes the decode
    kernel on the GPU backends where it fits, else XLA.
    """
    decode = prefix is not None and q.shape[1] == 1 and prefix.k.shape[0] == q.shape[0]
    if decode and not isinstance(mask, TextMask):
        # One query after a cache of its batch's rows: on a GPU backend the decode kernel (cuDNN would need
        # the cache copied next to the new key, for one query), else XLA.
        if backend in GPU_BACKENDS and decode_kernel_fits(prefix.k.shape[1], q.shape[-1], v.shape[-1]):
            return decode_attention(q, k, v, mask, prefix)
        return dot_product_attention(q, k, v, mask, prefix)
    if isinstance(mask, TextMask) and mask.num_prefix != (0 if prefix is None else prefix.k.shape[1]):
        raise ValueError(f"attention: the mask has {mask.num_prefix} prefix keys but the prefix K/V has "
                         f"{0 if prefix is None else prefix.k.shape[1]}")
    tiles = backend in SKIPPING_BACKENDS and q.shape[1] % SKIPPING_BACKENDS[backend] == 0
    if tiles and isinstance(mask, TextMask):
        window = mask.window if mask.run_time_window is None else mask.run_time_window
        return skipping_attention(q, k, v, prefix, mask.segments, window=window, backend=backend)
    dense = mask.dense if isinstance(mask, TextMask) else mask
    if backend in GPU_BACKENDS:
        return fused_attention(q, k, v, dense, prefix, implementation="cudnn")
    return dot_product_attention(q, k, v, dense, prefix)
