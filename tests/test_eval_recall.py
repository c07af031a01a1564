"""Synthetic recall data: every answer is recoverable from the sequence, and only answers are weighted."""

from __future__ import annotations

import numpy as np
import pytest

from hymba_jax.downstream.recall import RecallBatch, RecallVocab, mqar_batch, needle_batch, recall_accuracy

VOCAB = RecallVocab(101, num_keys=20, num_values=20)


def test_mqar_answers_follow_their_keys():
    b = mqar_batch(np.random.default_rng(0), VOCAB, batch=4, length=96, num_pairs=8, num_queries=6)
    assert b.inputs.shape == b.targets.shape == b.weights.shape == (4, 95)
    np.testing.assert_array_equal(b.inputs[:, 1:], b.targets[:, :-1])
    assert (b.weights.sum(1) == 6).all()
    lo, hi = VOCAB.keys
    for row in range(4):
        seq = np.concatenate([b.inputs[row], b.targets[row, -1:]])
        stored = dict(zip(seq[0:16:2], seq[1:16:2]))
        assert len(stored) == 8 and all(lo <= k < hi for k in stored)
        for t in np.flatnonzero(b.weights[row]):
            key = b.inputs[row, t]           # the query key is the input at the answer's position
            assert t >= 16 and b.targets[row, t] == stored[key]
        filler = seq[16:][~np.isin(np.arange(16, 96), np.flatnonzero(b.weights[row]) + np.array([[0], [1]]))]
        assert (filler >= VOCAB.filler[0]).all()


def test_needle_at_depth_and_question_at_end():
    b = needle_batch(np.random.default_rng(1), VOCAB, batch=3, length=64, depth=0.5)
    at = 30  # round(0.5 * (64 - 4))
    np.testing.assert_array_equal(b.inputs[:, at], b.inputs[:, -1])       # the key, asked at the end
    np.testing.assert_array_equal(b.inputs[:, at + 1], b.targets[:, -1])  # its value is the answer
    assert b.weights.sum() == 3 and b.weights[:, -1].all()


def test_accuracy_and_refusals():
    b = RecallBatch(np.zeros((1, 4), np.int32), np.array([[0, 7, 0, 9]]), np.array([[False, True, False, True]]))

    def one_right(params, inputs, targets, weights):
        return 1, int(weights.sum())

    assert recall_accuracy(one_right, None, b) == 0.5
    with pytest.raises(ValueError, match="leaves no filler"):
        RecallVocab(40, num_keys=20, num_values=20)
    with pytest.raises(ValueError, match="num_queries"):
        mqar_batch(np.random.default_rng(0), VOCAB, 1, 64, num_pairs=4, num_queries=5)
