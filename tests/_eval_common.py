"""Shared pieces of the evaluation tests: one tiny-model Scorer per process (compiles cost seconds)."""

from __future__ import annotations

import functools
from pathlib import Path

from hymba_jax.downstream import Scorer
from hymba_jax.loading import load_model
from conftest import TINY_A

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "eval"
FIXTURE = TINY_A / "checkpoint"
MAX_LENGTH = 64
BUCKETS = (32, 64)


@functools.lru_cache(maxsize=None)
def tiny_scorer() -> Scorer:
    """The hymba-tiny-a fixture (so harness runs can be compared): max_length 64, buckets 32 and 64, 8 and
    4 rows. The fixture has 64 positions in all, 60 after its 4 meta tokens; generation refuses to pass
    them, so the tests' model has room for 64 text positions (the weights are the fixture's)."""
    config, params = load_model(str(FIXTURE))
    config = config.replace(max_position_embeddings=MAX_LENGTH + config.num_meta_tokens)
    return Scorer(config, params, max_length=MAX_LENGTH, buckets=BUCKETS, tokens_per_batch=256, progress=False)
