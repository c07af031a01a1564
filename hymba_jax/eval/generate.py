"""Greedy generation for `generate_until` requests.

Each step runs the full forward over the right-padded batch and takes the argmax after each row's last
token: exact (the same computation as scoring) and simple, fine for the short answers evaluation asks
for. It sits behind `greedy_generate` so that a cached decoder can replace it without touching callers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hymba_jax.eval.scorer import Scorer


def greedy_generate(scorer: Scorer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    stop_ids: Sequence[int] = (), stop=None, desc: str = "generating") -> list[list[int]]:
    """Greedy continuations of token prompts: at most `max_new_tokens` ids each (stop id excluded).

    A row ends at a token in `stop_ids` or when `stop(generated ids)` is true (e.g. a stop string was
    decoded). Prompts longer than max_length - max_new_tokens keep their last tokens, as the harness does.
    Rows of the same bucket length run together, `scorer.rows(bucket)` at a time.
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
    outputs: list[list[int]] = [[] for _ in prompts]
    total = [len(p) + max_new_tokens for p in prompts]
    for bucket, group in scorer.batches(total, desc):
        rows = scorer.rows(bucket)
        tokens = np.full((rows, bucket), scorer.config.pad_token_id, np.int32)
        lengths = np.ones(rows, np.int32)
        for r, i in enumerate(group):
            tokens[r, :len(prompts[i])] = prompts[i]
            lengths[r] = len(prompts[i])
        active = {r: i for r, i in enumerate(group)}
        for _ in range(max_new_tokens):
            nxt = scorer.next_tokens(tokens, lengths)
            for r in list(active):
                i = active[r]
                tok = int(nxt[r])
                if tok in stop_ids:
                    del active[r]
                    continue
                outputs[i].append(tok)
                tokens[r, lengths[r]] = tok
                lengths[r] += 1
                if stop is not None and stop(outputs[i]):
                    del active[r]
            if not active:
                break
    return outputs
