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

import jax
import jax.numpy as jnp


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
