"""Shared pieces of the evaluation tests: one tiny-model Scorer per process (compiles cost seconds)."""

from __future__ import annotations

import functools
from pathlib import Path

import jax

from hymba_jax.config import hymba_tiny
from hymba_jax.eval import Scorer
from hymba_jax.loading import load_model
from hymba_jax.model.lm import init_params

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "eval"
FIXTURE = REPO.parent / "shared" / "reference" / "hymba-tiny-a" / "checkpoint"
MAX_LENGTH = 64
BUCKETS = (32, 64)


@functools.lru_cache(maxsize=None)
def tiny_scorer() -> Scorer:
    """The hymba-tiny-a fixture when present (so harness runs can be compared), else random tiny weights:
    max_length 64, buckets 32 and 64, 8 and 4 rows."""
    if FIXTURE.is_dir():
        config, params = load_model(str(FIXTURE))
    else:
        config = hymba_tiny()
        params = init_params(config, jax.random.key(0))
    return Scorer(config, params, max_length=MAX_LENGTH, buckets=BUCKETS, tokens_per_batch=256, progress=False)
