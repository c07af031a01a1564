"""Small helpers shared by the model modules: dtypes and logically-partitioned parameters."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
from flax.errors import ScopeParamShapeError
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def accum_dtype(dtype) -> jnp.dtype:
    """The dtype of statistics and accumulations: fp32, or fp64 when computing in fp64 (for checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def logical_param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                  axes: Sequence[str | None], dtype: str) -> jax.Array:
    """A parameter carrying logical axis names (mapped to mesh axes by the sharding rules).

    Outside init the stored value is returned after checking its shape against `shape`. Flax's own check
    traces the initializer abstractly for every parameter at every call (about 430 traces in a 1.5B train
    step, seconds of start-up); the shape is known here, so comparing it is the same check.
    """
    shape = tuple(shape)
    if not module.is_initializing() and module.has_variable("params", name):
        value = nn.meta.unbox(module.get_variable("params", name))
        if value.shape != shape:
            raise ScopeParamShapeError(name, module.scope.path_text, value.shape, shape)
        return value
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, jnp.dtype(dtype))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Shard an activation by logical axis names (a no-op outside `parallel.sharding_context`).

    A batch of one (the meta tokens' pass, shared by every row) is left unconstrained: it cannot be split
    over the data-parallel devices, and XLA is free to follow the weights instead. Under FSDP it does: it
    keeps the weights sharded along `embed` and sums the meta tokens' partial projections (all-reduces of
    M x features), which moves far fewer bytes than gathering every weight a second time for M tokens.
    """
    if x.shape[0] == 1:
        return x
    return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
    """`x @ kernel` over the last axis of x, kernel of shape (in, *features) with logical axes.

    The kernel is cast to the input's dtype (fp32 master weights, bf16 compute).
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]          # logical names of (in, *features)
    param_dtype: str = "float32"
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = logical_param(self, "kernel", nn.initializers.normal(self.init_std),
                               (x.shape[-1], *self.features), self.axes, self.param_dtype)
        return jnp.tensordot(x, kernel.astype(x.dtype), axes=((x.ndim - 1,), (0,)))
