"""Checkpoint conversion: the released layout, the fixtures, round trips and refusals."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hymba_jax import HymbaForCausalLM, param_shapes
from hymba_jax.config import ConfigError, hymba_1p5b, hymba_tiny, llama_style
from hymba_jax.hf import (CheckpointError, from_hf_config, hf_tensor_shapes, load_hf_checkpoint, save_hf_checkpoint,
                          to_hf_config)
from conftest import RELEASED_1P5B, random_params


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
    listing = (RELEASED_1P5B / "state_dict.txt").read_text().splitlines()
    released = {}
    for line in listing:
        if line.startswith("#") or not line.strip():
            continue
        name, shape, _ = line.split()
        released[name] = tuple(int(d) for d in shape.strip("()").split(",") if d)
    assert hf_tensor_shapes(config) == released


def test_1p5b_preset_equals_released_config():
    """Both ways: the released config.json reads as the preset, and the preset exports as exactly that file
    (every key, equal values, nothing more), auto_map and attn_implementation_new included."""
    released = json.loads((RELEASED_1P5B / "config.json").read_text())
    assert from_hf_config(released) == hymba_1p5b()
    assert to_hf_config(hymba_1p5b(), jnp.bfloat16) == released


def test_bad_hf_config_fields_are_named():
    base = to_hf_config(hymba_tiny())
    with pytest.raises(ConfigError, match="required field 'hidden_size'"):
        from_hf_config({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="layer_type"):
        from_hf_config({**base, "layer_type": ["a"] * 7})
    assert from_hf_config({**base, "conv_dim": {"0": "128"}}) == hymba_tiny()


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
    loaded_config, loaded = load_hf_checkpoint(tmp_path / "ckpt", dtype)
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


def test_load_dtype_is_the_parameters_and_overrides_set_other_fields(tiny_a_dir):
    config, params = load_hf_checkpoint(tiny_a_dir, jnp.bfloat16, remat="full")
    assert (config.param_dtype, config.dtype, config.remat) == ("bfloat16", "float32", "full")
    assert params["embedding"].dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="pass the parameters' dtype as `dtype`"):
        load_hf_checkpoint(tiny_a_dir, param_dtype="bfloat16")


# --------------------------------------------------------------------------------------------------
# Exports the released code loads as they are

def test_export_writes_the_released_config_and_generation_config(tmp_path, tiny_a):
    config, params = tiny_a
    save_hf_checkpoint(tmp_path / "out", config, params, dtype=jnp.float32)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == to_hf_config(config, jnp.float32)
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_hymba.HymbaForCausalLM"
    assert written["attn_implementation_new"] == "flex"
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 0)
    assert load_hf_checkpoint(tmp_path / "out")[0] == config


def test_export_into_a_checkpoint_directory_keeps_what_it_does_not_write(tmp_path, tiny_a_dir, tiny_a):
    """Exporting over a released checkpoint keeps its other config.json and generation_config.json fields,
    its tokenizer files and its code files; only the fields and files an export writes change."""
    config, params = tiny_a
    path = tmp_path / "released"
    shutil.copytree(tiny_a_dir, path)
    released = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**released, "quantization_note": "kept", "seq_length": 256}))
    (path / "generation_config.json").write_text(json.dumps({"max_length": 64, "bos_token_id": 7}))
    kept = {"tokenizer.model": b"sentencepiece bytes", "tokenizer_config.json": b'{"tokenizer_class": "X"}',
            "special_tokens_map.json": b"{}", "modeling_hymba.py": b"# released code"}
    for name, content in kept.items():
        (path / name).write_bytes(content)
    save_hf_checkpoint(path, config, params, dtype=jnp.bfloat16)
    written = json.loads((path / "config.json").read_text())
    assert written == {**released, **to_hf_config(config, jnp.bfloat16), "quantization_note": "kept"}
    assert json.loads((path / "generation_config.json").read_text())["max_length"] == 64
    assert json.loads((path / "generation_config.json").read_text())["bos_token_id"] == 1
    for name, content in kept.items():
        assert (path / name).read_bytes() == content, name
    assert load_hf_checkpoint(path)[0] == config


def _sentencepiece_without_pad(tmp_path):
    """A Llama-like SentencePiece model: 300 pieces, unk/bos/eos 0/1/2, no pad piece."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"line {i} of some text to learn from" for i in range(200)]),
        model_prefix=str(tmp_path / "llama_like"), vocab_size=300, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True, minloglevel=2)
    return tmp_path / "llama_like.model"


def test_export_carries_a_sentencepiece_tokenizer(tmp_path):
    """A .model file travels as tokenizer.model with a tokenizer_config.json like the released one (Hymba's
    [PAD] appended after the last piece); a directory's tokenizer files are copied as they are and replace
    the stale ones."""
    model_file = _sentencepiece_without_pad(tmp_path)
    config = hymba_tiny(vocab_size=301)
    params = random_params(config)
    save_hf_checkpoint(tmp_path / "out", config, params, tokenizer=model_file)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == model_file.read_bytes()
    tokenizer_config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer"
    assert (tokenizer_config["add_bos_token"], tokenizer_config["add_eos_token"]) == (True, False)
    assert [tokenizer_config[f"{k}_token"] for k in ("unk", "bos", "eos", "pad")] == ["<unk>", "<s>", "</s>", "[PAD]"]
    assert tokenizer_config["added_tokens_decoder"]["300"]["content"] == "[PAD]"

    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "tokenizer.json").write_text("{}")   # stale: from another tokenizer
    save_hf_checkpoint(tmp_path / "again", config, params, tokenizer=tmp_path / "out")
    assert not (tmp_path / "again" / "tokenizer.json").exists()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()

    with pytest.raises(ConfigError, match="301 ids do not fit the model's vocab_size 101"):
        save_hf_checkpoint(tmp_path / "small", hymba_tiny(), random_params(hymba_tiny()), tokenizer=model_file)
    (tmp_path / "no_tokenizer").mkdir()
    with pytest.raises(CheckpointError, match="holds neither tokenizer.model nor tokenizer.json"):
        save_hf_checkpoint(tmp_path / "none", config, params, tokenizer=tmp_path / "no_tokenizer")
    assert not (tmp_path / "small").exists() and not (tmp_path / "none").exists()


@pytest.mark.parametrize("config, reason", [
    (hymba_tiny(qk_head_dim=32), r"qk_head_dim=32: the released PyTorch code cannot build it: its query heads "
                                 r"are hidden_size / num_heads = 64 / 4 wide"),
    (hymba_tiny(hidden_size=196, num_heads=49, num_kv_heads=1, qk_head_dim=4, v_head_dim=8, d_inner=392),
     r"num_kv_heads=1: .* int\(num_kv_heads / num_heads \* hidden_size .*\) = \(3, 7\), not this model's \(4, 8\)"),
    (hymba_tiny(d_inner=96, v_head_dim=24), r"d_inner: an export writes mamba_expand = d_inner / hidden_size as a whole number, and 96 / 64"),
    (llama_style(64, 2, 4, 2, 128), r"layer_kind='attention'"),
], ids=["qk_head_dim", "kv_rows_rounding", "fractional_expand", "attention_only"])
def test_configs_the_released_code_cannot_build_are_refused_at_export(tmp_path, config, reason):
    with pytest.raises(ConfigError, match=reason):
        save_hf_checkpoint(tmp_path / "out", config, random_params(config))
    assert not (tmp_path / "out").exists()


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
from hymba_jax.model import param_shardings

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
