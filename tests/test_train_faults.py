"""Faults in training, in process: the NaN/inf policy of the step and the loop, checkpoints that are
never written non-finite, verified at restore, refused rather than replaced, and write failures that
stop the run at once (docs/training.md, "Faults"). The tests that run `train` are marked slow."""

from __future__ import annotations

import errno
import os
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hymba_jax.data import Tokenizer, make_dataset
from hymba_jax.parallel import make_mesh, shard_batch
from hymba_jax.checkpoint import (Checkpointer, CheckpointError, CheckpointRestoreWarning, read_workdir_config,
                                        restore_params)
from hymba_jax.train.config import model_config
from hymba_jax.train.loop import TrainingError, train
from hymba_jax.train.metrics import METRICS_FILE, read_metrics
from hymba_jax.train.program import build_train_program

from train_testing import REPO, apply_overrides, small_overrides, write_small_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("faults_corpus")
    text, model = write_small_corpus(directory)
    return text, model, directory / "cache"


def small_config(corpus, **overrides):
    import sys

    sys.path.insert(0, str(REPO))
    from configs.tiny import get_config

    config = apply_overrides(get_config(), small_overrides(*corpus))
    return apply_overrides(config, {"eval_batches": 1, **overrides})


class Small:
    """The 2-layer test model: an initial state, its train step, and the data stream."""

    def __init__(self, corpus):
        self.config = small_config(corpus)
        self.mesh = make_mesh({"data": -1})
        self.model_cfg = model_config(self.config, 512)
        program = build_train_program(self.config, self.model_cfg, self.mesh)
        self.shardings, self.batch_sharding = program.state_shardings, program.batch_sharding
        self.initial = jax.device_get(program.init_state(jax.random.key(0)))
        self.step = program.train_step()
        self.data = make_dataset(self.config.data, Tokenizer.from_file(corpus[1]), split="train",
                                 global_batch_size=4, seq_len=32, seed=0)

    def state(self):
        return jax.device_put(self.initial, self.shardings)

    def shard(self, batch):
        return shard_batch(batch, self.batch_sharding)

    def saved_steps(self, workdir, steps):
        """Trains `steps` steps, saving each one in `workdir`; returns {step: host params}."""
        it, state, params = iter(self.data), self.state(), {}
        ckpt = Checkpointer(workdir, keep=5)
        for _ in range(steps):
            state, _ = self.step(state, self.shard(next(it)))
            ckpt.save(state, it, self.config, self.model_cfg)
            ckpt.wait()
            params[int(state.step)] = jax.device_get(state.params)
        ckpt.close()
        return params

    def restore(self, workdir, model_cfg=None):
        """restore_latest as the loop calls it, for this model or another `model_cfg`."""
        program = build_train_program(self.config, model_cfg or self.model_cfg, self.mesh)
        ckpt = Checkpointer(workdir)
        try:
            return ckpt.restore_latest(program.state_shardings, program.abstract_state(), iter(self.data),
                                       model_config=program.model_config)
        finally:
            ckpt.close()


@pytest.fixture(scope="module")
def small(corpus):
    return Small(corpus)


def _listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _assert_equal_trees(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------------
# The NaN/inf policy

def test_nonfinite_step_is_skipped_with_the_state_unchanged(small):
    """A NaN in the batch's weights makes the loss NaN: the step counts it as skipped, the parameters and
    optimizer state come back bit for bit, only the step counter advances; the next good batch trains
    exactly as if the bad one had never been seen (the optimizer's count did not advance either)."""
    it = iter(small.data)
    bad = dict(next(it))
    bad["weights"] = bad["weights"].astype(np.float32).copy()
    bad["weights"][0, 0] = np.nan
    state = small.state()
    after, metrics = small.step(state, small.shard(bad))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == 1
    _assert_equal_trees(after.params, small.initial.params)
    _assert_equal_trees(after.opt_state, small.initial.opt_state)
    good = next(it)
    after, metrics = small.step(after, small.shard(good))
    assert float(metrics["skipped"]) == 0.0 and np.isfinite(float(metrics["loss"]))
    reference, _ = small.step(small.state(), small.shard(good))   # as if the bad batch had not been there
    _assert_equal_trees(after.params, reference.params)
    _assert_equal_trees(after.opt_state, reference.opt_state)


def test_a_nonfinite_state_is_never_saved(small, tmp_path):
    small.saved_steps(tmp_path, 1)
    leaves, tree = jax.tree.flatten(small.initial.params)
    leaves = [np.array(x) for x in leaves]
    leaves[0].flat[0] = np.inf
    poisoned = jax.device_put(small.initial.replace(step=np.int32(7), params=jax.tree.unflatten(tree, leaves)),
                              small.shardings)
    before = _listing(tmp_path)
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"step 7: not saving a checkpoint, params\[.*holds NaN or inf"):
        ckpt.save(poisoned, iter(small.data), small.config, small.model_cfg)
    ckpt.close()
    assert _listing(tmp_path) == before


@pytest.mark.slow   # trains in process (about 1-2 minutes on 2 CPU cores)
def test_diverging_run_stops_after_consecutive_skips_and_keeps_its_checkpoints(corpus, tmp_path):
    """A good run of 4 steps, resumed with learning rate 1e3: the loss turns NaN, those steps are skipped
    and logged, the run stops after max_consecutive_skips of them with TrainingError, and every
    checkpoint left is finite and restores (the good step 4 among them or replaced only by finite ones)."""
    workdir = tmp_path / "run"
    good = small_config(corpus, num_steps=4, checkpoint_every=2, keep_checkpoints=2)
    train(good, workdir)
    diverging = small_config(corpus, num_steps=40, checkpoint_every=2, keep_checkpoints=2, max_consecutive_skips=3,
                             **{"optimizer.learning_rate": 1e3, "optimizer.warmup_steps": 0})
    with pytest.raises(TrainingError, match=r"NaN or inf for 3 steps in a row .*max_consecutive_skips=3"):
        train(diverging, workdir)
    records = [r for r in read_metrics(workdir / METRICS_FILE) if r["kind"] == "train"]
    assert records[-1]["skipped"] == 1 and records[-1]["loss"] is None
    assert [r["step"] for r in records] == list(range(1, records[-1]["step"] + 1))
    ckpt = Checkpointer(workdir, read_only=True)
    steps = ckpt.manager.all_steps()
    ckpt.close()
    assert steps and max(steps) >= 4
    _, params = restore_params(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(params)))


# ------------------------------------------------------------------------------------------------------
# Verified checkpoints

def test_byte_flipped_checkpoint_is_detected_and_skipped(small, tmp_path):
    params = small.saved_steps(tmp_path, 2)
    files = sorted((p for p in (tmp_path / "checkpoints" / "2" / "params").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    data = bytearray(files[-1].read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()
    files[-1].write_bytes(bytes(data))                         # size unchanged
    with pytest.warns(CheckpointRestoreWarning, match=r"checkpoint step 2 in .* cannot be restored") as caught:
        restored = small.restore(tmp_path)
    assert len(caught) == 1 and len(str(caught[0].message).splitlines()) == 1
    assert int(restored.step) == 1
    _assert_equal_trees(restored.params, params[1])
    assert (tmp_path / "checkpoints" / "2.corrupt-0").is_dir()   # moved aside once step 1 restored


def test_readable_checkpoint_with_other_values_fails_its_checksum(small, tmp_path):
    """Step 2's parameter files replaced by step 1's: every file is valid, only the checksums written
    with step 2 tell: the restore names the array, step and directory and falls back to step 1."""
    params = small.saved_steps(tmp_path, 2)
    directory = tmp_path / "checkpoints"
    for f in (directory / "2" / "params").rglob("*"):
        if f.is_file():
            os.remove(f)
    for f in (directory / "1" / "params").rglob("*"):
        if f.is_file():
            target = directory / "2" / "params" / f.relative_to(directory / "1" / "params")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
    with pytest.warns(CheckpointRestoreWarning, match=r"step 2 .*params\[.*does not match the checksum written "
                                                      r"at save .*checkpoints/2/params"):
        restored = small.restore(tmp_path)
    assert int(restored.step) == 1
    _assert_equal_trees(restored.params, params[1])


# ------------------------------------------------------------------------------------------------------
# Refusals

def test_changed_model_shape_is_refused_with_nothing_renamed(small, tmp_path):
    small.saved_steps(tmp_path, 2)
    before = _listing(tmp_path)
    wider = small.model_cfg.replace(intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"model\.intermediate_size=128 \(the checkpoint has 64\).*--start_over"):
        small.restore(tmp_path, wider)
    assert _listing(tmp_path) == before


def test_workdir_where_nothing_restores_is_refused_with_nothing_renamed(small, tmp_path):
    small.saved_steps(tmp_path, 2)
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "params" and f.name == "_METADATA":
            f.write_bytes(f.read_bytes()[:100])
    before = _listing(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointRestoreWarning)
        with pytest.raises(CheckpointError, match=r"none of the checkpoints .*step 2: .*step 1: .*nothing was "
                                                  r"renamed or deleted.*--start_over"):
            small.restore(tmp_path)
    assert _listing(tmp_path) == before


def test_corrupt_json_item_is_named(small, tmp_path):
    """The latest step's config JSON is garbage: reading the workdir's config names the file; its model
    JSON garbage too: restoring warns naming that file and uses step 1."""
    small.saved_steps(tmp_path, 2)
    step2 = tmp_path / "checkpoints" / "2"
    (step2 / "config" / "metadata").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoints/2/config/metadata: cannot be read as JSON"):
        read_workdir_config(tmp_path)
    (step2 / "model" / "metadata").write_text("")
    with pytest.warns(CheckpointRestoreWarning, match=r"step 2 .*checkpoints/2/model/metadata: cannot be read as JSON"):
        assert int(small.restore(tmp_path).step) == 1


# ------------------------------------------------------------------------------------------------------
# Write failures

@pytest.mark.slow   # trains in process (about 1-2 minutes on 2 CPU cores)
def test_failing_checkpoint_write_stops_the_run_with_the_cause(corpus, tmp_path, monkeypatch):
    """The disk fills after step 2's checkpoint: the run stops at the next save with CheckpointError naming
    the step, the directory and the OS error in one line; step 2 stays and restores."""
    workdir = tmp_path / "run"
    calls = []
    real = ocp.handlers.JsonCheckpointHandler.async_save

    async def disk_full_after_first_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 3:          # config, model and integrity of step 2, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", disk_full_after_first_step)
    config = small_config(corpus, num_steps=8, checkpoint_every=2)
    with pytest.raises(CheckpointError) as raised:
        train(config, workdir)
    message = str(raised.value)
    assert "writing checkpoint step 4" in message and "No space left on device" in message, message
    assert len(message.splitlines()) == 1
    monkeypatch.undo()
    ckpt = Checkpointer(workdir, read_only=True)
    assert ckpt.manager.all_steps() == [2]
    ckpt.close()
    restore_params(workdir)
    assert max(r["step"] for r in read_metrics(workdir / METRICS_FILE)) <= 4


def test_background_write_failure_is_reported_in_one_line(small, tmp_path, monkeypatch):
    """Orbax keeps a failed background write's error in its finalize thread until wait_until_finished;
    `check` (called by the loop after every step) asks for it as soon as no write is in progress."""
    small.saved_steps(tmp_path, 1)
    ckpt = Checkpointer(tmp_path)
    ckpt._writing = 2

    def failed():
        raise RuntimeError("Save Finalize thread failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "wait_until_finished", failed)
    with pytest.raises(CheckpointError, match=r"^writing checkpoint step 2 to .* failed: OSError: .*No space left on "
                                              r"device; the earlier checkpoints \[1\] are intact$"):
        ckpt.check()
    monkeypatch.undo()
    ckpt.close()


# ------------------------------------------------------------------------------------------------------
# Workdirs

@pytest.mark.slow   # trains in process (about 1-2 minutes on 2 CPU cores)
def test_start_over_moves_everything_aside_and_finished_rerun_adds_no_eval(corpus, tmp_path):
    workdir = tmp_path / "run"
    config = small_config(corpus, num_steps=3)
    first = train(config, workdir)
    again = train(config, workdir)        # finished: nothing trained, the logged evaluation is reported
    records = read_metrics(workdir / METRICS_FILE)
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3]
    assert again["val_loss"] == first["val_loss"]
    old = (workdir / METRICS_FILE).read_text()
    # The new run also logs sparsely (the first and the last step are always logged) and profiles step 2.
    train(apply_overrides(config, {"log_every": 5, "profile_steps": 1}), workdir, start_over=True)
    assert (workdir / "previous-0" / METRICS_FILE).read_text() == old
    assert (workdir / "previous-0" / "checkpoints" / "3").is_dir()
    assert [r["step"] for r in read_metrics(workdir / METRICS_FILE) if r["kind"] == "train"] == [1, 3]
    assert list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*perfetto_trace.json.gz"))


def test_workdir_that_is_a_file_is_named(corpus, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(TrainingError, match=r"--workdir .*file: is a file, not a directory"):
        train(small_config(corpus), path)


def test_a_step_that_fails_to_compile_stops_the_run_with_its_error(corpus, tmp_path, monkeypatch):
    """The step compiles on a thread of its own while the state is initialised; its error reaches the
    caller as it was raised, before any step or checkpoint."""
    from hymba_jax.train.program import TrainProgram
    from hymba_jax.train.step import StepDoesNotFit

    def fails(*args, **kwargs):
        raise StepDoesNotFit("the train step with remat full does not fit in device memory")

    monkeypatch.setattr(TrainProgram, "compile", fails)
    with pytest.raises(StepDoesNotFit, match="remat full does not fit"):
        train(small_config(corpus), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())

