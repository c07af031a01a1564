"""Pretraining: config validation, optimizer, sharded train state, steps, the train program that assembles
them (program.py: the one builder the loop, AOT, benchmarks and tests use), checkpoints, metrics, loop.

    from hymba_jax.train import restore_params, train
    model_config, params = restore_params(workdir)     # load a trained workdir (latest good checkpoint)

The exports load on first use, so `hymba_jax.train.program` / `.step` / `.state` can be imported without the data
pipeline's packages (grain, TFDS), e.g. by benchmarks on a machine that lacks them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"Checkpointer": "checkpoint", "read_workdir_config": "checkpoint", "restore_params": "checkpoint",
            "train": "loop"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hymba_jax.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hymba_jax.train.{_EXPORTS[name]}"), name)
