"""The scorer equals a plain full forward per request, whatever shares its batch or however it is padded."""

from __future__ import annotations

import numpy as np
import pytest

from hymba_jax.downstream import greedy_generate
from hymba_jax.downstream.scorer import default_buckets, rolling_windows
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
    padded = scorer._forward(scorer.params, tokens, targets, weights)
    assert float(padded[0][0]) == pytest.approx(short.logprob, abs=1e-5)


def check_greedy(scorer, prompts, outputs, max_new_tokens, stop_id=None, stop=None) -> list[str]:
    """Assert that the outputs are step-by-step greedy decoding with the full forward; return why each
    row ended ('length', 'stop id' or 'stop').

    That is: every output token is the full forward's argmax after the (truncated) prompt and the tokens
    before it (the scorer's is_greedy, itself checked against an unpadded forward above), no proper
    prefix makes `stop` true, and a row shorter than max_new_tokens ends where `stop` becomes true or
    where the argmax is the stop id."""
    keep = scorer.max_length - max_new_tokens
    prompts = [p[-keep:] for p in prompts]
    reasons = []
    for out in outputs:
        assert not any(stop is not None and stop(out[:n]) for n in range(1, len(out))), out
        assert len(out) <= max_new_tokens and stop_id not in out
        reasons.append("stop" if stop is not None and out and stop(out) else
                       "length" if len(out) == max_new_tokens else "stop id")
    requests = [(p, out) for p, out in zip(prompts, outputs) if out]
    requests += [(p + out, [stop_id]) for p, out, why in zip(prompts, outputs, reasons) if why == "stop id"]
    assert all(r.is_greedy for r in scorer.loglikelihood(requests))
    return reasons


def test_greedy_generation_matches_step_by_step_full_forward(scorer):
    """Ragged prompts (one truncated to its last max_length - max_new_tokens tokens) in two batches of
    four rows (the second with a repeated padding row), plain and with a stop id and a stop callback;
    then some of them again in a batch with other prompts: the same outputs. Every batch's longest
    prompt is over 32 tokens, so all use one cache length and prefill chunk (one compile)."""
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 100, n).tolist() for n in (70, 50, 45, 40, 35, 12, 5)]
    max_new = 6
    out = greedy_generate(scorer, prompts, max_new)
    assert check_greedy(scorer, prompts, out, max_new) == ["length"] * len(prompts)

    stop_id = out[5][2]                        # ends row 5 after at most 2 tokens
    stop_string = out[6][3:5]                  # a two-token "stop string", kept in the output
    stop = lambda ids: ids[-2:] == stop_string
    stopped = greedy_generate(scorer, prompts, max_new, stop_ids=(stop_id,), stop=stop)
    reasons = check_greedy(scorer, prompts, stopped, max_new, stop_id, stop)
    print("outputs:", out, "stopped:", stopped, reasons)
    assert {"stop id", "stop"} <= set(reasons), "no row ended by a stop: pick other stops"
    assert all(s == o[:len(s)] for o, s in zip(out, stopped))     # stopping only cuts the plain output

    regrouped = greedy_generate(scorer, [prompts[5], rng.integers(3, 100, 40).tolist(), prompts[6], prompts[1]],
                                max_new)
    assert regrouped[::2] == [out[5], out[6]] and regrouped[3] == out[1]


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
