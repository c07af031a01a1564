"""hymba-jax: the Hymba hybrid-head language model in JAX/Flax."""

from hymba_jax.config import HymbaConfig, get_preset
from hymba_jax.model import HymbaForCausalLM, init_params, param_shapes

__all__ = ["HymbaConfig", "HymbaForCausalLM", "get_preset", "init_params", "param_shapes"]
