"""Checkpoint conversion: the released layout, the fixtures, round trips and refusals."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hymba_jax import HymbaConfig, HymbaForCausalLM, param_shapes
from hymba_jax.config import ConfigError, hymba_1p5b
from hymba_jax.hf import CheckpointError, hf_tensor_shapes, load_hf_checkpoint, save_hf_checkpoint
from conftest import REFERENCE, require


@pytest.fixture(scope="module")
def tiny_forward(tiny_a, tiny_a_expected):
    config, params = tiny_a
    return jax.jit(lambda p, ids: HymbaForCausalLM(config).apply({"params": p}, ids, return_hidden_states=True))


def test_fixture_logits_and_hidden_states_match_released_model(tiny_a, tiny_a_expected, tiny_forward):
    _, params = tiny_a
    logits, hidden = tiny_forward(params, tiny_a_expected["input_ids"])
    assert logits.shape == tiny_a_expected["logits"].shape
    errors = {"logits": float(np.abs(logits - tiny_a_expected["logits"]).max())}
    for i, h in enumerate(hidden):
        errors[f"hidden_{i}"] = float(np.abs(h - tiny_a_expected[f"hidden_{i}"]).max())
    assert len(hidden) == 8
    print("max abs errors against the released fp32 fixture:", errors)
    assert max(errors.values()) < 1e-4, errors


def test_bf16_forward_stays_close_to_fp32(tiny_a, tiny_a_expected, tiny_forward):
    """bf16 compute (fp32 params): each matmul input is rounded to 8 mantissa bits (relative 2^-9), over
    7 layers; the logits' std is ~0.4. We require the bf16 logits within 0.1 absolute (max) and 0.02 (mean)
    of fp32 and the same top-1 token at >= 90% of positions; a wrong branch or mask is off by ~1."""
    config, params = tiny_a
    ids = tiny_a_expected["input_ids"]
    ref, _ = tiny_forward(params, ids)
    bf16 = jax.jit(HymbaForCausalLM(config.replace(dtype="bfloat16")).apply)({"params": params}, ids)
    assert bf16.dtype == jnp.float32
    err = np.abs(np.asarray(bf16) - np.asarray(ref))
    print(f"bf16 vs fp32 logits: max {err.max():.4f}, mean {err.mean():.5f}")
    assert err.max() < 0.1 and err.mean() < 0.02
    assert (np.argmax(bf16, -1) == np.argmax(ref, -1)).mean() >= 0.9


def test_1p5b_parameter_count_and_released_layout():
    config = hymba_1p5b()
    count = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(param_shapes(config)))
    assert count == 1_522_797_824
    listing = require(REFERENCE / "hymba-1.5b" / "state_dict.txt").read_text().splitlines()
    released = {}
    for line in listing:
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split()
        released[name] = tuple(int(d) for d in shape.strip("()").split(",") if d)
    assert hf_tensor_shapes(config) == released


def test_1p5b_preset_equals_released_config():
    released = json.loads(require(REFERENCE / "hymba-1.5b" / "config.json").read_text())
    assert HymbaConfig.from_hf_dict(released) == hymba_1p5b()
    exported = hymba_1p5b().to_hf_dict()
    used_fields = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "kq_head_dim", "v_head_dim", "intermediate_size", "mamba_expand", "mamba_d_state", "mamba_d_conv",
        "mamba_dt_rank", "mamba_inner_layernorms", "mamba_conv_bias", "mamba_proj_bias", "num_memory_tokens",
        "sliding_window", "global_attn_idx", "kv_reuse_group", "rope_type", "rope_theta",
        "max_position_embeddings", "orig_max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "layer_type", "num_experts", "num_mamba", "conv_dim",
        "architectures", "model_type", "kq_norm", "kv_weight_reuse", "memory_tokens_interspersed_every",
    ]
    for field in used_fields:
        assert exported[field] == released[field], field


def test_1p5b_ntk_rope_base():
    assert hymba_1p5b().rope_base == pytest.approx(74534.83031811893, rel=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_is_exact(tmp_path, tiny_a, dtype):
    """fp32 and bf16 parameters (A_log stays fp32) survive save + load bit for bit, untied head too."""
    fixture_config, fixture_params = tiny_a
    config = fixture_config.replace(tie_word_embeddings=False, param_dtype=jnp.dtype(dtype).name)
    head = np.random.default_rng(0).normal(size=(config.hidden_size, config.vocab_size))
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a if "A_log" in jax.tree_util.keystr(p) else a.astype(dtype),
        {**fixture_params, "lm_head": jnp.asarray(head, jnp.float32)})
    save_hf_checkpoint(tmp_path / "ckpt", config, params, dtype=dtype)
    stored = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert stored["model.layers.0.mamba.A_log.0"].dtype == np.float32
    assert stored["model.layers.0.mamba.D.0"].dtype == np.dtype(jnp.dtype(dtype))
    loaded_config, loaded = load_hf_checkpoint(tmp_path / "ckpt", dtype=dtype)
    assert loaded_config == config
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                                      np.asarray(b, np.float32)), params, loaded)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(loaded)


def test_fixture_export_reproduces_the_released_file(tmp_path, tiny_a_dir, tiny_a):
    config, params = tiny_a
    save_hf_checkpoint(tmp_path / "out", config, params, dtype=jnp.float32)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    released = load_file(tiny_a_dir / "model.safetensors")
    ours.pop("lm_head.weight")   # the tied copy, which the released state dict lists
    assert set(ours) == set(released)
    for name in released:
        np.testing.assert_array_equal(ours[name], released[name], err_msg=name)


def test_sharded_checkpoint_loads(tmp_path, tiny_a, tiny_a_expected):
    config, params = tiny_a
    save_hf_checkpoint(tmp_path / "sharded", config, params, dtype=jnp.float32, max_shard_bytes=100_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    _, loaded = load_hf_checkpoint(tmp_path / "sharded")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)


# --------------------------------------------------------------------------------------------------
# Refusals

@pytest.fixture
def broken(tmp_path, tiny_a_dir):
    """A writable copy of the tiny fixture and a function to rewrite its tensors."""
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_a_dir, path)

    def rewrite(change):
        tensors = load_file(path / "model.safetensors")
        change(tensors)
        save_file(tensors, path / "model.safetensors")
        return path
    return path, rewrite


def test_missing_tensor_is_named(broken):
    _, rewrite = broken
    path = rewrite(lambda t: t.pop("model.layers.3.mamba.D.0"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mamba\.D\.0 is missing.*\(128,\)"):
        load_hf_checkpoint(path)


def test_extra_tensor_is_named(broken):
    _, rewrite = broken
    path = rewrite(lambda t: t.update({"model.layers.9.extra": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.9\.extra"):
        load_hf_checkpoint(path)


def test_wrong_shape_is_named(broken):
    _, rewrite = broken
    path = rewrite(lambda t: t.update({"model.layers.1.mamba.in_proj.weight": np.zeros((10, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"in_proj\.weight has shape \(10, 64\), expected \(416, 64\)"):
        load_hf_checkpoint(path)


def test_consumer_with_kv_rows_is_refused(broken):
    """A consumer layer stores [q | x | z]; a checkpoint whose config lost the KV group is caught."""
    path, _ = broken
    cfg = json.loads((path / "config.json").read_text())
    cfg["kv_reuse_group"] = [[1, 2]]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.5\.mamba\.in_proj\.weight has shape"):
        load_hf_checkpoint(path)


def test_untied_head_mismatch_is_refused(broken):
    _, rewrite = broken
    path = rewrite(lambda t: t.update({"lm_head.weight": np.ones((101, 64), np.float32)}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_hf_checkpoint(path)


def test_tied_head_copy_is_accepted(broken):
    _, rewrite = broken
    path = rewrite(lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    load_hf_checkpoint(path)


def test_unknown_architecture_is_refused(broken):
    path, _ = broken
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="expected a Hymba checkpoint"):
        load_hf_checkpoint(path)


def test_unsupported_feature_is_refused(broken):
    path, _ = broken
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_experts=4 is not supported"):
        load_hf_checkpoint(path)


def test_nonfinite_tensor_is_refused_naming_file_and_tensor(broken):
    def poison(t):
        t["model.layers.3.mamba.D.0"] = t["model.layers.3.mamba.D.0"].copy()
        t["model.layers.3.mamba.D.0"][5] = np.nan
    path = broken[1](poison)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.3\.mamba\.D\.0 holds 1 "
                                              r"NaN or inf values"):
        load_hf_checkpoint(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_safetensors_is_named(broken, damage):
    path, _ = broken
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"not a safetensors file" * 10 if damage == "garbage" else data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: (cannot be read as safetensors|tensor .* cannot be "
                                              r"read)"):
        load_hf_checkpoint(path)


def test_missing_files_are_explained(tmp_path, broken):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf_checkpoint(tmp_path / "empty")
    path, _ = broken
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        load_hf_checkpoint(path)


SHARDED_LOAD = """
import json, sys
import jax, numpy as np
from hymba_jax.hf import load_hf_checkpoint
from hymba_jax.parallel import DEFAULT_AXIS_RULES, make_mesh
from hymba_jax.train.state import param_shardings

mesh = make_mesh({"data": 2, "fsdp": 4})
targets = lambda c: param_shardings(c, mesh, DEFAULT_AXIS_RULES)
config, params = load_hf_checkpoint(sys.argv[1], "bfloat16", shardings=targets)
_, reference = load_hf_checkpoint(sys.argv[1], "bfloat16")
leaves, split, split_targets = 0, 0, 0
for (path, got), want, sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                       jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(targets(config))):
    name = jax.tree_util.keystr(path)
    assert got.sharding.is_equivalent_to(sharding, got.ndim), name
    assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want)), name
    leaves += 1
    split += not got.sharding.is_fully_replicated
    split_targets += not sharding.is_fully_replicated
print(json.dumps({"leaves": leaves, "split": split, "split_targets": split_targets}))
"""


def test_sharded_load_places_every_tensor_on_its_shards(tiny_a_dir, tmp_path):
    """On 8 simulated devices (data 2 x fsdp 4), loading with `shardings` gives the same values and dtypes
    as a plain load, each parameter on the sharding the rules give it (the 69 of 153 with a sharded
    axis split, norms and SSM vectors replicated)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(tiny_a_dir)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["leaves"] == 153 and result["split"] == result["split_targets"] == 69, result
