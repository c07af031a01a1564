"""Exact packing: every token of a packed row gets the logits it gets when its document runs alone.

The model is configured so that every mechanism that could leak across documents is exercised: global
and sliding-window layers (documents longer than the window), cross-layer KV sharing, meta tokens, a
conv width other than 4 and trailing padding (segment id 0), all in fp32. A document alone is a row of
its tokens followed by padding and no segment ids: the model is causal, so padding after a document
cannot change its logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hymba_jax.config import hymba_tiny
from hymba_jax.model.lm import HymbaForCausalLM

LENGTH = 32
ROWS = [[11, 3, 9, 1, 8], [20, 9]]          # document lengths per packed row (row 2 ends with padding)


@pytest.fixture(scope="module")
def model_and_params():
    cfg = hymba_tiny(vocab_size=53, num_layers=5, global_layers=(0, 4), kv_reuse_groups=((1, 2, 3),),
                     d_conv=3, sliding_window=5, num_meta_tokens=3)
    model = HymbaForCausalLM(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    # Norm scales, D and biases start at constants; randomise every leaf so a misplaced one shows.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model, params


def test_packed_rows_match_documents_alone(model_and_params):
    model, params = model_and_params
    rng = np.random.default_rng(0)
    docs = [[rng.integers(3, 53, n) for n in row] for row in ROWS]
    packed = np.zeros((len(ROWS), LENGTH), np.int32)
    segments = np.zeros((len(ROWS), LENGTH), np.int32)
    for r, row in enumerate(docs):
        start = 0
        for s, doc in enumerate(row):
            packed[r, start:start + len(doc)] = doc
            segments[r, start:start + len(doc)] = s + 1
            start += len(doc)
    flat = [doc for row in docs for doc in row]
    alone = np.zeros((len(flat), LENGTH), np.int32)
    for i, doc in enumerate(flat):
        alone[i, :len(doc)] = doc

    apply = jax.jit(model.apply)
    packed_logits = np.asarray(apply({"params": params}, packed, segment_ids=segments))
    alone_logits = np.asarray(apply({"params": params}, alone))
    i = 0
    for r, row in enumerate(docs):
        start = 0
        for doc in row:
            got = packed_logits[r, start:start + len(doc)]
            want = alone_logits[i, :len(doc)]
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5,
                                       err_msg=f"row {r}, document of {len(doc)} tokens at {start}")
            start += len(doc)
            i += 1
    # The check has teeth: without segment ids the later documents' logits differ.
    leaked = np.asarray(apply({"params": params}, packed))
    assert np.abs(leaked[0, 11:14] - alone_logits[1, :3]).max() > 1e-2
    assert np.abs(alone_logits).max() > 1.0
