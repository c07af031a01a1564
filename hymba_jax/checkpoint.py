"""Checkpoints of a training workdir with Orbax, and loading a trained workdir's parameters.

Layout: `<workdir>/checkpoints/<step>/` holds the Orbax items
    params      fp32 master weights (sharded arrays, OCDBT), in the training layout (`stack_layers`: the
                layers' parameters stacked; checkpoints written per layer, before that layout, restore too)
    opt_state   optimizer state (its moments in the layout of params)
    data        the Grain iterator position of every host (process_<i>-of-<n>.json)
    config      the training config (JSON)
    model       the HymbaConfig fields (JSON), so a workdir can be loaded without the config files
    integrity   a checksum of every array of params and opt_state (JSON), computed on device at save.
Saves are asynchronous (the device->host copy happens before `save` returns; files are written in a
background thread) and keep the last `keep` steps. Orbax commits a step atomically, so an interrupted
save never shows up as a step.

What the checkpoints promise (docs/training.md, "Faults"):
* A state holding NaN or inf is never saved (`save` raises CheckpointError and writes nothing), so the
  rotation that keeps the last `keep` steps only ever deletes older good steps for a newer good one.
* A failed write (disk full, permissions) raises CheckpointError with the cause in one line, at the
  next `check`, `save` or `wait`; Orbax only rotates after a step is committed, so earlier steps stay.
* At restore every array is checked against its checksum (and for NaN/inf). A step that fails (a
  damaged, truncated or missing file, a checksum mismatch) is reported in one warning line naming the
  step and the item's directory, and the previous step is tried. Once an earlier step restores, the
  damaged newer ones are renamed `<step>.corrupt-<n>` (so training can write that step again).
* When the workdir has checkpoints but none restores, or the checkpoint's parameter shapes differ from
  the config's model, nothing is renamed and CheckpointError says why and what to do.

Other programs load a trained model with

    model_config, params = restore_params(workdir)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import is_stacked, param_shapes, param_shardings, stack_layers, unstack_layers
from hymba_jax.parallel import DEFAULT_AXIS_RULES, AxisRules, make_mesh

if TYPE_CHECKING:   # reading parameters (eval, generation, export) needs neither the optimizer nor the data
    from hymba_jax.train.state import TrainState   # pipeline: the training side's imports stay in its methods

CHECKPOINT_DIR = "checkpoints"
ARRAY_ITEMS = ("params", "opt_state")
INTEGRITY_ITEM = "integrity"
START_OVER = ("use a new --workdir, or run train.py with --start_over to move the checkpoints and logs "
              "aside and start from step 0")


class CheckpointError(RuntimeError):
    """Checkpoints that cannot be written, or a workdir whose checkpoints cannot be used: the run stops
    rather than lose, replace or silently ignore them (the message names the step, file and remedy)."""


class CheckpointRestoreWarning(UserWarning):
    """A checkpoint step could not be restored and an earlier one is used instead."""


def _abstract(shardings: Any, shapes: Any) -> Any:
    return jax.tree.map(lambda sh, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shardings, shapes)


def _parameter_trees(tree: Any, fn) -> Any:
    """`tree` with fn applied to every parameter tree in it (the params item, or an optimizer state's
    moments): the dicts in either layout, stacked or per layer."""
    is_params = lambda x: isinstance(x, dict) and (is_stacked(x) or "layers_0" in x)
    return jax.tree.map(lambda x: fn(x) if is_params(x) else x, tree, is_leaf=is_params)


def _one_layer(target: jax.ShapeDtypeStruct, _: int) -> jax.ShapeDtypeStruct:
    """One layer's restore target from a stacked parameter's (the layer axis is never sharded)."""
    sharding = NamedSharding(target.sharding.mesh, PartitionSpec(*target.sharding.spec[1:]))
    return jax.ShapeDtypeStruct(target.shape[1:], target.dtype, sharding=sharding)


def _stacked_sharding(shardings: list[NamedSharding]) -> NamedSharding:
    return NamedSharding(shardings[0].mesh, PartitionSpec(None, *shardings[0].spec))


def model_config_from_dict(fields: dict) -> HymbaConfig:
    """HymbaConfig from its JSON dict (lists back to the tuples the dataclass holds)."""
    fields = dict(fields)
    fields["global_layers"] = tuple(fields["global_layers"])
    fields["kv_reuse_groups"] = tuple(tuple(g) for g in fields["kv_reuse_groups"])
    return HymbaConfig(**fields)


def _array_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(checksum, all finite) of one array: the sum of its elements' bits times (2 * flat index + 1), mod
    2^32. Integer addition is associative, so the sum is the same however the array is sharded and
    reduced; any single changed element changes it (the weights are odd)."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    weights = 2 * jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) + 1
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.sum(bits * weights, dtype=jnp.uint32), finite


@functools.lru_cache(maxsize=None)
def _digest_fn(out_sharding: Optional[NamedSharding]):
    def digests(leaves):
        pairs = [_array_digest(x) for x in leaves]
        return jnp.stack([c for c, _ in pairs]), jnp.stack([f for _, f in pairs])
    return jax.jit(digests, out_shardings=out_sharding)


def digest(tree: Any) -> dict[str, tuple[int, bool]]:
    """{path: (checksum, all finite)} of every array of `tree`, computed on device where the arrays live
    (only the two small results come to the host)."""
    with_paths = jax.tree_util.tree_leaves_with_path(tree)
    if not with_paths:
        return {}
    leaves = [x for _, x in with_paths]
    sharding = getattr(leaves[0], "sharding", None)
    out = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    sums, finite = jax.device_get(_digest_fn(out)(leaves))
    return {jax.tree_util.keystr(p): (int(c), bool(f)) for (p, _), c, f in zip(with_paths, sums, finite)}


def one_line(error: BaseException) -> str:
    """`Type: first line` of the innermost cause of `error`, at most 400 characters: library errors wrap
    the OS or TensorStore error (the one that names the file) several times and run to hundreds of lines."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}"[:400] if text else type(error).__name__


class Checkpointer:
    """Saves and restores TrainState + data iterator + configs under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._writing: Optional[int] = None

    def save(self, state: TrainState, data_iterator, config: ml_collections.ConfigDict,
             model_config: HymbaConfig) -> None:
        """Starts writing `state` as its step (nothing when that step is saved already), with the checksum
        of every array. Raises CheckpointError, writing nothing, when the state holds NaN or inf or an
        earlier write failed."""
        from hymba_jax.data import iterator_save_args

        step = int(jax.device_get(state.step))
        self.wait()   # Orbax would wait for the previous write anyway; its error is that step's, not this one's
        if step in self.manager.all_steps():
            return
        digests = {item: digest(getattr(state, item)) for item in ARRAY_ITEMS}
        bad = [f"{item}{path}" for item in ARRAY_ITEMS for path, (_, finite) in digests[item].items()
               if not finite]
        if bad:
            raise CheckpointError(
                f"step {step}: not saving a checkpoint, {bad[0]} holds NaN or inf ({len(bad)} arrays in all); "
                f"the checkpoints {self.manager.all_steps()} in {self.directory} are kept")
        integrity = {item: {path: checksum for path, (checksum, _) in digests[item].items()}
                     for item in ARRAY_ITEMS}
        try:
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                data=iterator_save_args(data_iterator),
                config=ocp.args.JsonSave(config.to_dict()),
                model=ocp.args.JsonSave(dataclasses.asdict(model_config)),
                **{INTEGRITY_ITEM: ocp.args.JsonSave(integrity)},
            ), force=True)
        except Exception as e:  # the synchronous part: directories, the device->host copy
            raise CheckpointError(self._write_failed(step, e)) from None
        self._writing = step

    def check(self) -> None:
        """Raises CheckpointError when a background write has failed (host only, never blocks on a write
        in progress: the loop calls it after every step, so a full disk stops the run at once rather
        than at the next save). Orbax keeps a failed write's error in its finalize thread, which only
        `wait_until_finished` raises; with no write in progress that returns at once."""
        try:
            self.manager.check_for_errors()
            if not self.manager.is_saving_in_progress():
                self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(self._write_failed(self._writing, e)) from None

    def wait(self) -> None:
        """Blocks until the write in flight is committed; CheckpointError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(self._write_failed(self._writing, e)) from None

    def close(self) -> None:
        """Waits for the write in flight and releases Orbax's threads; CheckpointError if the write failed."""
        try:
            self.manager.close()
        except Exception as e:
            raise CheckpointError(self._write_failed(self._writing, e)) from None

    def _write_failed(self, step: Optional[int], error: Exception) -> str:
        self.manager.reload()
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        return (f"writing {what} to {self.directory} failed: {one_line(error)}; "
                f"the earlier checkpoints {self.manager.all_steps()} are intact")

    def restore_latest(self, shardings: TrainState, shapes: TrainState, data_iterator,
                       model_config: Optional[HymbaConfig] = None) -> Optional[TrainState]:
        """The latest restorable state (placed on `shardings`), with `data_iterator` moved to its position;
        None when there is no checkpoint. Raises CheckpointError when there are checkpoints but none
        restores, or when their parameter shapes differ from `shapes` (naming the `model_config` fields
        that differ from the checkpoint's)."""
        from hymba_jax.data import iterator_restore_args

        def restore(step):
            self._check_shapes(step, shapes.params, model_config)
            saved = model_config_from_dict(self._read_json(step, "model"))
            targets = {"params": _abstract(shardings.params, shapes.params),
                       "opt_state": _abstract(shardings.opt_state, shapes.opt_state)}
            per_layer = not self._stacked_on_disk(step)     # written before the training layout
            if per_layer:
                targets = _parameter_trees(targets, lambda t: unstack_layers(t, saved, take=_one_layer))
            r = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(targets["params"]),
                opt_state=ocp.args.StandardRestore(targets["opt_state"]),
                data=iterator_restore_args(data_iterator)))
            self._verify(step, {"params": r.params, "opt_state": r.opt_state})
            params, opt_state = r.params, r.opt_state
            if per_layer:
                params, opt_state = jax.jit(lambda t: _parameter_trees(t, lambda p: stack_layers(p, saved)),
                                            out_shardings=(shardings.params, shardings.opt_state))((params, opt_state))
            return shapes.replace(step=jax.device_put(jax.numpy.asarray(step, "int32"), shardings.step),
                                  params=params, opt_state=opt_state)
        return self._latest(restore)

    def restore_params(self, model_config: HymbaConfig, shardings: Any) -> tuple[int, Any]:
        """(step, params) of the latest restorable step, per layer (the model's layout) on `shardings`."""
        shapes = param_shapes(model_config)

        def restore(step):
            self._check_shapes(step, shapes, model_config)
            stacked = self._stacked_on_disk(step)
            target = _abstract(shardings, shapes)
            if stacked:
                target = _abstract(stack_layers(shardings, model_config, _stacked_sharding),
                                   param_shapes(model_config, stacked=True))
            params = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target))).params
            self._verify(step, {"params": params})
            if stacked:
                params = jax.jit(lambda p: unstack_layers(p, model_config), out_shardings=shardings)(params)
            return step, params

        result = self._latest(restore)
        if result is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to load")
        return result

    def _stacked_on_disk(self, step: int) -> bool:
        """Whether a step's params item is in the training layout (else per layer, written before it)."""
        return is_stacked(ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "params").tree)

    def read_json(self, item: str) -> dict:
        """The `config` or `model` item of the latest step (plain JSON, no arrays)."""
        step = self.manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint; train first (train.py --workdir ...)")
        try:
            return self._read_json(step, item)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{e}; {START_OVER}" if not self.read_only else str(e)) from None

    def _read_json(self, step: int, item: str) -> dict:
        """A JSON item of a step, read directly (Orbax's JsonSave writes `<step>/<item>/metadata`); an
        unreadable or malformed file raises ValueError naming it."""
        path = self.directory / str(step) / item / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot be read as JSON ({one_line(e)})") from None

    def _check_shapes(self, step: int, shapes: Any, model_config: Optional[HymbaConfig]) -> None:
        """Raises CheckpointError when step's model has other parameter shapes than `shapes` (compared in
        the layout of `shapes`, whichever layout the step was written in)."""
        saved = model_config_from_dict(self._read_json(step, "model"))
        saved_shapes = {jax.tree_util.keystr(p): tuple(s.shape) for p, s in
                        jax.tree_util.tree_leaves_with_path(param_shapes(saved, stacked=is_stacked(shapes)))}
        wanted = {jax.tree_util.keystr(p): tuple(s.shape) for p, s in jax.tree_util.tree_leaves_with_path(shapes)}
        if saved_shapes == wanted:
            return
        if model_config is not None:
            fields = [f"model.{f.name}={getattr(model_config, f.name)!r} (the checkpoint has "
                      f"{getattr(saved, f.name)!r})" for f in dataclasses.fields(HymbaConfig)
                      if getattr(saved, f.name) != getattr(model_config, f.name)]
            difference = ", ".join(fields)
        else:
            path = next(p for p in sorted(set(saved_shapes) | set(wanted)) if saved_shapes.get(p) != wanted.get(p))
            difference = f"params{path} is {wanted.get(path)}, the checkpoint's {saved_shapes.get(path)}"
        raise CheckpointError(
            f"the config's model does not fit checkpoint step {step} in {self.directory}: {difference}. "
            f"Set the model back to the checkpoint's, or {START_OVER}; nothing was changed")

    def _verify(self, step: int, trees: dict[str, Any]) -> None:
        """Raises ValueError when a restored array differs from the checksum written at save or holds NaN
        or inf (steps saved before checksums existed get the second check only)."""
        expected = (self._read_json(step, INTEGRITY_ITEM) if (self.directory / str(step) / INTEGRITY_ITEM).exists()
                    else None)
        for item, tree in trees.items():
            for path, (checksum, finite) in digest(tree).items():
                if expected is not None and expected[item].get(path) != checksum:
                    raise ValueError(f"{item}{path} does not match the checksum written at save (its data is in "
                                     f"{self.directory / str(step) / item})")
                if not finite:
                    raise ValueError(f"{item}{path} holds NaN or inf")

    def _latest(self, restore):
        """restore(step) of the latest step that restores; the damaged newer ones are moved aside only
        then, so a workdir where nothing restores is left exactly as it was."""
        failed: dict[int, str] = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                result = restore(step)
            except CheckpointError:
                raise
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
                failed[step] = one_line(e)
                warnings.warn(f"checkpoint step {step} in {self.directory} cannot be restored ({failed[step]}); "
                              "trying the previous step", CheckpointRestoreWarning, stacklevel=3)
                continue
            for damaged in failed:
                self._quarantine(damaged)
            return result
        if failed:
            remedy = "" if self.read_only else f"; nothing was renamed or deleted: {START_OVER}"
            reasons = "; ".join(f"step {step}: {reason}" for step, reason in failed.items())
            raise CheckpointError(f"none of the checkpoints in {self.directory} can be restored ({reasons}){remedy}")
        return None

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step aside (once an earlier step has restored), so training can save it again."""
        if self.read_only:
            return
        path = self.directory / str(step)
        n = 0
        while path.with_name(f"{step}.corrupt-{n}").exists():
            n += 1
        target = path.with_name(f"{step}.corrupt-{n}")
        if jax.process_index() == 0 and path.exists():
            path.rename(target)
        self.manager.reload()
        logging.warning("moved the damaged checkpoint step %d to %s", step, target)


def restore_params(workdir: str | Path, *, mesh: Optional[jax.sharding.Mesh] = None,
                   rules: AxisRules = DEFAULT_AXIS_RULES) -> tuple[HymbaConfig, Any]:
    """Load the parameters of a training workdir's latest (restorable) checkpoint.

    Returns the model's HymbaConfig (as trained: its compute dtype, remat and scan backend; change them
    with `.replace`) and the fp32 parameter tree, sharded over `mesh` by the logical axis `rules`
    (default: all devices, data-parallel, i.e. replicated). Only the `params` item is read.
    """
    _, model_config, params = restore_checkpoint_params(workdir, mesh=mesh, rules=rules)
    return model_config, params


def restore_checkpoint_params(workdir: str | Path, *, mesh: Optional[jax.sharding.Mesh] = None,
                              rules: AxisRules = DEFAULT_AXIS_RULES) -> tuple[int, HymbaConfig, Any]:
    """`restore_params` with the step it restored first: an earlier one when the latest is damaged, which
    a program reporting results must say (eval.py does)."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        model_config = model_config_from_dict(checkpointer.read_json("model"))
        mesh = mesh or make_mesh({"data": -1})
        step, params = checkpointer.restore_params(model_config, param_shardings(model_config, mesh, rules))
    finally:
        checkpointer.close()
    return step, model_config, params


def read_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The training config saved with a workdir's latest checkpoint."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return ml_collections.ConfigDict(checkpointer.read_json("config"))
    finally:
        checkpointer.close()
