"""train.py as users run it, in subprocesses: interrupt with SIGKILL and SIGTERM, resume, and compare
with an uninterrupted run bit for bit; start from a Hugging Face checkpoint.

The runs share a persistent compilation cache, so only the first one compiles (the executables, and so
the numerics, are the same in every process).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from hymba_jax.checkpoint import Checkpointer, restore_params
from hymba_jax.train.metrics import METRICS_FILE, read_metrics

from train_testing import REPO, SMALL_MODEL, config_file, small_overrides, small_run, subprocess_env

NUM_STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    overrides = small_run(root, NUM_STEPS)
    return config_file(root, overrides), subprocess_env(root)


def _launch(setup, workdir: Path, *flags: str) -> subprocess.Popen:
    config, env = setup
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config), "--workdir",
                             str(workdir), *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def _wait_for_step(proc: subprocess.Popen, workdir: Path, step: int, timeout: float = 300) -> int:
    """Polls the run's metrics log until it has logged `step` (returns the last logged step)."""
    deadline = time.time() + timeout
    path = workdir / METRICS_FILE
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stdout.read()[-3000:]}")
        if path.exists():
            steps = [r["step"] for r in read_metrics(path) if r["kind"] == "train"]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _losses(workdir: Path) -> dict:
    return {(r["kind"], r["step"]): r["loss"] for r in read_metrics(workdir / METRICS_FILE)
            if r["kind"] in ("train", "eval")}


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory) -> Path:
    """The workdir of a run of NUM_STEPS steps that nothing interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _finish(_launch(setup, workdir))
    return workdir


def test_sigkill_and_sigterm_then_resume_is_bitwise_identical(setup, uninterrupted, tmp_path):
    reference = uninterrupted
    expected = _losses(reference)
    assert sorted(s for k, s in expected if k == "train") == list(range(1, NUM_STEPS + 1))

    run = tmp_path / "interrupted"
    proc = _launch(setup, run)
    _wait_for_step(proc, run, 5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    proc = _launch(setup, run)                    # resumes from its latest checkpoint, no flag
    _wait_for_step(proc, run, 8)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert "resumed at step" in out
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stopped_by_signal"] == signal.SIGTERM
    last_logged = max(s for k, s in _losses(run) if k == "train")
    checkpointer = Checkpointer(run, read_only=True)
    assert checkpointer.manager.latest_step() == stopped["step"] == last_logged
    checkpointer.close()
    # The SIGTERM checkpoint is complete: every item is there and the parameters load.
    items = {p.name for p in (run / "checkpoints" / str(stopped["step"])).iterdir()}
    assert {"params", "opt_state", "data", "config", "model"} <= items
    restore_params(run)

    _finish(_launch(setup, run))
    assert _losses(run) == expected               # every training loss and the final validation loss
    assert (run / "loss_curve.png").stat().st_size > 1000
    got, want = (jax.tree.leaves(jax.device_get(restore_params(d)[1])) for d in (run, reference))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def _tree(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_unusable_workdir_is_refused_and_start_over_begins_again(setup, uninterrupted, tmp_path):
    """A changed model shape, then a workdir whose every checkpoint is damaged: train.py exits 1 with one
    message naming the difference (or each step's error) and the remedy, renames nothing and leaves
    metrics.jsonl as it was; --start_over moves the checkpoints and logs into previous-0/ and trains
    from step 0."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before, metrics = _tree(run), (run / METRICS_FILE).read_text()
    proc = _launch(setup, run, "--config.model.intermediate_size=128")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert (f"training stopped: the config's model does not fit checkpoint step {NUM_STEPS}" in out
            and "model.intermediate_size=128 (the checkpoint has 64)" in out and "--start_over" in out), out[-3000:]
    assert _tree(run) == before

    for metadata in (run / "checkpoints").glob("*/params/_METADATA"):
        metadata.write_bytes(metadata.read_bytes()[:100])
    before = _tree(run)
    proc = _launch(setup, run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out[-3000:]
    assert "training stopped: none of the checkpoints" in out and "nothing was renamed or deleted" in out
    assert "Traceback" not in out and len(out.splitlines()) < 30, out     # one line per step, no library dumps
    assert _tree(run) == before and (run / METRICS_FILE).read_text() == metrics

    _finish(_launch(setup, run, "--start_over"))
    assert (run / "previous-0" / METRICS_FILE).read_text() == metrics
    assert sorted(s for k, s in _losses(run) if k == "train") == list(range(1, NUM_STEPS + 1))


def test_eval_program_reproduces_the_final_validation_loss(setup, uninterrupted):
    """`eval.py --workdir DIR` (train.py's flag) restores the latest checkpoint and the run's own validation
    split and batch settings: its loss is the training run's final validation loss, and its result is
    `eval.py --config.workdir=DIR`'s. Giving both with different directories is refused."""
    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "eval.py"), *flags], cwd=REPO, env=setup[1],
                              capture_output=True, text=True, timeout=300)

    results = []
    for flags in (["--workdir", str(uninterrupted)], [f"--config.workdir={uninterrupted}"]):
        proc = run(*flags)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert results[0] == results[1] == json.loads((uninterrupted / "eval_perplexity.json").read_text())
    final = _losses(uninterrupted)[("eval", NUM_STEPS)]
    assert results[0]["task"] == "perplexity" and results[0]["tokens"] > 0
    assert f"at checkpoint step {NUM_STEPS}" in proc.stderr
    np.testing.assert_allclose(results[0]["loss"], final, rtol=1e-6)

    proc = run("--workdir", str(uninterrupted), "--config.workdir=/elsewhere")
    assert proc.returncode != 0 and "--workdir" in proc.stderr and "disagree" in proc.stderr, proc.stderr[-3000:]


def test_init_from_hf_trains(setup, tmp_path, tiny_a_dir, tiny_a):
    """Start from the hymba-tiny-a fixture (vocab 101: a 100-piece character tokenizer) and train 2 steps
    with a small learning rate: the result is the fixture's weights moved by about lr per step."""
    import sentencepiece as spm

    corpus = tmp_path / "abc.txt"
    words = ["the", "state", "space", "model", "attention", "head", "token", "meta", "layer", "window"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(200)))
    prefix = tmp_path / "char"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=40, model_type="char",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, hard_vocab_limit=False)
    root, env = setup[0].parent, setup[1]
    overrides = {k: v for k, v in small_overrides(corpus, Path(f"{prefix}.model"), root / "cache").items()
                 if not k.startswith("model.")}
    overrides.update({f"model.{k}": None for k in SMALL_MODEL})   # the shape comes from config.json
    overrides.update({"model.max_position_embeddings": None, "model.rope_type": None, "init_from_hf": str(tiny_a_dir),
                      "num_steps": 2, "optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-4,
                      "optimizer.weight_decay": 0.0, "eval_batches": 1})
    workdir = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config_file(tmp_path, overrides)),
                           "--workdir", str(workdir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    losses = [r["loss"] for r in read_metrics(workdir / METRICS_FILE) if r["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    model_cfg, params = restore_params(workdir)
    fixture_cfg, fixture_params = tiny_a
    assert model_cfg.replace(dtype="float32", scan_backend=fixture_cfg.scan_backend) == fixture_cfg
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(fixture_params))]
    assert 0 < max(moved) <= 2.5e-4          # Adam moves each weight by at most ~lr per step
