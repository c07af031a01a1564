"""The training program's ml_collections config: building blocks for `configs/*.py` and validation.

A config names a model preset and overrides any HymbaConfig field (`config.model.<field>`, None = the
preset's value). `validate_config` checks every value before anything is traced or compiled and raises
`TrainConfigError` naming the key (`optimizer.warmup_steps`, `model.num_heads`, `data.source`, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from ml_collections import config_dict

from hymba_jax import compilation_cache
from hymba_jax.config import PRESETS, ConfigError, HymbaConfig, get_preset
from hymba_jax.hf import load_hf_config
from hymba_jax.data.config import DataConfigError, default_data_config, validate_data_config
from hymba_jax.parallel import DEFAULT_AXIS_RULES, MeshError, check_rules, resolve_mesh_shape

SCHEDULES = ("cosine", "wsd")


class TrainConfigError(ValueError):
    """A training setting that cannot work (the message names the key)."""


def model_config_dict(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`config.model`: the preset name and one typed slot per HymbaConfig field (None = preset value)."""
    model = ml_collections.ConfigDict()
    model.preset = preset
    for field in dataclasses.fields(HymbaConfig):
        model[field.name] = config_dict.placeholder(type(field.default))
    model.update(overrides)
    return model


def base_config() -> ml_collections.ConfigDict:
    """Every key of the training program with a neutral default; `configs/*.py` start from this."""
    c = ml_collections.ConfigDict()
    c.model = model_config_dict("hymba_tiny")
    c.data = default_data_config()
    c.seed = 0
    c.seq_len = 256               # tokens per packed row
    c.batch_size = 16             # rows per optimizer step, summed over all hosts
    c.grad_accum_steps = 1        # microbatches per optimizer step (batch_size / grad_accum_steps each)
    c.num_steps = 1000
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,       # peak
        schedule="cosine",        # 'cosine': warmup + cosine; 'wsd': warmup, stable, linear decay
        warmup_steps=100,
        decay_fraction=0.2,       # wsd: the last fraction of steps decays to min_lr_ratio * peak
        min_lr_ratio=0.1,
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.1,         # not applied to norms, biases, meta tokens, A_log and D
        grad_clip_norm=1.0,       # global-norm clipping; 0 disables
    ))
    c.z_loss = 0.0                # coefficient of mean(logsumexp(logits)^2); 0 disables
    c.max_consecutive_skips = 10  # steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run
    c.log_every = 10              # and the first step of every run
    c.profile_steps = 0           # trace this many steps (after the first) into <workdir>/tensorboard; 0: off
    c.eval_every = 200            # validation loss every this many steps (and at the end); 0: only the end
    c.eval_batches = 8            # validation batches per evaluation; -1: the whole held-out split
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.init_from_hf = ""           # a Hugging Face checkpoint directory to start from (config.json inside)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))      # inside a slice (ICI)
    c.dcn_mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))   # across slices (docs/sharding.md)
    c.axis_rules = DEFAULT_AXIS_RULES
    c.peak_flops_per_device = 0.0  # for MFU; 0 = look the device up in train.metrics.PEAK_FLOPS
    c.compilation_cache_dir = compilation_cache.DEFAULT_DIR   # compiled programs kept across runs; '' = off
    return c


NUMERIC_FIELDS = ("dtype", "param_dtype", "scan_backend", "attention_backend", "remat", "scan_layers",
                  "one_layer_body")


def paper_recipe(preset: str, *, remat: str, batch_size: int, num_steps: int,
                 learning_rate: float) -> ml_collections.ConfigDict:
    """The paper's recipe for a paper-size preset: 2k-token sequences, a warmup-stable-decay schedule,
    bf16 compute with fp32 weights, FSDP over all devices. Batch, learning rate and step count are our
    defaults (the paper does not publish them); scale num_steps to your token budget (the WSD decay is
    always the last decay_fraction of the steps)."""
    c = base_config()
    c.model = model_config_dict(preset, dtype="bfloat16", param_dtype="float32", remat=remat)
    c.seq_len = 2048
    c.batch_size = batch_size
    c.grad_accum_steps = 1
    c.num_steps = num_steps
    c.optimizer.schedule = "wsd"
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = 2000
    c.optimizer.decay_fraction = 0.2
    c.optimizer.min_lr_ratio = 0.01
    c.optimizer.weight_decay = 0.1
    c.z_loss = 1e-4
    c.log_every = 20
    c.eval_every = 1000
    c.eval_batches = 50
    c.checkpoint_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> HymbaConfig:
    """The HymbaConfig of a training config. `vocab_size` is the tokenizer's: it is the model's unless
    `model.vocab_size` is set (which must then hold every token id)."""
    fields = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    try:
        if config.init_from_hf:
            layout = sorted(set(fields) - set(NUMERIC_FIELDS))
            if layout:
                raise TrainConfigError(
                    f"model.{layout[0]}: with init_from_hf the model's shape comes from the checkpoint's "
                    f"config.json; only {NUMERIC_FIELDS} may be overridden")
            cfg = load_hf_config(f"{config.init_from_hf}/config.json", **fields)
        else:
            fields.setdefault("vocab_size", vocab_size)
            cfg = get_preset(config.model.preset, **fields)
    except ConfigError as e:
        raise TrainConfigError(f"model: {e}".replace("HymbaConfig.", "model.")) from None
    except TypeError as e:
        raise TrainConfigError(f"model: {e}") from None
    if cfg.vocab_size < vocab_size:
        raise TrainConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size} "
                               "pieces; leave it unset to use the tokenizer's size")
    return cfg


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises TrainConfigError naming the first key that cannot work, before any data, tokenizer or
    compilation work. `num_devices` also checks the mesh shape."""
    expected = base_config()
    unknown = sorted(set(config.keys()) - set(expected.keys()))
    if unknown:
        raise TrainConfigError(f"{unknown[0]}: unknown config key; the keys are {sorted(expected.keys())}")
    for group in ("optimizer", "mesh", "dcn_mesh"):
        extra = sorted(set(config[group].keys()) - set(expected[group].keys()))
        if extra:
            raise TrainConfigError(f"{group}.{extra[0]}: unknown key; expected {sorted(expected[group].keys())}")
    extra = sorted(set(config.model.keys()) - set(expected.model.keys()))
    if extra:
        raise TrainConfigError(f"model.{extra[0]}: not a HymbaConfig field")
    if config.model.preset not in PRESETS and not config.init_from_hf:
        raise TrainConfigError(f"model.preset={config.model.preset!r}: choose one of {sorted(PRESETS)}")

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise TrainConfigError(f"{key}={_get(config, key)!r}: {msg}")

    need(config.seq_len > 0, "seq_len", "must be positive")
    need(config.num_steps > 0, "num_steps", "must be positive")
    need(config.grad_accum_steps >= 1, "grad_accum_steps", "must be at least 1")
    need(config.batch_size > 0 and config.batch_size % config.grad_accum_steps == 0, "batch_size",
         f"must be a positive multiple of grad_accum_steps ({config.grad_accum_steps})")
    opt = config.optimizer
    need(opt.learning_rate > 0, "optimizer.learning_rate", "must be positive")
    need(opt.schedule in SCHEDULES, "optimizer.schedule", f"expected one of {SCHEDULES}")
    need(0 <= opt.warmup_steps < config.num_steps, "optimizer.warmup_steps",
         f"must lie in [0, num_steps={config.num_steps})")
    need(0 < opt.decay_fraction <= 1, "optimizer.decay_fraction", "must lie in (0, 1]")
    if opt.schedule == "wsd":
        decay = int(round(opt.decay_fraction * config.num_steps))
        need(opt.warmup_steps + decay <= config.num_steps, "optimizer.decay_fraction",
             f"warmup ({opt.warmup_steps}) + decay ({decay}) steps exceed num_steps ({config.num_steps})")
    need(0 <= opt.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must lie in [0, 1]")
    need(0 <= opt.b1 < 1, "optimizer.b1", "must lie in [0, 1)")
    need(0 <= opt.b2 < 1, "optimizer.b2", "must lie in [0, 1)")
    need(opt.eps > 0, "optimizer.eps", "must be positive")
    need(opt.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    need(opt.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0 (0 disables clipping)")
    need(config.z_loss >= 0, "z_loss", "must be >= 0")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "max_consecutive_skips"):
        need(config[key] >= 1, key, "must be at least 1")
    need(config.eval_every >= 0, "eval_every", "must be >= 0 (0: evaluate only at the end)")
    need(config.profile_steps >= 0, "profile_steps", "must be >= 0 (0: no profile)")
    need(config.eval_batches == -1 or config.eval_batches >= 1, "eval_batches", "must be >= 1 or -1 (all)")
    need(config.peak_flops_per_device >= 0, "peak_flops_per_device", "must be >= 0 (0: look up the device)")
    try:
        check_rules(config.axis_rules)
        if num_devices is not None and all(v == 1 for v in config.dcn_mesh.values()):
            resolve_mesh_shape(dict(config.mesh), num_devices)   # multi-slice meshes: checked by make_mesh
    except MeshError as e:
        raise TrainConfigError(str(e)) from None
    try:
        validate_data_config(config.data)
    except DataConfigError as e:
        raise TrainConfigError(str(e)) from None
    cfg = model_config(config, vocab_size=1)  # the model's fields; the vocabulary is checked once it is known
    limit = cfg.max_position_embeddings - cfg.num_meta_tokens   # the meta tokens take the first positions
    need(config.seq_len <= limit, "seq_len",
         f"must be at most the model's {limit} text positions (max_position_embeddings "
         f"{cfg.max_position_embeddings} - {cfg.num_meta_tokens} meta tokens); raise model.max_position_embeddings "
         "or shorten seq_len")


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config
