"""In-process tests of the training components: optimizer mask and schedules, train step (gradient
accumulation, bf16 vs fp32), checkpoints (corruption fallback, restore_params), metrics, config errors."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hymba_jax.config import hymba_tiny
from hymba_jax.data import Tokenizer, make_dataset
from hymba_jax.model.lm import HymbaForCausalLM, param_shapes, unstack_layers
from hymba_jax.parallel import make_mesh, shard_batch
from hymba_jax.train import metrics
from hymba_jax.checkpoint import Checkpointer, CheckpointRestoreWarning, restore_params
from hymba_jax.train.config import TrainConfigError, base_config, model_config, validate_config
from hymba_jax.train.optimizer import decay_mask, make_optimizer, make_schedule
from hymba_jax.train.program import build_train_program

from train_testing import REPO, apply_overrides, small_overrides, write_small_corpus

sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("train_corpus")
    text, model = write_small_corpus(directory)
    return text, model, directory / "cache"


@pytest.fixture(scope="module")
def small_config(corpus):
    from configs.tiny import get_config

    return apply_overrides(get_config(), small_overrides(*corpus))


@pytest.fixture(scope="module")
def batches(small_config, corpus):
    """Three real packed batches (4 x 32) of the small corpus."""
    it = iter(make_dataset(small_config.data, Tokenizer.from_file(corpus[1]), split="train",
                           global_batch_size=4, seq_len=32, seed=0))
    return [next(it) for _ in range(3)]


class Setup:
    """A config's model (vocab 512) on one mesh: one initial state, step functions built once."""

    def __init__(self, config):
        self.config = config
        self.mesh = make_mesh({"data": -1})
        self.model_cfg = model_config(config, 512)
        self.program = build_train_program(config, self.model_cfg, self.mesh)
        self.shardings, self.batch_sharding = self.program.state_shardings, self.program.batch_sharding
        self.initial = jax.device_get(self.program.init_state(jax.random.key(0)))
        self._steps = {}

    def state(self):
        """A fresh device copy of the initial state (steps donate their input)."""
        return jax.device_put(self.initial, self.shardings)

    def step(self, grad_accum_steps: int = 1, dtype: str = "float32"):
        key = (grad_accum_steps, dtype)
        if key not in self._steps:
            program = dataclasses.replace(self.program, grad_accum_steps=grad_accum_steps)
            self._steps[key] = program.train_step(self.model_cfg.replace(dtype=dtype))
        return self._steps[key]

    def run(self, batch, **kw):
        return self.step(**kw)(self.state(), shard_batch(batch, self.batch_sharding))


@pytest.fixture(scope="module")
def small(small_config):
    """The 2-layer test model (compiles fastest) with the small test corpus."""
    return Setup(small_config)


@pytest.fixture(scope="module")
def tiny(small_config):
    """configs/tiny.py's model with the small test corpus (4 rows of 32 tokens)."""
    from configs.tiny import get_config

    config = get_config()
    config.data = small_config.data
    config.seq_len, config.batch_size = 32, 4
    return Setup(config)


# ------------------------------------------------------------------------------------------------------
# Optimizer

def test_weight_decay_mask_covers_exactly_matrices_and_embeddings():
    params = param_shapes(hymba_tiny())
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    decayed = {name.split("/")[-1] for name, v in flat.items() if v}
    kept = {name.split("/")[-1] for name, v in flat.items() if not v}
    assert decayed == {"kernel", "embedding", "conv_weight"}
    assert kept == {"scale", "conv_bias", "dt_bias", "meta_tokens", "A_log", "D"}
    # Every norm scale (input, mlp, attention/SSM output, dt/B/C, final) is excluded.
    assert all(not v for name, v in flat.items() if name.endswith("scale"))
    assert sum(1 for name in flat if name.endswith("scale")) == 7 * 7 + 1


def test_weight_decay_applies_only_to_masked_params():
    config = base_config()
    config.num_steps, config.optimizer.warmup_steps, config.optimizer.learning_rate = 10, 0, 0.1
    config.optimizer.weight_decay, config.optimizer.grad_clip_norm = 0.5, 0.0
    tx = make_optimizer(config)
    params = {"layer": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones(2)}, "A_log": jnp.ones(3)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # Zero gradient: only decoupled decay moves the parameter, by -lr * wd * p at step 0 (lr(0) = peak).
    np.testing.assert_allclose(updates["layer"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["layer"]["scale"], 0)
    np.testing.assert_array_equal(updates["A_log"], 0)


def test_schedules():
    config = base_config()
    config.num_steps, config.optimizer.learning_rate, config.optimizer.warmup_steps = 100, 1.0, 10
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.schedule, config.optimizer.decay_fraction = "wsd", 0.2
    wsd = make_schedule(config)
    expected = {0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 100: 0.1}
    np.testing.assert_allclose([float(wsd(s)) for s in expected], list(expected.values()), atol=1e-6)
    config.optimizer.schedule = "cosine"
    cosine = make_schedule(config)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90))
    np.testing.assert_allclose([float(cosine(s)) for s in (5, 10, 55, 100)], [0.5, 1.0, mid, 0.1], atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Train step

def test_gradient_accumulation_matches_full_batch(small, batches):
    """grad_accum 2 and 1 take the same optimizer step: same loss, grad norm and parameters; the loss is
    the token-weighted CE computed independently from the model's logits."""
    model = HymbaForCausalLM(small.model_cfg)
    batch = batches[0]
    logits = jax.jit(model.apply)({"params": small.initial.params}, batch["inputs"], segment_ids=batch["segment_ids"])
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    expected = (nll * batch["weights"]).sum() / batch["weights"].sum()
    (s1, m1), (s2, m2) = (jax.device_get(small.run(batch, grad_accum_steps=a)) for a in (1, 2))
    assert float(m1["loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    assert float(m1["tokens"]) == batch["weights"].sum()
    assert int(s1.step) == int(s2.step) == 1
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_compute_matches_fp32_loss(tiny, batches):
    """One step of the tiny config's model, bf16 compute (fp32 master weights) vs fp32 compute.

    Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%). The loss at init is about
    ln(vocab) = 7.6 and averages about a thousand token losses whose rounding errors are independent, so
    the mean moves far less than 0.2% per token; we allow 0.5% relative (0.04 nats), which still catches
    any real numerics bug (a mis-cast, a bf16 softmax or a wrong reduction moves it by whole units or
    tens of percent). The measured difference is printed on failure.
    """
    losses = {}
    for dtype in ("float32", "bfloat16"):
        state, m = tiny.run(batches[1], dtype=dtype)
        losses[dtype] = float(m["loss"])
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
    assert losses["float32"] == pytest.approx(math.log(512), abs=0.5)
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=5e-3), losses
    assert losses["bfloat16"] != losses["float32"]   # bf16 was really used


# ------------------------------------------------------------------------------------------------------
# Checkpoints

def test_corrupted_latest_checkpoint_falls_back_with_warning(tmp_path, small, corpus):
    """Step 2's parameter files are truncated: restore warns, moves step 2 aside, and returns step 1 with
    its parameters and data position; training then saves step 2 again; restore_params reads it."""
    step = small.step()
    data = make_dataset(small.config.data, Tokenizer.from_file(corpus[1]), split="train", global_batch_size=4,
                        seq_len=32, seed=0)
    stream = [b["inputs"] for _, b in zip(range(3), iter(data))]
    it, state = iter(data), small.state()
    ckpt = Checkpointer(tmp_path, keep=3)
    for _ in range(2):
        state, _ = step(state, shard_batch(next(it), small.batch_sharding))
        ckpt.save(state, it, small.config, small.model_cfg)
        ckpt.wait()
        if int(state.step) == 1:
            step1_params = jax.device_get(state.params)
    ckpt.close()
    damaged = [p for p in (tmp_path / "checkpoints" / "2" / "params").rglob("*") if p.is_file() and p.stat().st_size]
    assert damaged
    for p in damaged:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    fresh = iter(data)
    ckpt = Checkpointer(tmp_path, keep=3)
    with pytest.warns(CheckpointRestoreWarning, match="step 2"):
        restored = ckpt.restore_latest(small.shardings, jax.eval_shape(lambda: state), fresh)
    assert int(restored.step) == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(step1_params)):
        np.testing.assert_array_equal(a, b)
    second = next(fresh)                        # the data position is step 1's: the stream's 2nd batch
    np.testing.assert_array_equal(second["inputs"], stream[1])
    assert (tmp_path / "checkpoints" / "2.corrupt-0").is_dir()
    assert ckpt.manager.all_steps() == [1]
    restored, _ = step(restored, shard_batch(second, small.batch_sharding))
    ckpt.save(restored, fresh, small.config, small.model_cfg)
    ckpt.wait()
    assert ckpt.manager.all_steps() == [1, 2]
    ckpt.close()

    model_loaded, params = restore_params(tmp_path)
    assert model_loaded == small.model_cfg
    per_layer = unstack_layers(restored.params, small.model_cfg)     # the state's layout, the model's
    for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(per_layer))):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------------
# Metrics

def test_flops_per_token_formula():
    cfg = hymba_tiny(vocab_size=100)
    n = metrics.param_count(cfg)
    assert n == sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg))) > 40_000
    length = 32
    per_layer = 6 * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    global_keys = cfg.num_meta_tokens + (length + 1) / 2
    # Window 8: query t sees min(t + 1, 9) text keys -> (1 + 2 + ... + 9 + 23 * 9) / 32.
    local_keys = cfg.num_meta_tokens + (45 + 23 * 9) / 32
    expected = 6 * n + per_layer * (3 * global_keys + 4 * local_keys)
    assert metrics.flops_per_token(cfg, length) == pytest.approx(expected, rel=1e-12)


def test_metrics_logger_writes_jsonl_tensorboard_and_truncates_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = metrics.MetricsLogger(tmp_path, 0, 10, enabled=True)
    for s in (1, 2, 3):
        logger.write("train", s, {"loss": 5.0 - s, "mfu": None})
    logger.write("eval", 3, {"loss": 1.5})
    logger.close()
    logger = metrics.MetricsLogger(tmp_path, 2, 10, enabled=True)   # resumed from step 2
    logger.write("train", 3, {"loss": 1.25})
    logger.close()
    records = metrics.read_metrics(tmp_path / metrics.METRICS_FILE)
    assert [(r["kind"], r["step"], r["loss"]) for r in records] == [
        ("train", 1, 4.0), ("train", 2, 3.0), ("train", 3, 1.25)]
    events = EventAccumulator(str(tmp_path / metrics.TENSORBOARD_DIR))
    events.Reload()
    assert "train/loss" in events.Tags()["tensors"]
    assert metrics.plot_loss_curve(tmp_path).stat().st_size > 1000


# ------------------------------------------------------------------------------------------------------
# Config errors

@pytest.mark.parametrize("key, value, match", [
    ("optimizer.schedule", "linear", "optimizer.schedule"),
    ("optimizer.warmup_steps", 5000, "optimizer.warmup_steps"),
    ("batch_size", 3, "batch_size"),
    ("model.num_kv_heads", 3, "model.num_kv_heads"),
    ("model.remat", "half", "model.remat"),
    ("model.preset", "hymba_9b", "model.preset"),
    ("data.source", "web", "data.source"),
    ("mesh.tensor", 0, "mesh.tensor"),
    ("seq_len", 1020, "seq_len=1020: must be at most the model's 1016 text positions"),
    ("max_consecutive_skips", 0, "max_consecutive_skips"),
])
def test_invalid_values_name_the_key(key, value, match):
    from configs.tiny import get_config

    config = get_config()
    if key == "batch_size":
        config.grad_accum_steps = 2
    apply_overrides(config, {key: value})
    with pytest.raises(TrainConfigError, match=match.replace(".", r"\.")):
        validate_config(config, num_devices=1)


def test_unknown_keys_name_the_key():
    config = base_config()
    config.unlock()
    config.optimizer.warmup = 3
    with pytest.raises(TrainConfigError, match=r"optimizer\.warmup"):
        validate_config(config)


def test_command_line_errors_before_compiling(tmp_path):
    """Unknown override keys (with the closest keys) and invalid values stop train.py at once, in one
    message and no traceback."""
    explicit = ["--config", str(REPO / "configs" / "tiny.py")]   # overrides then fail at parsing, not definition
    for flags, expected in (
            (["--config.optimizer.warmup_stepz=3"], "did you mean --config.optimizer.warmup_steps?"),
            ([*explicit, "--config.optimizer.warmup_stepz=3"], "did you mean --config.optimizer.warmup_steps?"),
            (["--config.lerning_rate=1"], "did you mean --config.optimizer.learning_rate?"),
            (["--config.model.num_heads=5"], "model.num_kv_heads")):
        result = subprocess.run([sys.executable, str(REPO / "train.py"), "--workdir", str(tmp_path), *flags],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        assert result.returncode != 0
        assert expected in result.stderr + result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "checkpoints").exists()


def test_validation_pads_a_process_that_runs_out_of_batches(monkeypatch):
    """Processes may hold different numbers of held-out batches: this one has 3, another (simulated) 5.
    All processes run 5 steps (every collective entered by all); this one's last 2 carry weight 0, so its
    sums are those of its 3 real batches, and with equal counts nothing is padded."""
    from hymba_jax.parallel import DEFAULT_AXIS_RULES, batch_sharding, make_mesh
    from hymba_jax.train import validation

    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.integers(0, 9, (2, 4)).astype(np.int32), "targets": np.ones((2, 4), np.int32),
                "segment_ids": np.ones((2, 4), np.int32), "weights": rng.random((2, 4)).astype(np.float32)}
               for _ in range(3)]
    calls = []

    def eval_step(params, batch):
        calls.append(batch)
        w = batch["weights"]
        return jnp.stack([jnp.sum(w * batch["inputs"]), jnp.sum(w)])

    step = iter(range(100))

    def other_process_has_5(has_batch):
        other_has_batch = next(step) < 5          # every process asks once per step
        return has_batch or other_has_batch

    monkeypatch.setattr(validation, "hosts_still_reading", other_process_has_5)
    sharding = batch_sharding(make_mesh({"data": 1}), DEFAULT_AXIS_RULES)
    ce, weight = validation.loss_sums(eval_step, None, batches, sharding, progress=False)
    assert len(calls) == 5 and all(float(jnp.sum(c["weights"])) == 0 for c in calls[3:])
    np.testing.assert_allclose(ce, sum(float(np.sum(b["weights"] * b["inputs"])) for b in batches), rtol=1e-6)
    np.testing.assert_allclose(weight, sum(float(np.sum(b["weights"])) for b in batches), rtol=1e-6)

    monkeypatch.setattr(validation, "hosts_still_reading", lambda has_batch: has_batch)
    calls.clear()
    assert validation.loss_sums(eval_step, None, batches, sharding, max_batches=2, progress=False)[1] == \
        pytest.approx(sum(float(np.sum(b["weights"])) for b in batches[:2]))
    assert len(calls) == 2
