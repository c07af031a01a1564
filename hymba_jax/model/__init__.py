"""Flax linen modules of the Hymba model, one file per part of the paper's architecture."""

from hymba_jax.model.lm import HymbaForCausalLM, init_params, param_shapes, param_shardings

__all__ = ["HymbaForCausalLM", "init_params", "param_shapes", "param_shardings"]
