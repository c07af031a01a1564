"""Inference: the generation cache, prefill, the decode step, sampling and the generation loop.

    from hymba_jax.infer import Generator, Sampling
    outputs = Generator(config, params).generate(prompts, max_new_tokens=64, sampling=Sampling(0.8, top_p=0.95))

See docs/inference.md. `python generate.py` (the repository root) is the command line.
"""

from hymba_jax.infer.cache import (Cache, CacheSize, cache_bytes, cache_size, init_cache, kv_capacity, meta_state,
                                   tree_bytes)
from hymba_jax.infer.engine import Generator, decode_loop, extend, logits_of, prefill
from hymba_jax.infer.sampling import Sampling, filter_logits, sample

__all__ = ["Cache", "CacheSize", "Generator", "Sampling", "cache_bytes", "cache_size", "decode_loop", "extend",
           "filter_logits", "init_cache", "kv_capacity", "logits_of", "meta_state", "prefill", "sample",
           "tree_bytes"]
