"""Rotary position embedding (rotate-half form), with the released model's static NTK base."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inv_freq(head_dim: int, base: float) -> jax.Array:
    """(head_dim // 2,) fp32 inverse frequencies."""
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotate x (B, L, heads, head_dim) by positions (B, L) (or (L,)).

    Angles are computed in fp32 and cos/sin cast to x's dtype, as the released model does.
    """
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, base)   # (B, L, hd/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]                  # (B, L, 1, hd)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
