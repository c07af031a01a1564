"""Greedy generation for `generate_until` requests, on the cached decoder (`hymba_jax.infer.Generator`).

A prompt is prefilled once and every new token costs one decode step over the cache, instead of a full
forward over the whole padded sequence per token. The decoder's ragged batches are exact (a row's tokens
depend only on its own prompt), so sorting, batching and padding rows never change an answer. To compile
little, prompts run longest first in batches of a fixed number of rows (the last batch filled up by
repeating a real prompt, whose output is dropped), and the cache length is the scorer's bucket that holds
the batch's longest prompt plus `max_new_tokens`: one prefill and one decode function per bucket (and
prefill chunk) in use.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence

from tqdm.auto import tqdm

from hymba_jax.downstream.scorer import Scorer
from hymba_jax.infer.engine import Generator

PREFILL_CHUNK = 512
_generators: "weakref.WeakKeyDictionary[Scorer, Generator]" = weakref.WeakKeyDictionary()


def _scorer_generator(scorer: Scorer) -> Generator:
    """The Generator of the scorer's model, built once per scorer and set of params (it computes the meta
    tokens' state); its prefill chunk is at most max_length."""
    generator = _generators.get(scorer)
    if generator is None or generator.params is not scorer.params or generator.config != scorer.config:
        generator = Generator(scorer.config, scorer.params, prefill_chunk=min(PREFILL_CHUNK, scorer.max_length))
        _generators[scorer] = generator
    return generator


def greedy_generate(scorer: Scorer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    stop_ids: Sequence[int] = (), stop: Optional[Callable[[list[int]], bool]] = None,
                    desc: str = "generating") -> list[list[int]]:
    """Greedy continuations of token prompts: at most `max_new_tokens` ids each (stop id excluded).

    A row ends at a token in `stop_ids` (not included) or at the first token after which
    `stop(generated ids)` is true (included; e.g. a stop string was decoded). Prompts longer than
    max_length - max_new_tokens keep their last tokens, as the harness does.

    The decoder runs on the device and cannot call `stop`: each row is generated to its stop id or
    `max_new_tokens`, then cut on the host at the shortest prefix for which `stop` is true. That costs
    the decode steps after the stop string (a batch runs until its last row ends anyway) but gives
    exactly the output of stopping there.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    keep = scorer.max_length - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"max_length={scorer.max_length}")
    prompts = [list(p)[-keep:] for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (use [bos_id] for an empty prompt)")
    generator = _scorer_generator(scorer)
    # tokens_per_batch // prefill chunk rows (16 by default): a prefill call holds no more tokens than a
    # scoring forward.
    rows = max(1, scorer.tokens_per_batch // generator.prefill_chunk)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="request", leave=False,
              disable=not scorer.progress or len(prompts) <= rows) as bar:
        for start in range(0, len(order), rows):
            group = order[start:start + rows]
            batch = [prompts[i] for i in group]
            batch += [batch[0]] * (rows - len(batch))
            generated = generator.generate(
                batch, max_new_tokens, stop_ids=stop_ids, max_len=scorer.bucket(len(batch[0]) + max_new_tokens))
            for i, ids in zip(group, generated):
                outputs[i] = ids if stop is None else _cut(ids, stop)
            bar.update(len(group))
    return outputs


def _cut(ids: list[int], stop: Callable[[list[int]], bool]) -> list[int]:
    """The shortest prefix of ids for which stop is true; all of ids when there is none."""
    for n in range(1, len(ids) + 1):
        if stop(ids[:n]):
            return ids[:n]
    return ids
