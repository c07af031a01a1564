"""Checkpoints of a training workdir with Orbax, and loading a trained workdir's parameters.

Layout: `<workdir>/checkpoints/<step>/` holds the Orbax items
    params      fp32 master weights (sharded arrays, OCDBT)
    opt_state   optimizer state
    data        the Grain iterator position of every host (process_<i>-of-<n>.json)
    config      the training config (JSON)
    model       the HymbaConfig fields (JSON), so a workdir can be loaded without the config files.
Saves are asynchronous (the device->host copy happens before `save` returns; files are written in a
background thread) and keep the last `keep` steps. Orbax commits a step atomically, so an interrupted
save never shows up as a step. A step that is later damaged (a truncated or missing file) fails to
restore: it is renamed to `<step>.corrupt-<n>` with a warning and the previous step is used.

Other programs load a trained model with

    model_config, params = restore_params(workdir)
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from hymba_jax.config import HymbaConfig
from hymba_jax.data import iterator_restore_args, iterator_save_args
from hymba_jax.model.lm import param_shapes
from hymba_jax.parallel import DEFAULT_AXIS_RULES, AxisRules, make_mesh
from hymba_jax.train.state import TrainState, param_shardings

CHECKPOINT_DIR = "checkpoints"


class CheckpointRestoreWarning(UserWarning):
    """A checkpoint step could not be restored and an earlier one is used instead."""


def _abstract(shardings: Any, shapes: Any) -> Any:
    return jax.tree.map(lambda sh, s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shardings, shapes)


def model_config_from_dict(fields: dict) -> HymbaConfig:
    """HymbaConfig from its JSON dict (lists back to the tuples the dataclass holds)."""
    fields = dict(fields)
    fields["global_layers"] = tuple(fields["global_layers"])
    fields["kv_reuse_groups"] = tuple(tuple(g) for g in fields["kv_reuse_groups"])
    return HymbaConfig(**fields)


class Checkpointer:
    """Saves and restores TrainState + data iterator + configs under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: TrainState, data_iterator, config: ml_collections.ConfigDict,
             model_config: HymbaConfig) -> None:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            data=iterator_save_args(data_iterator),
            config=ocp.args.JsonSave(config.to_dict()),
            model=ocp.args.JsonSave(dataclasses.asdict(model_config)),
        ), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore_latest(self, shardings: TrainState, shapes: TrainState, data_iterator) -> Optional[TrainState]:
        """The latest restorable state (placed on `shardings`), with `data_iterator` moved to its position;
        None when there is no checkpoint."""
        def restore(step):
            r = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(shardings.params, shapes.params)),
                opt_state=ocp.args.StandardRestore(_abstract(shardings.opt_state, shapes.opt_state)),
                data=iterator_restore_args(data_iterator)))
            return TrainState(step=jax.device_put(jax.numpy.asarray(step, "int32"), shardings.step),
                              params=r.params, opt_state=r.opt_state)
        return self._latest(restore)

    def restore_params(self, model_config: HymbaConfig, shardings: Any) -> tuple[int, Any]:
        """(step, params) of the latest restorable step."""
        shapes = param_shapes(model_config)
        result = self._latest(lambda step: (step, self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(shardings, shapes)))).params))
        if result is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to load")
        return result

    def read_json(self, item: str) -> dict:
        """The `config` or `model` item of the latest step (plain JSON, no arrays)."""
        step = self.manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint; train first (train.py --workdir ...)")
        return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def _latest(self, restore):
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return restore(step)
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
                self._quarantine(step, e)
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        path = self.directory / str(step)
        n = 0
        while path.with_name(f"{step}.corrupt-{n}").exists():
            n += 1
        target = path.with_name(f"{step}.corrupt-{n}")
        moved = ""
        if not self.read_only:
            if jax.process_index() == 0 and path.exists():
                path.rename(target)
            self.manager.reload()
            moved = f"moved it to {target.name} and "
        message = (f"checkpoint step {step} in {self.directory} cannot be restored "
                   f"({type(error).__name__}: {str(error)[:300]}); {moved}trying the previous step")
        logging.warning(message)
        warnings.warn(message, CheckpointRestoreWarning, stacklevel=3)


def restore_params(workdir: str | Path, *, mesh: Optional[jax.sharding.Mesh] = None,
                   rules: AxisRules = DEFAULT_AXIS_RULES) -> tuple[HymbaConfig, Any]:
    """Load the parameters of a training workdir's latest (restorable) checkpoint.

    Returns the model's HymbaConfig (as trained: its compute dtype, remat and scan backend; change them
    with `.replace`) and the fp32 parameter tree, sharded over `mesh` by the logical axis `rules`
    (default: all devices, data-parallel, i.e. replicated). Only the `params` item is read.
    """
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        model_config = model_config_from_dict(checkpointer.read_json("model"))
        mesh = mesh or make_mesh({"data": -1})
        _, params = checkpointer.restore_params(model_config, param_shardings(model_config, mesh, rules))
    finally:
        checkpointer.close()
    return model_config, params


def read_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The training config saved with a workdir's latest checkpoint."""
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        return ml_collections.ConfigDict(checkpointer.read_json("config"))
    finally:
        checkpointer.close()
