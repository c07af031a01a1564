"""A workdir written by an earlier version (commit 7c3dc59: per-layer stack, explicit kernel names, no
`scan_layers` field) restores and trains on with today's code (scanned layers, "auto" kernels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from hymba_jax.loading import load_model
from hymba_jax.model import HymbaForCausalLM, param_shapes
from hymba_jax.train.loop import train
from train_testing import apply_overrides, small_overrides, write_small_corpus

OLD_WORKDIR = Path(__file__).parent / "fixtures" / "workdir-7c3dc59"   # 2 steps of train_testing's small run


def test_old_checkpoint_loads_and_runs_scanned(tmp_path):
    workdir = tmp_path / "workdir"
    shutil.copytree(OLD_WORKDIR, workdir)
    config, params = load_model(str(workdir))
    assert config.scan_layers and config.scan_backend == "sequential"   # the new field's default; as trained
    assert jax.tree.structure(params) == jax.tree.structure(param_shapes(config))
    ids = np.arange(20, dtype=np.int32)[None] % config.vocab_size
    scanned = HymbaForCausalLM(config).apply({"params": params}, ids)
    looped = HymbaForCausalLM(config.replace(scan_layers=False)).apply({"params": params}, ids)
    np.testing.assert_allclose(scanned, looped, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(scanned)).all()


def test_old_workdir_resumes_training(tmp_path):
    from configs.tiny import get_config

    workdir = tmp_path / "workdir"
    shutil.copytree(OLD_WORKDIR, workdir)
    corpus, tokenizer = write_small_corpus(tmp_path / "corpus")
    overrides = small_overrides(corpus, tokenizer, tmp_path / "cache")
    overrides.update({"num_steps": 3, "checkpoint_every": 3, "eval_batches": 1, "optimizer.warmup_steps": 1})
    result = train(apply_overrides(get_config(), overrides), workdir)
    assert result["step"] == 3 and np.isfinite(result["val_loss"])
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [3]      # resumed at 2, not restarted
