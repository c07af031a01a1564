"""JAX's persistent compilation cache, on by default in train.py, eval.py and generation.

Compiling the Hymba-1.5B training step takes about a minute on a GPU host (docs/performance.md); with the
cache, a restart, a resume or a second run of the same program loads the compiled executable instead
(GPU autotuning results are kept beside it). The cache is keyed by the program, the devices and the
JAX/XLA versions, so a changed config or another machine simply compiles again.

`JAX_COMPILATION_CACHE_DIR` (JAX's own setting), when set, is used instead of the program's directory.
Only compilations over one second are stored (JAX's `jax_persistent_cache_min_compile_time_secs`).
"""

from __future__ import annotations

import os
from typing import Optional

import jax
from jax.experimental.compilation_cache import compilation_cache

DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "hymba_jax", "jax")


def enable(directory: str) -> Optional[str]:
    """Store and reuse compiled programs in `directory` ('' turns the cache off unless
    JAX_COMPILATION_CACHE_DIR is set). Call before the first compilation. Returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if current or not directory:
        return current or None
    path = os.path.abspath(os.path.expanduser(directory))
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()   # a compilation before this one may have found the cache off
    return path
