"""Batched, length-bucketed log-likelihood scoring in JAX (greedy generation: generate.py).

A request is (context ids, continuation ids); its score is the summed log-probability of the continuation
given the context and whether every continuation token is the argmax (lm-evaluation-harness's
`(logprob, is_greedy)`). Requests are sorted by length and right-padded to a few bucket lengths with a
fixed number of rows per bucket, so the jitted function compiles once per bucket. Right padding is exact
because the model is causal: the padding comes after every scored position and the scored positions never
see it (attention is causal, and the conv and SSM scans run forward), so a request's score does not
depend on what shares its batch. The weight mask keeps padded positions and padded rows out of the sums.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from hymba_jax.config import HymbaConfig
from hymba_jax.model.lm import HymbaForCausalLM


class LogLikelihood(NamedTuple):
    logprob: float
    is_greedy: bool


def default_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to, and always including, `max_length`."""
    buckets, size = [], smallest
    while size < max_length:
        buckets.append(size)
        size *= 2
    return tuple(buckets) + (max_length,)


class Scorer:
    """Scores token requests with one model.

    config, params: the model (params may be sharded; the jitted functions take them as an argument).
    max_length: the longest input the model sees; longer requests keep their last `max_length + 1` tokens
    (as the harness does). Default: max_position_embeddings - num_meta_tokens.
    tokens_per_batch: rows per batch = max(1, tokens_per_batch // bucket length).
    """

    def __init__(self, config: HymbaConfig, params, *, max_length: int | None = None,
                 buckets: Sequence[int] | None = None, tokens_per_batch: int = 8192, progress: bool = True):
        self.config = config
        self.params = params
        self.max_length = int(max_length or config.max_position_embeddings - config.num_meta_tokens)
        self.buckets = tuple(sorted(buckets)) if buckets else default_buckets(self.max_length)
        if self.buckets[-1] < self.max_length:
            raise ValueError(f"Scorer: the largest bucket ({self.buckets[-1]}) must be >= max_length "
                             f"({self.max_length}); add a bucket or lower max_length")
        self.tokens_per_batch = tokens_per_batch
        self.progress = progress
        model = HymbaForCausalLM(config)

        def forward(params, tokens, targets, weights):
            """Sum log p(target) over weighted positions and whether all of them are the argmax; one
            compile per bucket."""
            logits = model.apply({"params": params}, tokens)
            target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            logprob = target_logits - jax.nn.logsumexp(logits, axis=-1)
            return (jnp.sum(jnp.where(weights, logprob, 0.0), axis=-1),
                    jnp.all((jnp.argmax(logits, axis=-1) == targets) | ~weights, axis=-1))

        self._forward = jax.jit(forward)

    # ----------------------------------------------------------------------------------------------
    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise ValueError(f"Scorer: a sequence of {length} tokens exceeds the largest bucket {self.buckets[-1]}")

    def rows(self, bucket: int) -> int:
        return max(1, self.tokens_per_batch // bucket)

    def batches(self, lengths: Sequence[int], desc: str) -> Iterable[tuple[int, list[int]]]:
        """(bucket, request indices) batches, longest first, each at most `rows(bucket)` requests."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches, i = [], 0
        while i < len(order):
            b = self.bucket(lengths[order[i]])
            group = [order[i]]
            i += 1
            while i < len(order) and len(group) < self.rows(b) and self.bucket(lengths[order[i]]) == b:
                group.append(order[i])
                i += 1
            batches.append((b, group))
        return tqdm(batches, desc=desc, disable=not self.progress or len(batches) < 2, leave=False)

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                      desc: str = "scoring") -> list[LogLikelihood]:
        """[(context ids, continuation ids)] -> [(sum log p(continuation | context), is_greedy)].

        The context must hold at least one token (use BOS for an empty context); the continuation at
        least one and at most max_length tokens.
        """
        inputs, n_scored = [], []
        for i, (context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(f"request {i}: context ({len(context)} tokens) and continuation "
                                 f"({len(continuation)} tokens) must both be non-empty; give an empty "
                                 "context as [bos_id]")
            if len(continuation) > self.max_length:
                raise ValueError(f"request {i}: the continuation has {len(continuation)} tokens, more than "
                                 f"max_length={self.max_length}; score it with rolling windows instead")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append(whole)
            n_scored.append(len(continuation))
        results: list[LogLikelihood | None] = [None] * len(requests)
        for bucket, group in self.batches([len(x) - 1 for x in inputs], desc):
            rows = self.rows(bucket)
            tokens = np.full((rows, bucket), self.config.pad_token_id, np.int32)
            targets = np.zeros((rows, bucket), np.int32)
            weights = np.zeros((rows, bucket), bool)
            for r, i in enumerate(group):
                n = len(inputs[i]) - 1
                tokens[r, :n] = inputs[i][:-1]
                targets[r, :n] = inputs[i][1:]
                weights[r, n - n_scored[i]:n] = True
            logprob, greedy = jax.device_get(self._forward(self.params, tokens, targets, weights))
            for r, i in enumerate(group):
                results[i] = LogLikelihood(float(logprob[r]), bool(greedy[r]))
        return results

    def rolling_loglikelihood(self, documents: Sequence[Sequence[int]], prefix_id: int,
                              desc: str = "rolling") -> list[float]:
        """Total log-likelihood of each document, in disjoint windows of max_length tokens (the harness's
        `loglikelihood_rolling`: the first window is conditioned on `prefix_id`, each later window on the
        max_length tokens before it)."""
        windows, owner = [], []
        for d, doc in enumerate(documents):
            for window in rolling_windows(list(doc), prefix_id, self.max_length):
                windows.append(window)
                owner.append(d)
        totals = [0.0] * len(documents)
        for d, ll in zip(owner, self.loglikelihood(windows, desc=desc)):
            totals[d] += ll.logprob
        return totals


def rolling_windows(tokens: list[int], prefix_id: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows that together predict every token once (lm-eval's
    get_rolling_token_windows with context_len=1, made disjoint)."""
    windows, predicted = [], 0
    if not tokens:
        return windows
    first = min(max_length, len(tokens))
    windows.append(([prefix_id] + tokens[:first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        windows.append((tokens[end - max_length - 1:end - 1], tokens[end - n:end]))
        predicted = end
    # Disjoint: the context is what precedes the continuation, the continuation's own tokens removed.
    return [(ctx[:len(ctx) - (len(cont) - 1)], cont) for ctx, cont in windows]
