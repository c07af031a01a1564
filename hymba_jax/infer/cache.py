"""The generation cache: what every layer carries from one decoding step to the next, and its size.

Per K/V-owning layer the keys (after RoPE) and values of the M meta positions followed by a buffer of text
positions: the last `min(sliding_window, max_len)` positions as a ring for sliding-window layers (slot
M + p mod capacity holds text position p), all `max_len` for global ones. KV consumers store nothing and
read their producer's buffer. Per layer the conv inputs (B, d_conv - 1, d_inner) and the SSM state
(B, d_inner, d_state), fp32. K/V and conv are in the compute dtype.

The cache is the model's own `LayerState` per layer (`HymbaForCausalLM.run_layers` takes it as the prefix
of the next positions) plus how many text positions each row holds. The meta tokens' state is the same for
every sequence: `meta_state` computes it once per set of weights and `init_cache` starts every row from it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from hymba_jax.config import HymbaConfig
from hymba_jax.model.attention import KV
from hymba_jax.model.block import LayerState
from hymba_jax.model.lm import HymbaForCausalLM
from hymba_jax.model.params import accum_dtype
from hymba_jax.model.ssm import SSMState

MetaState = Optional[tuple[LayerState, ...]]   # batch-1 per-layer state of the meta tokens (None: M = 0)


class Cache(NamedTuple):
    """layers[i]: LayerState(kv=KV buffers (B, kv_heads, M + capacity, head_dim) for K/V owners else None,
    ssm=SSMState(conv (B, d_conv - 1, d_inner), ssm (B, d_inner, d_state) fp32) or None without SSM).
    lengths (B,) int32: text positions held by each row.

    pending[i]: the K/V (B, C, kv_heads, head_dim) of the last C positions, not yet in the buffers of owner
    i (None for other layers), of which the first pending_real[b] are real. The next step writes them
    before it reads the buffers: a buffer that is written after being read in the same step would be
    copied by XLA on every step instead of updated in place.
    """

    layers: tuple[LayerState, ...]
    lengths: jax.Array
    pending: tuple[Optional[KV], ...]
    pending_real: jax.Array

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]


def kv_capacity(config: HymbaConfig, layer: int, max_len: int) -> int:
    """Text positions the K/V buffer of `layer` holds (its producer's, for a consumer)."""
    window = config.attention_window(layer)
    return max_len if window is None else min(window, max_len)


@functools.partial(jax.jit, static_argnums=0)
def meta_state(config: HymbaConfig, params) -> MetaState:
    """The meta tokens' per-layer state (batch 1): computed once per set of weights."""
    if not config.num_meta_tokens:
        return None
    _, states, _ = HymbaForCausalLM(config).apply({"params": params}, method=HymbaForCausalLM.meta_pass)
    return states


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def init_cache(config: HymbaConfig, meta: MetaState, batch: int, max_len: int) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` text tokens, every row starting from the
    meta tokens' state (zeros when the model has none)."""
    dtype = jnp.dtype(config.dtype)
    m = config.num_meta_tokens
    layers = []
    for i in range(config.num_layers):
        kv = ssm = None
        if config.has_attention and config.owns_kv(i):
            slots = m + kv_capacity(config, i, max_len)
            k = jnp.zeros((batch, config.num_kv_heads, slots, config.qk_head_dim), dtype)
            v = jnp.zeros((batch, config.num_kv_heads, slots, config.v_head_dim), dtype)
            if m:
                k = k.at[:, :, :m].set(jnp.swapaxes(meta[i].kv.k, 1, 2))
                v = v.at[:, :, :m].set(jnp.swapaxes(meta[i].kv.v, 1, 2))
            kv = KV(k, v)
        if config.has_ssm:
            conv_shape = (batch, config.d_conv - 1, config.d_inner)
            ssm_shape = (batch, config.d_inner, config.d_state)
            if m:
                ssm = SSMState(jnp.broadcast_to(meta[i].ssm.conv.astype(dtype), conv_shape),
                               jnp.broadcast_to(meta[i].ssm.ssm, ssm_shape))
            else:
                ssm = SSMState(jnp.zeros(conv_shape, dtype), jnp.zeros(ssm_shape, accum_dtype(dtype)))
        layers.append(LayerState(kv, ssm))
    zeros = jnp.zeros((batch,), jnp.int32)
    return Cache(tuple(layers), zeros, empty_pending(config, batch), zeros)


def empty_pending(config: HymbaConfig, batch: int) -> tuple[Optional[KV], ...]:
    """One position of pending K/V per owner layer (none real): the shape the decode loop carries."""
    dtype = jnp.dtype(config.dtype)
    return tuple(KV(jnp.zeros((batch, 1, config.num_kv_heads, config.qk_head_dim), dtype),
                    jnp.zeros((batch, 1, config.num_kv_heads, config.v_head_dim), dtype))
                 if config.has_attention and config.owns_kv(i) else None for i in range(config.num_layers))


def slot_positions(cache_lengths: jax.Array, capacity: int) -> jax.Array:
    """(B,) positions held -> (B, capacity) the text position in each buffer slot, -1 where none yet.

    Slot s holds the latest position p < length with p = s (mod capacity) (a buffer that never wraps,
    capacity >= length, holds p = s)."""
    last = cache_lengths[:, None] - 1
    pos = last - jnp.mod(last - jnp.arange(capacity), capacity)
    return jnp.where(pos >= 0, pos, -1)


class CacheSize(NamedTuple):
    """Bytes of a cache by part."""

    kv: int         # text positions' keys and values (buffers and the one pending position)
    meta_kv: int    # the meta positions' keys and values (per sequence)
    conv: int
    ssm: int
    lengths: int    # lengths and pending_real

    @property
    def total(self) -> int:
        return sum(self)


def cache_size(config: HymbaConfig, length: int, batch: int = 1, dtype=None) -> CacheSize:
    """Bytes of `init_cache(config, ..., batch, max_len=length)` with K/V and conv in `dtype` (default:
    the config's compute dtype); the SSM state is fp32 (fp64 when computing in fp64)."""
    dtype = jnp.dtype(dtype or config.dtype)
    item = dtype.itemsize
    kv = meta_kv = conv = ssm = 0
    if config.has_attention:
        per_position = batch * config.num_kv_heads * (config.qk_head_dim + config.v_head_dim) * item
        for i in config.kv_owner_layers:
            kv += (kv_capacity(config, i, length) + 1) * per_position
            meta_kv += config.num_meta_tokens * per_position
    if config.has_ssm:
        conv = config.num_layers * batch * (config.d_conv - 1) * config.d_inner * item
        ssm = config.num_layers * batch * config.d_inner * config.d_state * accum_dtype(dtype).itemsize
    return CacheSize(kv, meta_kv, conv, ssm, 2 * batch * np.dtype(np.int32).itemsize)


def cache_bytes(config: HymbaConfig, length: int, batch: int = 1, dtype=None) -> int:
    """Total bytes of the cache of `batch` sequences of `length` tokens (see `cache_size`)."""
    return cache_size(config, length, batch, dtype).total


def tree_bytes(tree) -> int:
    """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
