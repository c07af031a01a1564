"""hymba-jax: the Hymba hybrid-head language model in JAX/Flax.

    from hymba_jax import HymbaConfig, HymbaForCausalLM
    from hymba_jax.hf import load_hf_checkpoint, save_hf_checkpoint

The model is imported on first use, so `import hymba_jax.data` (which never needs the model) stays light.
"""

from hymba_jax.config import HymbaConfig, get_preset

_MODEL_EXPORTS = ("HymbaForCausalLM", "init_params", "param_shapes")

__all__ = ["HymbaConfig", "get_preset", *_MODEL_EXPORTS]


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        from hymba_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'hymba_jax' has no attribute {name!r}")
