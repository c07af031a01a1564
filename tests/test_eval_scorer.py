"""The scorer equals a plain full forward per request, whatever shares its batch or however it is padded."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hymba_jax.eval import greedy_generate
from hymba_jax.eval.scorer import default_buckets, rolling_windows
from hymba_jax.model.lm import HymbaForCausalLM

from _eval_common import tiny_scorer

# (context, continuation) lengths: inputs of 24 tokens (bucket 32) with different splits, and inputs of
# 64 (bucket 64): one exactly max_length + 1 tokens long, two truncated to their last 65 tokens. Two
# distinct shapes keep the eager reference forwards cheap.
LENGTHS = [(20, 5), (10, 15), (24, 1), (50, 15), (60, 10), (40, 30)]


@pytest.fixture(scope="module")
def scorer():
    return tiny_scorer()


@pytest.fixture(scope="module")
def requests():
    rng = np.random.default_rng(0)
    return [(rng.integers(3, 100, c).tolist(), rng.integers(3, 100, n).tolist()) for c, n in LENGTHS]


def reference(scorer, context, continuation):
    """Unpadded batch-1 forward of the (truncated) request; log_softmax summed over the continuation."""
    whole = (context + continuation)[-(scorer.max_length + 1):]
    logits = HymbaForCausalLM(scorer.config).apply({"params": scorer.params}, np.array([whole[:-1]]))[0]
    logits = np.asarray(logits, np.float64)[-len(continuation):]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = np.array(whole[1:])[-len(continuation):]
    return logp[np.arange(len(targets)), targets].sum(), bool((logits.argmax(-1) == targets).all())


def test_matches_full_forward_and_ignores_batch_composition(scorer, requests):
    together = scorer.loglikelihood(requests)
    alone = [scorer.loglikelihood([r])[0] for r in requests]
    reordered = scorer.loglikelihood(requests[::-1])[::-1]
    for r, t, a, o in zip(requests, together, alone, reordered):
        ref_lp, ref_greedy = reference(scorer, *r)
        assert t.logprob == pytest.approx(ref_lp, abs=2e-4)
        assert t.is_greedy == ref_greedy
        assert a.logprob == pytest.approx(t.logprob, abs=1e-5) and o.logprob == pytest.approx(t.logprob, abs=1e-5)
    assert all(t.logprob < 0 for t in together)


def test_padding_is_exact(scorer, requests):
    """The same request in the 32 bucket (little padding) and, via a long context, the 64 bucket."""
    context, continuation = requests[1]
    short = scorer.loglikelihood([(context, continuation)])[0]
    bucket = scorer.bucket(len(context) + len(continuation) - 1)
    assert bucket == 32
    # Same prediction problem padded to 64: the input row differs only by right padding.
    tokens = np.zeros((scorer.rows(64), 64), np.int32)
    whole = context + continuation
    tokens[0, :len(whole) - 1] = whole[:-1]
    targets = np.zeros_like(tokens)
    targets[0, :len(whole) - 1] = whole[1:]
    weights = np.zeros(tokens.shape, bool)
    weights[0, len(whole) - 1 - len(continuation):len(whole) - 1] = True
    padded = scorer._forward(scorer.params, tokens, targets, weights, np.zeros(len(tokens), np.int32))
    assert float(padded[0][0]) == pytest.approx(short.logprob, abs=1e-5)


def test_greedy_generation_matches_full_forward_argmax(scorer, requests):
    """Each generated token is the argmax of an unpadded forward over the prompt and the tokens before it."""
    prompts = [requests[0][0][:21], requests[1][0] + requests[0][0][:11]]  # 21 + 3 generated: shape 24
    out = greedy_generate(scorer, prompts, 3)
    model = HymbaForCausalLM(scorer.config)
    for prompt, generated in zip(prompts, out):
        logits = model.apply({"params": scorer.params}, np.array([prompt + generated]))[0]
        assert generated == np.argmax(logits[len(prompt) - 1:-1], axis=-1).tolist()
    stopped = greedy_generate(scorer, prompts[:1], 3, stop_ids=(out[0][1],))
    assert stopped == [out[0][:1]]


def test_rolling_windows_cover_every_token_once():
    tokens = list(range(10, 21))  # 11 tokens, windows of 4
    windows = rolling_windows(tokens, prefix_id=1, max_length=4)
    assert windows == [([1], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([16, 17], [18, 19, 20])] or \
        [c for _, c in windows] == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20]]
    assert sum((c for _, c in windows), []) == tokens
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= 4
    lm_utils = pytest.importorskip("lm_eval.utils")
    expected = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(tokens, 1, 4, 1)]
    assert windows == [tuple(map(list, w)) for w in expected]


def test_rolling_loglikelihood_equals_windows(scorer):
    doc = np.random.default_rng(1).integers(3, 100, 150).tolist()
    total = scorer.rolling_loglikelihood([doc], prefix_id=1)[0]
    parts = scorer.loglikelihood(rolling_windows(doc, 1, scorer.max_length))
    assert total == pytest.approx(sum(p.logprob for p in parts), rel=1e-6)
    assert len(parts) == 3


def test_bad_requests_are_refused(scorer):
    with pytest.raises(ValueError, match="must both be non-empty"):
        scorer.loglikelihood([([], [5])])
    with pytest.raises(ValueError, match="rolling windows"):
        scorer.loglikelihood([([1], [5] * 65)])
    assert default_buckets(300) == (64, 128, 256, 300)
