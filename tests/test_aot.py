"""Ahead-of-time compilation of train.py's step for a TPU topology on this CPU machine (needs libtpu).

libtpu is not a project requirement (importing it makes every CPU process probe for a TPU): the test
runs `python -m hymba_jax.aot` in a subprocess with libtpu on its path, from the environment or from the
repository's `.tpu_site/` (`pip install --no-deps --target .tpu_site "libtpu==<jax's>"`, as .ci/run
does), and skips when neither has it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from train_testing import REPO, SMALL_MODEL

TPU_SITE = REPO / ".tpu_site"


def libtpu_path() -> str | None:
    """A PYTHONPATH entry that provides libtpu ('' when it is installed), or None."""
    if importlib.util.find_spec("libtpu") is not None:
        return ""
    if (TPU_SITE / "libtpu").is_dir():
        return str(TPU_SITE)
    return None


# auto (the default) compiles pallas_tpu and splash (128 tokens: whole splash tiles). The Mosaic scan kernel
# is one custom call XLA cannot partition; it compiles under fsdp x tensor only because scan_fused runs it
# in shard_map ("Mosaic kernels cannot be automatically partitioned" otherwise).
@pytest.mark.parametrize("scan_backend, compiled_scan", [("associative", "associative"), ("auto", "pallas_tpu")])
def test_tiny_train_step_compiles_for_a_tpu_slice(tmp_path, scan_backend, compiled_scan):
    site = libtpu_path()
    if site is None:
        pytest.skip(f"libtpu is absent (install it into {TPU_SITE}: see hymba_jax/aot.py)")
    model = [f"--config.model.{k}={v}" for k, v in SMALL_MODEL.items()]        # tuples parse as literals
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p),
               ALLOW_MULTIPLE_LIBTPU_LOAD="1")   # other compiles (tests, benchmarks) may hold libtpu's lock
    cmd = [sys.executable, "-m", "hymba_jax.aot", "--config", str(REPO / "configs" / "tiny.py"),
           "--topology", "v5p:2x2x1", "--vocab_size", "512", "--config.batch_size=8", "--config.seq_len=128",
           "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=2", "--json", *model,
           "--config.model.num_kv_heads=2",                                   # KV heads split over tensor=2
           f"--config.model.scan_backend={scan_backend}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert (report["scan_backend"], report["attention_backend"]) == (compiled_scan, "splash")  # "auto": the TPU's
    assert "total" in proc.stdout and "fits" in proc.stdout
    # The chip's arguments hold at least its share of the fp32 train state (params + two Adam moments);
    # at this size TPU tiling pads the small arrays (minor dimension to 128 lanes) well beyond that.
    assert report["argument_bytes"] > 3 * 4 * report["params"] / 4
    assert report["alias_bytes"] >= 0.9 * report["output_bytes"]          # the state is donated
    # XLA's FLOPs for one chip's program vs the model formula for its 8 x 64 / 4 tokens: the formula
    # leaves out the scan, norms and softmax, and counts the tied embedding as a matmul.
    assert 0.5 < report["flops"] / report["model_flops"] < 3
    # FSDP: parameters all-gathered for use, their gradients reduce-scattered (the TPU's all-reduce-scatter
    # fusions); the all-reduces left are of replicated parameters' gradients and sums over sharded axes.
    collectives = report["collectives"]
    assert collectives["all-gather"] > 0 and collectives["reduce-scatter"] > 0 and collectives["all-reduce"] > 0
