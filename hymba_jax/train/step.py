"""The training and evaluation steps: weighted next-token cross-entropy, z-loss, gradient accumulation.

Batches hold already-shifted `targets` and per-token `weights` (0 on padding), so the loss of a batch
is sum(w * CE) / sum(w) over all its tokens, whatever the number of documents per row.

Gradient accumulation is a `lax.scan` over microbatches inside the one jitted step (not
optax.MultiSteps): each optimizer step consumes one full batch and counts as one step everywhere (logs,
schedule, checkpoints, data state); every microbatch's gradient is already divided by the whole batch's
token weight, so the summed gradient equals the full-batch gradient exactly (only summation order
differs); and the scan keeps one microbatch of activations live with no extra accumulator in the
optimizer state.

Non-finite steps are skipped on device: when the loss or the gradient norm is NaN or inf, the new
parameters and optimizer state are the old ones, bit for bit (the optimizer's own step count, and so
its learning-rate position, does not advance either), and the `skipped` metric is 1. The step counter
still advances: it counts the batches consumed, so a checkpoint's data position stays its step. The
loop stops the run after `max_consecutive_skips` of them in a row (train/loop.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hymba_jax import compilation_cache
from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import HymbaForCausalLM
from hymba_jax.parallel import DEFAULT_AXIS_RULES, AxisRules, sharding_context
from hymba_jax.train.state import TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "weights")


def loss_sums(model: HymbaForCausalLM, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(sum of w * CE, sum of w * logsumexp^2) over the batch's tokens, fp32 scalars."""
    logits = model.apply({"params": params}, batch["inputs"], segment_ids=batch["segment_ids"])
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"].astype(jnp.float32)
    return jnp.sum((log_z - target_logit) * w), jnp.sum(jnp.square(log_z) * w)


def make_train_step(model_config: HymbaConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, grad_accum_steps: int, z_loss: float, mesh: Mesh, state_shardings: TrainState,
                    batch_sharding: NamedSharding, rules: AxisRules = DEFAULT_AXIS_RULES
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The jitted step (state, batch) -> (new state, metrics); the input state is donated.

    batch: (B, L) arrays sharded by `batch_sharding`, B a multiple of grad_accum_steps. Metrics (fp32
    scalars): loss (weighted mean CE), z_loss (mean logsumexp^2), grad_norm (before clipping), lr (of this
    step), tokens (sum of weights), skipped (1 when the loss or gradient norm was not finite and the
    update was not applied, else 0).
    """
    model = HymbaForCausalLM(model_config)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, *batch_sharding.spec))

    def step(state: TrainState, batch: Batch):
        total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

        def micro_loss(params, micro):
            ce, zz = loss_sums(model, params, micro)
            return (ce + z_loss * zz) / total_weight, (ce, zz)

        grad_fn = jax.grad(micro_loss, has_aux=True)
        # Row r of microbatch i is row r * A + i: each device keeps its own rows in every microbatch.
        rows = batch["inputs"].shape[0] // grad_accum_steps
        micro = {k: jnp.swapaxes(batch[k].reshape((rows, grad_accum_steps) + batch[k].shape[1:]), 0, 1)
                 for k in BATCH_KEYS}
        micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

        def accumulate(carry, mb):
            grads, ce, zz = carry
            g, (ce_i, zz_i) = grad_fn(state.params, mb)
            return (jax.tree.map(jnp.add, grads, g), ce + ce_i, zz + zz_i), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, ce, zz), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = ce / total_weight, optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "z_loss": zz / total_weight, "grad_norm": grad_norm,
                   "lr": jnp.asarray(schedule(state.step), jnp.float32), "tokens": total_weight,
                   "skipped": 1.0 - finite.astype(jnp.float32)}
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(sharding_context(mesh, rules)(step),
                   in_shardings=(state_shardings, {k: batch_sharding for k in BATCH_KEYS}),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model_config: HymbaConfig, *, mesh: Mesh, param_shardings,
                   batch_sharding: NamedSharding, rules: AxisRules = DEFAULT_AXIS_RULES
                   ) -> Callable[[object, Batch], tuple[jax.Array, jax.Array]]:
    """The jitted (params, batch) -> (sum of w * CE, sum of w): summed over batches on the host in float64,
    the mean is the token-weighted validation loss, independent of how the split is batched."""
    model = HymbaForCausalLM(model_config)

    def step(params, batch: Batch):
        ce, _ = loss_sums(model, params, batch)
        return ce, jnp.sum(batch["weights"].astype(jnp.float32))

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(sharding_context(mesh, rules)(step),
                   in_shardings=(param_shardings, {k: batch_sharding for k in BATCH_KEYS}),
                   out_shardings=(replicated, replicated))


REMAT_AUTO = ("none", "full")   # remat="auto": the fastest first, then the one that needs least memory


@dataclasses.dataclass(frozen=True)
class StepCache:
    """Where and under what name `compile_fitting` keeps the traced step across runs.

    directory: the compilation cache's directory (the traced programs go to its `traced/`); mesh: the
    step's; name and settings: what the step is and everything besides the model config and the arguments
    that changes it (for the train step: the training config fields `build_train_program` reads)."""

    directory: str
    mesh: Mesh
    name: str
    settings: str


class StepDoesNotFit(RuntimeError):
    """The compiler ran out of device memory for the train step (the message says what to change)."""


def needed_bytes(memory) -> int:
    """Bytes per device a compiled program needs, from its `memory_analysis()`: arguments + outputs not
    aliased to (donated) arguments + temporaries + generated code."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)


def compile_fitting(make_step: Callable[[HymbaConfig], Any], model_config: HymbaConfig, args: tuple,
                    memory_limit: Optional[int], cache: Optional[StepCache] = None
                    ) -> tuple[Any, HymbaConfig, list[str]]:
    """Lower and compile `make_step(config)` for `args`: (compiled, the config it was built with, notes).

    With `remat="auto"` the step is built without rematerialisation (the fastest: on one H200 the 1.5B at
    8 x 2048 runs 22.0k tokens/s with 91.2 GiB; full remat, measured with cuDNN attention, 17.4k with 51.2 GiB) and rebuilt with full
    remat when it needs more than `memory_limit` bytes per device (or the compiler runs out of device
    memory, as XLA:TPU does at compile time). Any other remat value is compiled as it is. The notes say
    what was tried and how long each took. Raises StepDoesNotFit when the compiler runs out of device
    memory for the last choice.

    cache: keep the traced step across runs (`compilation_cache.lower_cached`), keyed by the config of each
    choice and `cache.settings`; None traces every time.
    """
    choices = REMAT_AUTO if model_config.remat == "auto" else (model_config.remat,)
    notes: list[str] = []
    for i, remat in enumerate(choices):
        config = model_config.replace(remat=remat)
        last = i == len(choices) - 1
        clock = time.perf_counter()
        if cache is None:
            lowered, how = make_step(config).lower(*args), "traced"
        else:
            key = compilation_cache.program_key(cache.name, args, cache.mesh, config, cache.settings)
            lowered, how = compilation_cache.lower_cached(make_step(config), args, mesh=cache.mesh, key=key,
                                                          directory=cache.directory)
        traced_s = time.perf_counter() - clock
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            if last:
                raise StepDoesNotFit(
                    f"the train step with remat {remat} does not fit in device memory "
                    f"({str(e).split(':', 1)[-1].strip()[:300]}); try model.remat=full (or dots), a smaller "
                    "batch_size, more grad_accum_steps or more devices") from None
            notes.append(f"remat {remat} does not fit in device memory: trying {choices[i + 1]}")
            continue
        memory = compiled.memory_analysis()
        need = None if memory is None else needed_bytes(memory)
        timing = (f"{how} in {traced_s:.1f} s, compiled in {time.perf_counter() - clock - traced_s:.1f} s"
                  + ("" if need is None else f", needs {need / 2**30:.1f} GiB per device"))
        if not last and need is not None and memory_limit and need > memory_limit:
            notes.append(f"remat {remat}: {timing}, more than the {memory_limit / 2**30:.1f} GiB available: "
                         f"trying {choices[i + 1]}")
            continue
        notes.append(f"train step (remat {remat}) {timing}")
        return compiled, config, notes
    raise AssertionError("unreachable: the last choice returns or raises")
