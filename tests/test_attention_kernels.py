"""The fused-attention op (hymba_jax.ops.attention) against the XLA reference on the model's masks.

On CPU the op runs jax.nn.dot_product_attention's 'xla' implementation with the same head padding, prefix
concatenation and mask handling that the 'cudnn' backend uses on the GPU (benchmarks/attention.py checks
cuDNN itself on the H200). fp32: both sides are the same softmax attention with sums in other orders,
errors ~1e-7; 1e-5 relative catches any wrong mask entry, scale or head mapping (errors of order 1e-1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hymba_jax.config import ConfigError, hymba_tiny
from hymba_jax.model.attention import KV, attention_mask, dot_product_attention, with_prefix
from hymba_jax.ops.attention import fused_attention

B, T, M, H, KVH, DK, DV = 2, 12, 3, 4, 2, 8, 16


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("window,packed", [(None, False), (4, False), (4, True)],
                         ids=["global", "window", "window-packed"])
def test_fused_matches_reference(window, packed):
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, T, H, DK))
    k = jax.random.normal(ks[1], (B, T, KVH, DK))
    v = jax.random.normal(ks[2], (B, T, KVH, DV))
    prefix = KV(jax.random.normal(ks[3], (1, M, KVH, DK)), jax.random.normal(ks[4], (1, M, KVH, DV)))
    index = jnp.arange(T)[None]
    seg = jnp.array([[0] * 5 + [1] * 7, [0] * 12]) if packed else None
    mask = with_prefix(attention_mask(index, index, window=window, query_segment=seg, key_segment=seg), M)
    w = jax.random.normal(ks[5], (B, T, H, DV))

    def run(fn):
        return jax.value_and_grad(lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_) * w), argnums=(0, 1, 2))(q, k, v)

    ref_out = dot_product_attention(q, k, v, mask, prefix)
    out = fused_attention(q, k, v, mask, prefix, implementation="xla")
    assert out.shape == ref_out.shape == (B, T, H, DV)
    assert rel(out, ref_out) < 1e-5
    (_, grads), (_, ref_grads) = (run(lambda *a: fused_attention(*a, mask, prefix, implementation="xla")),
                                  run(lambda *a: dot_product_attention(*a, mask, prefix)))
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 1e-5


def test_config_refuses_unknown_backend():
    with pytest.raises(ConfigError, match="attention_backend"):
        hymba_tiny(attention_backend="flash")


def test_decode_kernel_matches_reference(slots=48, groups=5):
    """The decode step's Pallas kernel (interpret mode) over a cache of 48 slots (3 blocks of 16; 5 query
    heads per KV head, padded to 16 rows) plus the position's own key, against the XLA reference, fp32. The
    mask hides random slots (empty and out-of-window ones), rows differ, and row 1 sees none of the cache
    (only its own key)."""
    from hymba_jax.model.attention import decode_attention
    heads = KVH * groups
    ks = jax.random.split(jax.random.key(slots), 6)
    q = jax.random.normal(ks[0], (B, 1, heads, 16))
    k = jax.random.normal(ks[1], (B, 1, KVH, 16))
    v = jax.random.normal(ks[2], (B, 1, KVH, 32))
    # The engine's view of buffers stored (B, KV, slots, d).
    prefix = KV(jnp.swapaxes(jax.random.normal(ks[3], (B, KVH, slots, 16)), 1, 2),
                jnp.swapaxes(jax.random.normal(ks[4], (B, KVH, slots, 32)), 1, 2))
    visible = jax.random.bernoulli(ks[5], 0.5, (B, 1, slots)).at[1].set(False)
    mask = jnp.concatenate([visible, jnp.ones((B, 1, 1), bool)], axis=-1)
    got = decode_attention(q, k, v, mask, prefix, interpret=True)
    want = dot_product_attention(q, k, v, mask, prefix)
    assert got.shape == want.shape == (B, 1, heads, 32)
    assert rel(got, want) < 1e-5
    assert rel(got[1], v[1].repeat(groups, axis=1)) < 1e-6     # only its own value
