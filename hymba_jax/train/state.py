"""The train state and its creation directly in its sharded layout.

The state holds the parameters in the training layout (`hymba_jax.model.lm.stack_layers`: every layer's
parameters stacked on a leading layer axis), so the scanned layer stack reads them as they are and the
optimizer updates a few dozen arrays rather than one per parameter of every layer. Shardings come from the
model's logical axis names: `boxed_param_shapes(..., stacked=True)` (the model's init, abstract) gives
boxed (nn.Partitioned) shapes, `nn.get_partition_spec` + `nn.logical_to_mesh_sharding` turn them into
NamedShardings (the layer axis is never sharded), and the optimizer state mirrors the parameters'
shardings through `optax.tree_map_params`. `init_params(..., shardings=)` and `jax.jit(...,
out_shardings=...)` then create every array on its devices: no device ever holds the whole model unless
the mesh says so.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import init_params, is_stacked, param_shapes, param_shardings, stack_layers
from hymba_jax.parallel import AxisRules, check_divisible


@flax.struct.dataclass
class TrainState:
    """step: () int32, optimizer steps taken; params: fp32 master weights in the training layout
    (`stack_layers`); opt_state: optax state."""

    step: jax.Array
    params: Any
    opt_state: Any


def state_shardings(model_config: HymbaConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: AxisRules) -> TrainState:
    """NamedShardings of the whole TrainState: optimizer moments follow their parameters."""
    params = param_shardings(model_config, mesh, rules, stacked=True)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = param_shapes(model_config, stacked=True)
    check_divisible(abstract_params, params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt)


def create_train_state(model_config: HymbaConfig, tx: optax.GradientTransformation, shardings: TrainState,
                       rng: jax.Array, params: Optional[Any] = None) -> TrainState:
    """A new state on `shardings` (`state_shardings`). Random init from `rng`, or from `params` in either
    layout (e.g. a Hugging Face checkpoint's, per layer), which are placed on their shardings (stacked
    there) before the optimizer state is built next to them."""
    def from_params(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

    if params is None:       # made on their shardings; handed over to the state
        params = init_params(model_config, rng, shardings=shardings.params, stacked=True)
        return jax.jit(from_params, out_shardings=shardings, donate_argnums=0)(params)
    if not is_stacked(params):
        params = jax.jit(lambda p: stack_layers(p, model_config), out_shardings=shardings.params)(params)
    params = jax.device_put(params, shardings.params)
    return jax.jit(from_params, out_shardings=shardings)(params)
