"""Pretraining: config validation, optimizer, sharded train state, steps, checkpoints, metrics, loop.

    from hymba_jax.train import restore_params, train
    model_config, params = restore_params(workdir)     # load a trained workdir (latest good checkpoint)
"""

from hymba_jax.train.checkpoint import Checkpointer, read_workdir_config, restore_params
from hymba_jax.train.loop import train

__all__ = ["Checkpointer", "read_workdir_config", "restore_params", "train"]
