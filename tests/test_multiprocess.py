"""Two `train.py` processes on this machine joined through jax.distributed (gloo CPU collectives): they
train, checkpoint and log the losses of one process doing the same training; (@slow) they lose their
last checkpoint, as a crash would, and resume on a multi-slice mesh with the same losses.

Each process reads only its half of the documents (the data pipeline shards by JAX process) and the
global batch is the rows of process 0 then process 1. The one-process reference builds exactly that
batch from the two shards and runs the same train step on one device, so the losses agree to float32
rounding (rtol 1e-5: the mean over 2 x 2 rows is reduced across processes instead of on one device).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from hymba_jax.data import Tokenizer, make_dataset
from hymba_jax.parallel import make_mesh, shard_batch
from hymba_jax.train.config import model_config
from hymba_jax.train.metrics import METRICS_FILE, read_metrics
from hymba_jax.train.program import build_train_program

from train_testing import REPO, apply_overrides, config_file, small_run, subprocess_env

NUM_STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    overrides = small_run(root, NUM_STEPS)
    return overrides, config_file(root, overrides), subprocess_env(root, JAX_PLATFORMS="cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(setup, workdir: Path, *flags: str) -> list[subprocess.Popen]:
    _, config, env = setup
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(config), "--workdir",
                              str(workdir), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                              f"--process_id={i}", "--distributed_timeout=120", *flags],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    return outs


def run_two_processes(setup, workdir: Path, *flags: str) -> list[str]:
    return finish(launch_two_processes(setup, workdir, *flags))


def one_process_losses(overrides: dict) -> list[float]:
    """The same training in this process on one device, the global batch assembled from both shards."""
    sys.path.insert(0, str(REPO))
    from configs.tiny import get_config

    config = apply_overrides(get_config(), overrides)
    tokenizer = Tokenizer.from_file(config.data.tokenizer)
    cfg = model_config(config, tokenizer.vocab_size)
    shards = [iter(make_dataset(config.data, tokenizer, split="train", global_batch_size=config.batch_size,
                                seq_len=config.seq_len, seed=config.seed,
                                shard_options=grain.sharding.ShardOptions(i, 2, drop_remainder=True)))
              for i in range(2)]
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    program = build_train_program(config, cfg, mesh)
    state, step = program.init_state(jax.random.key(config.seed)), program.train_step()
    sharding = program.batch_sharding
    losses = []
    for _ in range(NUM_STEPS):
        parts = [next(s) for s in shards]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, metrics = step(state, shard_batch(batch, sharding))
        losses.append(float(metrics["loss"]))
    return losses


def _train_losses(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(workdir / METRICS_FILE) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def two_process_run(setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_processes") / "run"
    return workdir, run_two_processes(setup, workdir), _train_losses(workdir)


def test_two_processes_train_and_checkpoint_like_one(setup, two_process_run):
    workdir, outs, losses = two_process_run
    assert [s for s, _ in losses] == list(range(1, NUM_STEPS + 1))     # one record per step: process 0 only
    assert '"step": 6' in outs[0] and '"step": 6' not in outs[1]      # the result is printed once
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
    data_files = set(os.listdir(workdir / "checkpoints" / "6" / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files       # each host's data position
    np.testing.assert_allclose([l for _, l in losses], one_process_losses(setup[0]), rtol=1e-5)


@pytest.mark.slow
def test_two_processes_resume_on_a_multislice_mesh(setup, two_process_run):
    """Lose the last checkpoint, as a crash right after step 4's would; resume on a mesh built from ICI
    x DCN shapes (each process a granule), which must read the checkpoint written under the first mesh."""
    workdir, _, first = two_process_run
    shutil.rmtree(workdir / "checkpoints" / "6")
    outs = run_two_processes(setup, workdir, "--config.mesh.data=1", "--config.dcn_mesh.data=2")
    assert "resumed at step 4" in outs[0]
    resumed = _train_losses(workdir)
    assert [s for s, _ in resumed] == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in first], rtol=1e-5)


def test_sigterm_to_one_process_stops_both_at_the_same_step(setup, tmp_path):
    """A preemption notice (SIGTERM) to process 1 alone: JAX's preemption service makes both processes
    stop after the same step and save it together (each host's data position in it), then exit cleanly."""
    workdir = tmp_path / "run"
    procs = launch_two_processes(setup, workdir, "--config.num_steps=100000", "--config.checkpoint_every=100000",
                                 "--config.log_every=1")
    deadline = time.time() + 300
    while not (workdir / METRICS_FILE).exists() or not _train_losses(workdir):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no training step logged"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = finish(procs)
    result = json.loads(outs[0].strip().splitlines()[-1])
    assert result["stopped_by_signal"] == signal.SIGTERM
    step = result["step"]
    assert 0 < step < 100000
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(step)]
    data_files = set(os.listdir(workdir / "checkpoints" / str(step) / "data"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= data_files


def test_missing_process_is_named(tmp_path):
    """Process 0 of 2 waits alone: the join times out with a message, not a hang."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = ("from hymba_jax import distributed; "
            f"distributed.initialize('127.0.0.1:{_free_port()}', 2, 0, timeout_s=3)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "DistributedTimeout: process 0 could not join 2 processes through 127.0.0.1:" in proc.stderr


def test_barrier_names_the_late_process(tmp_path):
    script = tmp_path / "barrier.py"
    script.write_text(
        "import sys, time\n"
        "from hymba_jax import distributed\n"
        "pid, port = int(sys.argv[1]), sys.argv[2]\n"
        "distributed.initialize(f'127.0.0.1:{port}', 2, pid, timeout_s=60)\n"
        "distributed.barrier('start', 60)\n"
        "if pid == 0:\n"
        "    try:\n"
        "        distributed.barrier('late', 2)\n"
        "    except distributed.DistributedTimeout as e:\n"
        "        print('TIMEOUT', e)\n"
        "else:\n"
        "    time.sleep(5)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(i), port], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert "TIMEOUT barrier 'late': process(es) [1] of 2 did not arrive within 2 s" in outs[0], outs[0][-2000:]


def test_explicit_flags_go_together(monkeypatch):
    from hymba_jax import distributed

    with pytest.raises(ValueError, match="give all three"):
        distributed.initialize("127.0.0.1:1", None, None)
    with pytest.raises(ValueError, match=r"process_id=2: must lie in \[0, num_processes=2\)"):
        distributed.initialize("127.0.0.1:1", 2, 2)
    for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect_cluster() is None                         # this machine: one process
    for name, value in {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
                        "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():   # what srun sets for each task
        monkeypatch.setenv(name, value)
    assert distributed.detect_cluster() == "SlurmCluster"
