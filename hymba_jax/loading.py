"""Load a model for inference or evaluation from whatever the user has: a Hugging Face checkpoint
directory, a training workdir, or a preset with random weights (benchmarks)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from hymba_jax.config import HymbaConfig, get_preset
from hymba_jax.hf import FP32_TENSORS, load_hf_checkpoint


def load_model(source: str, dtype: str = "float32", seed: int = 0) -> tuple[HymbaConfig, dict]:
    """(config, params) with parameters and compute in `dtype` (A_log stays fp32, as in hf.py).

    source: 'preset:NAME' (random weights of a HymbaConfig preset, e.g. preset:hymba_1p5b); a directory
    with config.json (a Hugging Face checkpoint); any other directory (the latest checkpoint of a training
    workdir, through hymba_jax.train.checkpoint.restore_params). The config has no rematerialisation:
    these parameters are for forward passes.
    """
    path = Path(source)
    if source.startswith("preset:"):
        from hymba_jax.model import init_params

        config = get_preset(source.split(":", 1)[1], dtype=dtype, param_dtype=dtype)
        params = init_params(config, jax.random.key(seed))
    elif (path / "config.json").is_file():
        config, params = load_hf_checkpoint(path, jnp.dtype(dtype))
    elif path.is_dir():
        from hymba_jax.train.checkpoint import restore_params  # Orbax and the training stack, only when needed

        config, params = restore_params(path)
        keep = lambda p, x: x if p[-1].key in FP32_TENSORS else x.astype(dtype)
        params = jax.tree_util.tree_map_with_path(keep, params)
    else:
        raise FileNotFoundError(f"checkpoint {source!r} is not a directory; pass a Hugging Face checkpoint "
                                "directory (with config.json), a training workdir, or preset:NAME")
    return config.replace(dtype=dtype, param_dtype=dtype, remat="none"), params
