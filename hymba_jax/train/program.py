"""The train program: everything train.py's step is assembled from, built in one place.

    program = build_train_program(config, model_config, mesh)
    state = program.init_state(jax.random.key(config.seed))          # or restore onto program.state_shardings
    compiled, used_config, notes = program.compile(model_config, (state, batch), memory_limit)
    state, metrics = compiled(state, batch)

The training loop (train/loop.py), the ahead-of-time check (hymba_jax/aot.py), the scaling benchmark
and the sharding tests all build their step here, so what they compile, time and check is exactly the
step train.py runs: the optimizer and schedule of the config, the state's and the batch's shardings from
the logical-axis rules, gradient accumulation, z-loss and the donated state.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import param_shapes
from hymba_jax.parallel import AxisRules, batch_sharding
from hymba_jax.train.optimizer import make_optimizer, make_schedule
from hymba_jax.train.state import TrainState, create_train_state, state_shardings
from hymba_jax.train.step import (BATCH_KEYS, Batch, StepCache, compile_fitting, make_eval_step,
                                  make_train_step)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The pieces of one training setup on one mesh (nothing allocated on devices).

    model_config: the model as configured (checkpoints record it; "auto" kernels may still be unresolved).
    state_shardings: NamedShardings of the whole TrainState (optimizer moments follow their parameters).
    batch_sharding: the sharding of every (batch, length) array of a batch (rows over the 'batch' rule's axes).
    optimizer_settings: config.optimizer and config.num_steps, what `tx` and `schedule` were made from, as
    canonical JSON: the traced step's cache key reads them (it cannot read functions); replacing tx or
    schedule means replacing this too.
    """

    model_config: HymbaConfig
    mesh: Mesh
    rules: AxisRules
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    batch_sharding: NamedSharding
    grad_accum_steps: int
    z_loss: float
    optimizer_settings: str

    def train_step(self, model_config: Optional[HymbaConfig] = None
                   ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
        """The jitted (state, batch) -> (new state, metrics) with the state donated (train/step.py).

        model_config: build it with these kernels / remat instead (default: `self.model_config`); the
        parameter layout must be the same, since the shardings are this program's.
        """
        return make_train_step(model_config or self.model_config, self.tx, self.schedule,
                               grad_accum_steps=self.grad_accum_steps, z_loss=self.z_loss, mesh=self.mesh,
                               state_shardings=self.state_shardings, batch_sharding=self.batch_sharding,
                               rules=self.rules)

    def eval_step(self, model_config: Optional[HymbaConfig] = None
                  ) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
        """The jitted (params, batch) -> (sum of w * CE, sum of w) on the state's parameter shardings."""
        return make_eval_step(model_config or self.model_config, mesh=self.mesh,
                              param_shardings=self.state_shardings.params, batch_sharding=self.batch_sharding,
                              rules=self.rules)

    def compile(self, model_config: HymbaConfig, args: tuple, memory_limit: Optional[int],
                cache_dir: Optional[str] = None) -> tuple[Any, HymbaConfig, list[str]]:
        """`compile_fitting` of the train step for `args` ((state, batch), arrays or abstract): (compiled,
        the config it was built with, notes). remat="auto" falls back to full remat when the step needs
        more than `memory_limit` bytes per device. cache_dir: the compilation cache's directory in use
        (`compilation_cache.enable`); the traced step is kept beside it, so a warm start skips tracing.
        None: traced every time."""
        cache = None if cache_dir is None else StepCache(cache_dir, self.mesh, "train_step",
                                                         self.compile_settings())
        return compile_fitting(self.train_step, model_config, args, memory_limit, cache)

    def compile_settings(self) -> str:
        """What builds the train step besides the model config and the arguments: the traced step's cache
        key (`compile`)."""
        return repr((self.optimizer_settings, self.grad_accum_steps, self.z_loss, self.rules))

    def abstract_state(self) -> TrainState:
        """The TrainState as ShapeDtypeStructs carrying their shardings: for AOT lowering, and the shapes a
        checkpoint restore is checked against. Nothing is allocated or traced beyond the model's init."""
        params = param_shapes(self.model_config, stacked=True)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                           opt_state=jax.eval_shape(self.tx.init, params))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state,
                            self.state_shardings)

    def abstract_batch(self, batch_size: int, seq_len: int) -> Batch:
        """A global batch of (batch_size, seq_len) ShapeDtypeStructs: int32 ids, float32 weights."""
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32 if k == "weights" else jnp.int32,
                                        sharding=self.batch_sharding) for k in BATCH_KEYS}

    def init_state(self, rng: jax.Array, params: Optional[Any] = None) -> TrainState:
        """A new state on its shardings: random parameters from `rng`, or `params` (e.g. a Hugging Face
        checkpoint's) placed on their shardings, with a fresh optimizer state beside them."""
        return create_train_state(self.model_config, self.tx, self.state_shardings, rng, params)


def build_train_program(config: ml_collections.ConfigDict, model_config: HymbaConfig, mesh: Mesh
                        ) -> TrainProgram:
    """The program of a training config (configs/*.py) for `model_config` on `mesh`.

    Reads config.optimizer and config.num_steps (optimizer and schedule), config.axis_rules,
    config.grad_accum_steps and config.z_loss.
    """
    rules = config.axis_rules
    tx = make_optimizer(config)
    optimizer_settings = json.dumps({"optimizer": config.optimizer.to_dict(), "num_steps": config.num_steps},
                                    sort_keys=True)
    return TrainProgram(model_config=model_config, mesh=mesh, rules=rules, tx=tx, schedule=make_schedule(config),
                        state_shardings=state_shardings(model_config, tx, mesh, rules),
                        batch_sharding=batch_sharding(mesh, rules), grad_accum_steps=config.grad_accum_steps,
                        z_loss=config.z_loss, optimizer_settings=optimizer_settings)
