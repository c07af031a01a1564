"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 switch those filters off.

    The values are traced, not compiled in: one compiled generation loop serves every setting."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # NaN passes every comparison below, and a NaN temperature makes every draw token 0.
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"Sampling.{name} must be a finite number, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"Sampling.top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1] (1 = no nucleus filter), got {self.top_p}")

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p))


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """(B, V) logits / temperature, with everything outside the top_k (0: all) most likely tokens and
    outside the top_p nucleus (1: all) set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability (after top-k) reaches top_p;
    ties at either edge are kept."""
    logits = logits.astype(jnp.float32) / temperature
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    vocab = logits.shape[-1]
    rank = jnp.arange(vocab)
    ordered = jnp.where((top_k == 0) | (rank < top_k), ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs              # mass of the tokens ranked above this one
    keep = jnp.isfinite(ordered) & ((before < top_p) | (top_p >= 1))
    edge = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < edge, -jnp.inf, logits)


def sample(logits: jax.Array, keys: jax.Array, sampling: Sampling | tuple) -> jax.Array:
    """(B, V) logits, (B,) PRNG keys (one per row, so a row's draw does not depend on its batch) and a
    Sampling (or its `arrays()`) -> (B,) int32 token ids."""
    temperature, top_k, top_p = sampling.arrays() if isinstance(sampling, Sampling) else sampling

    def draw(logits):
        filtered = filter_logits(logits, temperature, top_k, top_p)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(temperature == 0, greedy, draw, logits)
