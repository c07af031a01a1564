"""What evaluation can load: a Hugging Face checkpoint directory, a training workdir, or a preset with
random weights (for benchmarks)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from hymba_jax.config import HymbaConfig, get_preset
from hymba_jax.hf import load_hf_checkpoint
from hymba_jax.model.lm import init_params


def load_model(checkpoint: str, *, dtype: str = "float32", seed: int = 0) -> tuple[HymbaConfig, dict]:
    """'preset:NAME' -> random weights of a preset (HymbaConfig presets, e.g. preset:hymba_1p5b); a
    directory with config.json -> Hugging Face checkpoint; any other directory -> the latest checkpoint of
    a training workdir (hymba_jax.train.checkpoint.restore_params). `dtype` is the compute and parameter dtype."""
    if checkpoint.startswith("preset:"):
        config = get_preset(checkpoint.split(":", 1)[1], dtype=dtype, param_dtype=dtype)
        params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))
        return config, params
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        config, params = load_hf_checkpoint(checkpoint, jnp.dtype(dtype))
        return config.replace(dtype=dtype), params
    if os.path.isdir(checkpoint):
        from hymba_jax.train.checkpoint import restore_params  # Orbax and the training stack

        config, params = restore_params(checkpoint)
        return config.replace(dtype=dtype), params
    raise FileNotFoundError(f"checkpoint {checkpoint!r}: not a directory; pass a Hugging Face checkpoint "
                            "directory, a training workdir or preset:NAME")
