"""The model beyond the fixture: float64 gradients, ablation configurations, masks, config errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hymba_jax import HymbaForCausalLM
from hymba_jax.config import ConfigError, hymba_125m, hymba_350m, hymba_tiny, llama_style
from hymba_jax.model import param_shapes
from hymba_jax.model.attention import attention_mask, with_prefix
from hymba_jax.model.lm import document_positions
from conftest import random_params


def test_gradients_match_finite_differences_in_float64(tiny_a, tiny_a_expected):
    """Reverse-mode gradients against central differences, in float64, along a random direction in each
    parameter tensor separately (a single direction over all of them would hide small-gradient tensors
    such as A_log or the meta tokens). Central differences with eps 1e-6 are exact to ~1e-9 here."""
    config, params = tiny_a
    # The first four fixture layers keep a global layer, a KV-sharing pair and a sliding window (8) that
    # the 20 tokens run past.
    config = config.replace(num_layers=4, global_layers=(0, 3), kv_reuse_groups=((1, 2),))
    params = {k: v for k, v in params.items() if not k.startswith("layers_") or int(k[7:]) < 4}
    ids = tiny_a_expected["input_ids"][:1, :20]
    with jax.enable_x64(True):
        config64 = config.replace(dtype="float64", param_dtype="float64")
        params64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        model = HymbaForCausalLM(config64)

        @jax.jit
        def loss(p):
            logits = model.apply({"params": p}, ids)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

        grads = jax.jit(jax.grad(loss))(params64)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(params64)
        grad_leaves = jax.tree_util.tree_leaves(grads)
        assert all(bool(jnp.isfinite(g).all()) for g in grad_leaves)
        rng = np.random.default_rng(0)
        eps = 1e-6
        for k, ((path, leaf), grad) in enumerate(zip(leaves, grad_leaves)):
            direction = rng.normal(size=leaf.shape)
            shifted = lambda sign: jax.tree_util.tree_unflatten(
                treedef, [l + sign * eps * direction if j == k else l for j, (_, l) in enumerate(leaves)])
            numeric = (loss(shifted(1)) - loss(shifted(-1))) / (2 * eps)
            analytic = float(jnp.sum(grad * direction))
            assert abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(analytic), (jax.tree_util.keystr(path),
                                                                            numeric, analytic)


@pytest.mark.parametrize("kind", ["attention", "ssm"])
def test_ablations_are_configurations(kind):
    config = hymba_tiny(layer_kind=kind, num_layers=3, global_layers=(0,), kv_reuse_groups=((1, 2),))
    shapes = param_shapes(config)
    layer = shapes["layers_1"]
    assert ("attention" in layer) == (kind == "attention")
    assert ("ssm" in layer) == (kind == "ssm")
    ids = jnp.arange(12, dtype=jnp.int32)[None] % config.vocab_size
    logits = jax.jit(HymbaForCausalLM(config).apply)({"params": random_params(config)}, ids)
    assert logits.shape == (1, 12, config.vocab_size) and bool(jnp.isfinite(logits).all())


def test_llama_style_baseline_has_no_meta_tokens_or_ssm():
    config = llama_style(64, 2, 4, 2, 128)
    shapes = param_shapes(config)
    assert "meta_tokens" not in shapes and "ssm" not in shapes["layers_0"]
    assert set(shapes["layers_1"]["attention"]) == {"q_proj", "k_proj", "v_proj"}


def test_paper_sizes():
    count = lambda c: sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(param_shapes(c)))
    small, medium = hymba_125m(), hymba_350m()
    assert small.global_layers == (0, 11, 23) and medium.global_layers == (0, 15, 31)
    assert 100e6 < count(small) < 170e6 and 300e6 < count(medium) < 450e6


def test_sliding_window_mask_keeps_meta_tokens_visible():
    index = jnp.arange(12)[None]
    mask = with_prefix(attention_mask(index, index, window=3), 2)[0]
    assert mask.shape == (12, 14)
    assert bool(mask[:, :2].all())                        # meta tokens: always
    row = np.asarray(mask[10, 2:])
    assert row.tolist() == [False] * 7 + [True] * 4 + [False]   # q - k <= 3: keys 7..10 (W + 1 with itself)
    assert not bool(attention_mask(index, index, window=None)[0, 3, 4])


def test_document_positions_restart_at_each_document():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert document_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


@pytest.mark.parametrize("changes, field", [
    (dict(num_heads=5), "num_kv_heads"),
    (dict(kv_reuse_groups=((0, 1),)), "kv_reuse_groups"),
    (dict(kv_reuse_groups=((2, 1),)), "kv_reuse_groups"),
    (dict(global_layers=(9,)), "global_layers"),
    (dict(v_head_dim=16), "v_head_dim"),
    (dict(qk_head_dim=15), "qk_head_dim"),
    (dict(layer_kind="mamba"), "layer_kind"),
    (dict(dtype="int8"), "dtype"),
    (dict(remat="sometimes"), "remat"),
])
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"HymbaConfig\.{field}"):
        hymba_tiny(**changes)


@pytest.mark.parametrize("kind", ["hybrid", "ssm"])
def test_init_params_layer_by_layer_matches_model_init(kind):
    """init_params makes each layer kind (KV owner, KV consumer) with one compiled initialiser: the tree,
    shapes and dtypes of model.init; the deterministic initialisers (norm scales, A_log, D) give exactly
    model.init's values; the random ones the same spread (std within 10%: 1,000+ values each, sampling error
    about 3%); and every layer draws its own values."""
    import flax.linen as nn

    from hymba_jax.model.lm import init_params

    cfg = hymba_tiny(layer_kind=kind)
    params = init_params(cfg, jax.random.key(0))
    reference = nn.meta.unbox(HymbaForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    assert jax.tree.structure(params) == jax.tree.structure(reference)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(reference)):
        name = jax.tree_util.keystr(path)
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if np.array_equal(want, want.flat[0]) or name.endswith(("['A_log']", "['D']")):
            assert np.array_equal(got, want), name
        elif want.size >= 1000:
            assert abs(got.std() / want.std() - 1) < 0.1, name
    assert not np.allclose(params["layers_1"]["mlp"]["up_proj"]["kernel"],
                           params["layers_3"]["mlp"]["up_proj"]["kernel"])


def test_layer_runs_group_repeated_units():
    from hymba_jax.config import hymba_1p5b, hymba_tiny
    from hymba_jax.model.lm import layer_runs

    runs = layer_runs(hymba_1p5b())
    assert [(len(run), run[0]) for run in runs] == [(1, (0,)), (7, (1, 2)), (1, (15,)), (1, (16, 17, 18)),
                                                    (6, (19, 20)), (1, (31,))]
    assert sum(len(unit) for run in runs for unit in run) == 32
    assert [len(run) for run in layer_runs(llama_style(64, 5, 4, 2, 128))] == [5]
    assert layer_runs(hymba_tiny(kv_reuse_groups=((1, 4),))) is None    # a consumer apart from its owner


def test_one_layer_body_where_the_window_can_be_data():
    """The 1.5B's stack is one scan body with the window-as-data attention backends ('auto' on GPUs and
    CPUs), and runs of units kind by kind with the kernels whose window is built in (splash, cuDNN's) or
    when the config asks for it."""
    from hymba_jax.config import hymba_1p5b, hymba_tiny
    from hymba_jax.model.lm import uses_one_layer_body

    for backend, one in [("xla", True), ("pallas_flash", True), ("cudnn", True), ("splash", False),
                         ("cudnn_skip", False)]:
        assert uses_one_layer_body(hymba_1p5b(attention_backend=backend)) is one, backend
    assert not uses_one_layer_body(hymba_1p5b(attention_backend="xla", one_layer_body=False))
    assert not uses_one_layer_body(llama_style(64, 5, 4, 2, 128))                # one kind already
    assert not uses_one_layer_body(hymba_tiny(kv_reuse_groups=((1, 4),)))        # a consumer apart from its owner


@pytest.mark.parametrize("remat,body", [("none", "one"), pytest.param("full", "one", marks=pytest.mark.slow),
                                        ("none", "runs")])
def test_scanned_layers_equal_the_layer_loop(remat, body):
    """`scan_layers` against the plain loop over layers: logits, every hidden state and every parameter
    gradient, float64, packed documents. body "one": every layer one scan body, its window and K/V ownership
    as data (the forward is one scan over the layers for the text, one for the meta tokens); "runs": runs of
    repeated units (here of two) as one lax.scan each, as with the kernels whose window is built in."""
    from hymba_jax.config import paper_size
    from hymba_jax.model import lm

    with jax.enable_x64(True):
        config = paper_size(32, 12, 2, 1, 48, vocab_size=61, num_meta_tokens=3, sliding_window=6, d_state=4,
                            dt_rank=4, max_position_embeddings=64, orig_max_position_embeddings=16,
                            dtype="float64", param_dtype="float64", remat=remat, scan_backend="sequential",
                            one_layer_body=body == "one")
        assert [len(run) for run in lm.layer_runs(config)] == [1, 2, 1, 2, 1, 1]
        assert lm.uses_one_layer_body(config) is (body == "one")
        params = jax.tree.map(lambda a: a.astype(jnp.float64), random_params(config))
        ids = jax.random.randint(jax.random.key(1), (2, 14), 0, config.vocab_size)
        segments = jnp.array([[1] * 5 + [2] * 9, [1] * 14])
        weights = jnp.cos(jnp.arange(config.vocab_size))

        def loss(p, scan):
            model = HymbaForCausalLM(config.replace(scan_layers=scan))
            logits, hidden = model.apply({"params": p}, ids, segment_ids=segments, return_hidden_states=True)
            return jnp.sum(logits * weights), (logits, hidden)

        grad = lambda scan: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, scan)
        forward = str(jax.make_jaxpr(lambda p: loss(p, True)[0])(params))
        assert forward.count(f"length={config.num_layers}") == (2 if body == "one" else 0)
        (_, (logits, hidden)), grads = grad(True)
        (_, (logits_ref, hidden_ref)), grads_ref = grad(False)
        np.testing.assert_allclose(logits, logits_ref, rtol=1e-12, atol=1e-12)
        assert len(hidden) == len(hidden_ref) == config.num_layers + 1
        for h, h_ref in zip(hidden, hidden_ref):
            np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-12)
        jax.tree.map(lambda g, g_ref: np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12),
                     grads, grads_ref)


@pytest.mark.slow     # 1-2 minutes each; the fast suite trains, resumes and evaluates on the training layout
@pytest.mark.parametrize("structure", ["one body", "runs", "loop"])
def test_the_training_layout_is_the_same_model(structure):
    """The training layout (`stack_layers`: layers stacked, K/V projections stacked over the KV owners)
    against the per-layer tree: the round trip is exact, `init_params(stacked=True)` is the stacked
    per-layer init of the same key, and the model gives the same logits and (stacked) gradients from either
    layout (packed documents) in each structure: the one scan body (what training runs on GPUs and CPUs),
    runs of units (TPUs) and the layer loop. (The structures against each other in float64:
    test_scanned_layers_equal_the_layer_loop.)"""
    from hymba_jax.model import lm

    config = hymba_tiny(num_layers=6, global_layers=(0, 5), kv_reuse_groups=((1, 2), (3, 4)),
                        scan_backend="sequential", scan_layers=structure != "loop",
                        one_layer_body=structure == "one body")
    assert [len(run) for run in lm.layer_runs(config)] == [1, 2, 1]
    per_layer = lm.init_params(config, jax.random.key(3))
    stacked = lm.init_params(config, jax.random.key(3), stacked=True)
    assert set(stacked) == {"embedding", "meta_tokens", "final_norm", lm.STACKED, lm.STACKED_KV_OWNERS}
    assert stacked[lm.STACKED_KV_OWNERS]["attention"]["k_proj"]["kernel"].shape[0] == len(config.kv_owner_layers)
    assert "k_proj" not in stacked[lm.STACKED]["attention"]
    jax.tree.map(np.testing.assert_array_equal, stacked, lm.stack_layers(per_layer, config))
    jax.tree.map(np.testing.assert_array_equal, lm.unstack_layers(stacked, config), per_layer)
    assert jax.tree.structure(stacked) == jax.tree.structure(lm.param_shapes(config, stacked=True))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
    loss = lambda p: jnp.sum(HymbaForCausalLM(config).apply({"params": p}, ids, segment_ids=segments)
                             * jnp.cos(jnp.arange(config.vocab_size)))
    value_ref, grads_ref = jax.jit(jax.value_and_grad(loss))(per_layer)
    value, grads = jax.jit(jax.value_and_grad(loss))(stacked)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    assert lm.is_stacked(grads)
    jax.tree.map(lambda g, g_ref: np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6),
                 lm.unstack_layers(grads, config), grads_ref)


def test_initialisation_does_not_depend_on_the_kernels():
    """init_params vmaps a layer's init over the layers; the kernels a config names (cuDNN attention has no
    batching rule for it, and neither runs on the CPU) make the same parameters as plain JAX, in either
    layout."""
    from hymba_jax.model.lm import init_params, stack_layers

    cfg = hymba_tiny(num_layers=3, global_layers=(0,), kv_reuse_groups=((1, 2),))
    plain = init_params(cfg, jax.random.key(0), stacked=True)
    named = init_params(cfg.replace(attention_backend="cudnn", scan_backend="pallas_gpu"), jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, stack_layers(named, cfg), plain)    # per layer: the same values


def test_a_reused_segment_id_is_a_new_document():
    """Positions, conv and SSM restart where the id changes; attention follows the same rule, so the id
    of an earlier document used again starts a separate document (not a join with the earlier one)."""
    config = hymba_tiny()
    params = random_params(config)
    ids = jnp.arange(12, dtype=jnp.int32)[None] % config.vocab_size
    apply = jax.jit(HymbaForCausalLM(config).apply)
    reused = apply({"params": params}, ids, segment_ids=jnp.array([[1] * 4 + [2] * 4 + [1] * 4]))
    distinct = apply({"params": params}, ids, segment_ids=jnp.array([[1] * 4 + [2] * 4 + [3] * 4]))
    np.testing.assert_array_equal(reused, distinct)
    alone = apply({"params": params}, ids[:, 8:])
    np.testing.assert_allclose(reused[:, 8:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 101])
def test_token_ids_outside_the_vocabulary_give_nan_not_another_token(bad):
    config = hymba_tiny(num_meta_tokens=0)
    params = random_params(config)
    ids = jnp.array([[5, 6, bad, 7], [5, 6, 8, 7]], jnp.int32)
    apply = jax.jit(HymbaForCausalLM(config).apply)
    logits = apply({"params": params}, ids)
    assert bool(jnp.isnan(logits[0, 2:]).all())             # its row is NaN from it on (masked keys too: 0 * NaN)
    np.testing.assert_allclose(logits[1], apply({"params": params}, ids[1:])[0], rtol=1e-5, atol=1e-5)


def test_a_parameter_of_the_wrong_shape_is_refused_by_name():
    """Applying the model checks each stored parameter's shape (hymba_jax.model.params.logical_param)."""
    from flax.errors import ScopeParamShapeError

    from hymba_jax.model.lm import init_params

    cfg = hymba_tiny(num_layers=2, global_layers=(0,), kv_reuse_groups=())
    params = init_params(cfg, jax.random.key(0))
    kernel = params["layers_1"]["mlp"]["up_proj"]["kernel"]
    params["layers_1"]["mlp"]["up_proj"]["kernel"] = kernel[:, :-1]
    with pytest.raises(ScopeParamShapeError, match=r"\"kernel\" in \"\S*mlp/up_proj\".*\(64, 95\)"):
        HymbaForCausalLM(cfg).apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    stacked = init_params(cfg, jax.random.key(0), stacked=True)        # the training layout: the stack named
    stacked["layers"]["mlp"]["up_proj"]["kernel"] = stacked["layers"]["mlp"]["up_proj"]["kernel"][:, :, :-1]
    with pytest.raises(ScopeParamShapeError, match=r"\"kernel\" in \"/layers/mlp/up_proj\".*\(2, 64, 95\)"):
        HymbaForCausalLM(cfg).apply({"params": stacked}, jnp.zeros((1, 8), jnp.int32))
