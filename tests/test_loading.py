"""hymba_jax.loading: the one model and tokenizer loader every program uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hymba_jax.downstream import AsciiTokenizer
from hymba_jax.hf import load_hf_checkpoint, save_hf_checkpoint
from hymba_jax.loading import load_model, load_tokenizer
from hymba_jax.parallel import make_mesh


def _dtypes(params) -> tuple[str, str, str]:
    """The dtypes of the embedding, a layer's A_log and its D."""
    ssm = params["layers_0"]["ssm"]
    return params["embedding"].dtype.name, ssm["A_log"].dtype.name, ssm["D"].dtype.name


def test_hf_source_keeps_fp32_weights_and_computes_in_dtype(tiny_a_dir, tiny_a):
    """Evaluation's default: the checkpoint's values exactly, in fp32, whatever the compute dtype; the same
    tree as load_hf_checkpoint."""
    config, params = load_model(str(tiny_a_dir), "bfloat16", scan_backend="sequential")
    fixture_config, fixture_params = tiny_a
    assert config == fixture_config.replace(dtype="bfloat16", scan_backend="sequential")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, fixture_params)
    assert load_model(str(tiny_a_dir))[0].dtype == "float32"


def test_param_dtype_casts_all_but_a_log(tiny_a_dir):
    config, params = load_model(str(tiny_a_dir), "bfloat16", param_dtype="bfloat16")
    assert (config.dtype, config.param_dtype) == ("bfloat16", "bfloat16")
    assert _dtypes(params) == ("bfloat16", "float32", "bfloat16")


def test_preset_source_is_random_weights_of_the_preset():
    config, params = load_model("preset:hymba_tiny", param_dtype="bfloat16", seed=1)
    assert (config.hidden_size, config.dtype, config.param_dtype, config.remat) == (64, "float32", "bfloat16", "none")
    assert _dtypes(params) == ("bfloat16", "float32", "bfloat16")


def test_mesh_places_every_parameter(tiny_a_dir):
    mesh = make_mesh({"data": -1})
    _, params = load_model(str(tiny_a_dir), mesh=mesh)
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
               for x in jax.tree_util.tree_leaves(params))


def test_unknown_source_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory; pass a Hugging Face checkpoint directory"):
        load_model(str(tmp_path / "nowhere"))


def test_tokenizer_of_a_source(tmp_path, tiny_a_dir, tiny_a):
    """'ascii'; a .model path; '' the checkpoint's own tokenizer.model (here one an export carried);
    a source without one, a missing file and a preset are errors that say what to pass."""
    import sentencepiece as spm

    assert isinstance(load_tokenizer(str(tiny_a_dir), "ascii"), AsciiTokenizer)
    with pytest.raises(ValueError, match="has none .* pass tokenizer="):
        load_tokenizer(str(tiny_a_dir))
    with pytest.raises(ValueError, match="has none"):
        load_tokenizer("preset:hymba_tiny")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(str(tiny_a_dir), str(tmp_path / "missing.model"))

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"line {i} of some text to learn from" for i in range(200)]),
        model_prefix=str(tmp_path / "sp"), vocab_size=100, model_type="char", unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, minloglevel=2, hard_vocab_limit=False)
    config, params = tiny_a
    save_hf_checkpoint(tmp_path / "export", config, params, dtype=jnp.float32, tokenizer=tmp_path / "sp.model")
    own = load_tokenizer(str(tmp_path / "export"))
    given = load_tokenizer("preset:hymba_tiny", str(tmp_path / "sp.model"))
    assert own.encode("some text") == given.encode("some text") and own.decode(own.encode("line 7")) == "line 7"
    assert load_hf_checkpoint(tmp_path / "export")[0] == config


READ_WORKDIR = """
import json, sys
from hymba_jax.loading import load_model
config, params = load_model(sys.argv[1])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("optax", "grain", "tensorflow_datasets")
               or m.startswith("hymba_jax.train") or m == "hymba_jax.data.pipeline")
print(json.dumps({"layers": config.num_layers, "heavy": heavy}))
"""


def test_reading_a_workdir_imports_no_training_code(tmp_path):
    """Evaluation and generation read a training workdir's parameters through `hymba_jax.checkpoint`, without
    the optimizer, the data pipeline or the training package (a fresh process, the vendored workdir)."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    workdir = shutil.copytree(Path(__file__).parent / "fixtures" / "workdir-7c3dc59", tmp_path / "workdir")
    done = subprocess.run([sys.executable, "-c", READ_WORKDIR, str(workdir)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["layers"] > 0 and result["heavy"] == []
