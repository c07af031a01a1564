"""RMSNorm, as the released model computes it: statistics in fp32, cast back, then scaled."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from hymba_jax.model.params import accum_dtype, logical_param


class RMSNorm(nn.Module):
    """`w * (x32 * rsqrt(mean(x32^2) + eps)).astype(x.dtype)` over the last axis.

    `axis_name` is the logical axis of the normalised dimension (for sharding).
    """

    eps: float = 1e-6
    axis_name: str = "embed"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,),
                              self.param_dtype)
        x32 = x.astype(accum_dtype(x.dtype))
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return scale.astype(x.dtype) * normed
