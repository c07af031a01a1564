"""Token-weighted cross-entropy over a held-out split: the training loop's validation and eval.py's
perplexity use this same code, so they report the same number for the same parameters and data."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from tqdm.auto import tqdm

from hymba_jax.data import Tokenizer, make_dataset
from hymba_jax.parallel import shard_batch


def split_batches(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, split: str, *,
                  global_batch_size: int, seq_len: int) -> Iterable[dict]:
    """One deterministic, unshuffled pass over `split` ('train' or 'validation'), packed like training."""
    return make_dataset(data_config, tokenizer, split=split, global_batch_size=global_batch_size,
                        seq_len=seq_len, shuffle=False, num_epochs=1)


def hosts_still_reading(has_batch: bool) -> bool:
    """Whether any process still has a batch (every process calls this at the same point)."""
    if jax.process_count() == 1:
        return has_batch
    return bool(np.any(multihost_utils.process_allgather(np.asarray(has_batch))))


def loss_sums(eval_step: Callable, params: Any, batches: Iterable[dict], batch_sharding, *,
              max_batches: int = -1, desc: str = "eval", progress: bool = True) -> tuple[float, float]:
    """(sum of w * CE, sum of w) over the first `max_batches` batches (-1: all), accumulated in float64.

    The processes may hold different numbers of batches of a split (each reads its own documents). They
    agree before every step whether any still has one; a process that has run out joins the remaining
    steps with a batch of weight 0, which adds nothing, so every collective is entered by every process
    and no document is dropped.
    """
    batches = iter(batches if max_batches < 0 else itertools.islice(batches, max_batches))
    total = None if max_batches < 0 else max_batches
    bar = tqdm(desc=desc, total=total, leave=False, unit="batch", disable=not progress or jax.process_index() != 0)
    sums, empty = [], None
    while True:
        batch = next(batches, None)
        if not hosts_still_reading(batch is not None):
            break
        if batch is None:
            if empty is None:
                raise ValueError("this process has no evaluation batch while others do: the held-out split "
                                 "has fewer batches than processes; lower batch_size or add validation data")
            batch = empty
        elif empty is None:
            empty = {k: np.zeros_like(v) for k, v in batch.items()}   # weights 0: contributes nothing
        sums.append(eval_step(params, shard_batch(batch, batch_sharding)))
        bar.update()
    bar.close()
    ce, weight = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2).sum(axis=0)
    return float(ce), float(weight)


def summary(ce: float, weight: float) -> dict:
    """{'loss', 'perplexity', 'tokens'} of summed cross-entropy and token weight."""
    if weight <= 0:
        raise ValueError("the evaluation data holds no tokens (every weight is 0)")
    loss = ce / weight
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(weight)}
