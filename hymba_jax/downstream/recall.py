"""Synthetic recall evaluations that need no data: multi-query associative recall (MQAR) and
needle-in-a-haystack, at lengths past the sliding window.

Token layout for a vocabulary of V ids: 0..2 are pad/BOS/EOS, then `num_keys` key ids, `num_values`
value ids, and the rest filler. Sequences are teacher-forced: after a query key the model must predict
the value that followed that key earlier. Accuracy is the fraction of those value positions whose
argmax is right (chance = 1 / num_values).

* MQAR (Arora et al., Zoology): `num_pairs` key-value pairs at the start, then filler with `num_queries`
  (key, value) queries of distinct stored keys at random later positions.
* Needle in a haystack: filler of `length` tokens with one key-value needle at a relative `depth`; the
  sequence ends with the needle's key and the model must produce its value.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import HymbaForCausalLM

FIRST_ID = 3


class RecallBatch(NamedTuple):
    """inputs, targets (B, T) int32 (targets = inputs shifted by one); weights (B, T) bool marks value
    positions to predict."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray


@dataclasses.dataclass(frozen=True)
class RecallVocab:
    vocab_size: int
    num_keys: int
    num_values: int

    def __post_init__(self):
        if self.vocab_size - FIRST_ID - self.num_keys - self.num_values < 1:
            raise ValueError(f"RecallVocab: vocab_size {self.vocab_size} leaves no filler ids after "
                             f"{FIRST_ID} specials, {self.num_keys} keys and {self.num_values} values")

    @property
    def keys(self) -> tuple[int, int]:
        return FIRST_ID, FIRST_ID + self.num_keys

    @property
    def values(self) -> tuple[int, int]:
        return self.keys[1], self.keys[1] + self.num_values

    @property
    def filler(self) -> tuple[int, int]:
        return self.values[1], self.vocab_size


def _batch(tokens: np.ndarray, answer_positions: np.ndarray) -> RecallBatch:
    """tokens (B, T + 1); answer_positions (B, T + 1) bool where a value must be predicted."""
    return RecallBatch(tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32),
                       answer_positions[:, 1:].copy())


def mqar_batch(rng: np.random.Generator, vocab: RecallVocab, batch: int, length: int, num_pairs: int,
               num_queries: int) -> RecallBatch:
    """MQAR sequences of `length` tokens (inputs/targets of length - 1)."""
    if num_queries > num_pairs or num_pairs > min(vocab.num_keys, vocab.num_values):
        raise ValueError(f"mqar_batch: need num_queries ({num_queries}) <= num_pairs ({num_pairs}) <= "
                         f"min(num_keys, num_values) ({min(vocab.num_keys, vocab.num_values)})")
    slots = (length - 2 * num_pairs) // 2
    if slots < num_queries:
        raise ValueError(f"mqar_batch: length {length} holds {num_pairs} pairs and at most {slots} queries")
    tokens = rng.integers(*vocab.filler, size=(batch, length))
    answers = np.zeros((batch, length), bool)
    for b in range(batch):
        keys = rng.choice(np.arange(*vocab.keys), num_pairs, replace=False)
        values = rng.choice(np.arange(*vocab.values), num_pairs, replace=False)
        tokens[b, 0:2 * num_pairs:2], tokens[b, 1:2 * num_pairs:2] = keys, values
        asked = rng.choice(num_pairs, num_queries, replace=False)
        where = 2 * num_pairs + 2 * np.sort(rng.choice(slots, num_queries, replace=False))
        tokens[b, where], tokens[b, where + 1] = keys[asked], values[asked]
        answers[b, where + 1] = True
    return _batch(tokens, answers)


def needle_batch(rng: np.random.Generator, vocab: RecallVocab, batch: int, length: int, depth: float
                 ) -> RecallBatch:
    """One key-value needle at relative `depth` (0 = start, 1 = just before the question) of a filler
    haystack; the last two tokens are the key and its value."""
    if not 0.0 <= depth <= 1.0 or length < 5:
        raise ValueError(f"needle_batch: depth must be in [0, 1] (got {depth}) and length >= 5 (got {length})")
    tokens = rng.integers(*vocab.filler, size=(batch, length))
    keys = rng.integers(*vocab.keys, size=batch)
    values = rng.integers(*vocab.values, size=batch)
    at = int(round(depth * (length - 4)))
    tokens[:, at], tokens[:, at + 1] = keys, values
    tokens[:, -2], tokens[:, -1] = keys, values
    answers = np.zeros((batch, length), bool)
    answers[:, -1] = True
    return _batch(tokens, answers)


def make_accuracy_fn(config: HymbaConfig):
    """Jitted (params, inputs, targets, weights) -> (correct count, counted positions)."""
    model = HymbaForCausalLM(config)

    @jax.jit
    def accuracy(params, inputs, targets, weights):
        predictions = jnp.argmax(model.apply({"params": params}, inputs), axis=-1)
        return jnp.sum((predictions == targets) & weights), jnp.sum(weights)

    return accuracy


def recall_accuracy(accuracy_fn, params, batch: RecallBatch) -> float:
    correct, total = accuracy_fn(params, batch.inputs, batch.targets, batch.weights)
    return float(correct) / max(int(total), 1)
