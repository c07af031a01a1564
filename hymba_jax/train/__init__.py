"""Pretraining: config validation, optimizer, sharded train state, steps, the train program that assembles
them (program.py: the one builder the loop, AOT, benchmarks and tests use), metrics, loop. The workdir's
checkpoints are `hymba_jax.checkpoint` (outside this package: reading a trained model needs no training code).

    from hymba_jax.train import train

The exports load on first use, so `hymba_jax.train.program` / `.step` / `.state` can be imported without the data
pipeline's packages (grain, TFDS), e.g. by benchmarks on a machine that lacks them.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"train": "loop"}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hymba_jax.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hymba_jax.train.{_EXPORTS[name]}"), name)
