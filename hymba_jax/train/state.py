"""The train state and its creation directly in its sharded layout.

Shardings come from the model's logical axis names: `boxed_param_shapes` (the model's init, abstract) gives
boxed (nn.Partitioned) shapes, `nn.get_partition_spec` + `nn.logical_to_mesh_sharding` turn them into
NamedShardings, and the optimizer state mirrors the parameters' shardings through
`optax.tree_map_params`. `init_params(..., shardings=)` and `jax.jit(..., out_shardings=...)` then create
every array on its devices: no device ever holds the whole model unless the mesh says so.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import init_params, param_shapes, param_shardings
from hymba_jax.parallel import AxisRules, check_divisible


@flax.struct.dataclass
class TrainState:
    """step: () int32, optimizer steps taken; params: fp32 master weights; opt_state: optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


def state_shardings(model_config: HymbaConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: AxisRules) -> TrainState:
    """NamedShardings of the whole TrainState: optimizer moments follow their parameters."""
    params = param_shardings(model_config, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = param_shapes(model_config)
    check_divisible(abstract_params, params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt)


def create_train_state(model_config: HymbaConfig, tx: optax.GradientTransformation, shardings: TrainState,
                       rng: jax.Array, params: Optional[Any] = None) -> TrainState:
    """A new state on `shardings` (`state_shardings`). Random init from `rng`, or from `params` (e.g. a
    Hugging Face checkpoint), which are placed on their shardings before the optimizer state is built next
    to them."""
    def from_params(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    if params is None:       # made on their shardings, layer by layer; handed over to the state
        params = init_params(model_config, rng, shardings=shardings.params)
        return jax.jit(from_params, out_shardings=shardings, donate_argnums=0)(params)
    params = jax.device_put(params, shardings.params)
    return jax.jit(from_params, out_shardings=shardings)(params)
