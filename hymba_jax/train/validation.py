"""Token-weighted cross-entropy over a held-out split: the training loop's validation and eval.py's
perplexity use this same code, so they report the same number for the same parameters and data."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from hymba_jax.data import Tokenizer, make_dataset
from hymba_jax.parallel import shard_batch


def split_batches(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                  global_batch_size: int, seq_len: int) -> Iterable[dict]:
    """One deterministic, unshuffled pass over `split` ('train' or 'validation'), packed like training."""
    return make_dataset(data_config, tokenizer, split=split, global_batch_size=global_batch_size,
                        seq_len=seq_len, shuffle=False, num_epochs=1)


def loss_sums(eval_step: Callable, params: Any, batches: Iterable[dict], batch_sharding, *,
              max_batches: int = -1, desc: str = "eval", progress: bool = True) -> tuple[float, float]:
    """(sum of w * CE, sum of w) over the first `max_batches` batches (-1: all), accumulated in float64."""
    batches = batches if max_batches < 0 else itertools.islice(batches, max_batches)
    total = None if max_batches < 0 else max_batches
    sums = [eval_step(params, shard_batch(b, batch_sharding))
            for b in tqdm(batches, desc=desc, total=total, leave=False, unit="batch",
                          disable=not progress or jax.process_index() != 0)]
    ce, weight = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2).sum(axis=0)
    return float(ce), float(weight)


def summary(ce: float, weight: float) -> dict:
    """{'loss', 'perplexity', 'tokens'} of summed cross-entropy and token weight."""
    if weight <= 0:
        raise ValueError("the evaluation data holds no tokens (every weight is 0)")
    loss = ce / weight
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(weight)}
