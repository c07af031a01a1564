"""Every config file loads, validates and describes the intended model."""

from __future__ import annotations

import importlib.util

import pytest

from hymba_jax.config import hymba_125m, hymba_350m, hymba_1p5b
from hymba_jax.train.config import model_config, validate_config

from train_testing import REPO


def load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name, preset", [("hymba_125m", hymba_125m), ("hymba_350m", hymba_350m),
                                          ("hymba_1p5b", hymba_1p5b)])
def test_paper_configs_use_the_paper_recipe(name, preset):
    config = load(name)
    validate_config(config, num_devices=8)
    model = model_config(config, 32001)
    assert model == preset(vocab_size=32001, dtype="bfloat16", remat=model.remat)
    assert (config.seq_len, config.optimizer.schedule, model.param_dtype) == (2048, "wsd", "float32")


def test_tiny_config_is_a_small_hybrid():
    config = load("tiny")
    validate_config(config, num_devices=1)
    model = model_config(config, 2048)
    assert model.layer_kind == "hybrid" and model.num_meta_tokens > 0 and model.kv_reuse_groups
    assert model.sliding_window < config.seq_len and model.global_layers
    assert config.data.source == "default"


def test_sft_configs_fine_tune_on_conversations():
    config = load("sft")
    validate_config(config, num_devices=8)
    assert model_config(config, 32001) == hymba_1p5b(vocab_size=32001, dtype="bfloat16", remat="auto")
    assert (config.data.format, config.data.source) == ("chat", "files")
    opt = config.optimizer
    assert opt.learning_rate <= 2e-5 and opt.warmup_steps <= 0.05 * config.num_steps and opt.min_lr_ratio == 0
    tiny = load("tiny_sft")
    validate_config(tiny, num_devices=1)
    assert (tiny.data.format, tiny.data.source, tiny.init_from_hf) == ("chat", "tasks", "")
