"""Mesh construction, the logical-axis rules, and a train step sharded over simulated CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hymba_jax.parallel import DEFAULT_AXIS_RULES, MeshError, check_rules, resolve_mesh_shape

from train_testing import REPO


def test_mesh_shape_fills_minus_one():
    assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert resolve_mesh_shape({"data": 1, "fsdp": -1}, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert resolve_mesh_shape({"data": 1, "fsdp": 1, "tensor": 1}, 1) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("shape, devices, match", [
    ({"data": -1, "fsdp": -1}, 8, "mesh.fsdp=-1: only one"),
    ({"data": 3, "fsdp": 1, "tensor": 1}, 8, "needs 3 devices"),
    ({"data": -1, "tensor": 3}, 8, "mesh.data=-1: 8 devices are not divisible"),
    ({"data": 0}, 8, "mesh.data=0"),
    ({"pipeline": 2}, 8, "mesh.pipeline"),
])
def test_mesh_errors_name_the_axis(shape, devices, match):
    with pytest.raises(MeshError, match=match):
        resolve_mesh_shape(shape, devices)


def test_rules_must_name_mesh_axes():
    check_rules(DEFAULT_AXIS_RULES)
    with pytest.raises(MeshError, match="'heads' maps to 'model'"):
        check_rules(DEFAULT_AXIS_RULES + (("heads", "model"),))


SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    from hymba_jax.config import hymba_tiny
    from hymba_jax.parallel import make_mesh, shard_batch
    from hymba_jax.train.config import base_config
    from hymba_jax.train.program import build_train_program

    cfg = hymba_tiny(vocab_size=64, num_heads=4, num_kv_heads=2)
    config = base_config(); config.num_steps = 10; config.optimizer.warmup_steps = 1; config.grad_accum_steps = 2
    rng = np.random.default_rng(0)
    batch = dict(inputs=rng.integers(0, 64, (8, 16)).astype(np.int32), targets=rng.integers(0, 64, (8, 16)).astype(np.int32),
                 segment_ids=np.repeat(np.arange(1, 3), 8)[None].repeat(8, 0).astype(np.int32), weights=np.ones((8, 16), np.float32))
    losses = {{}}
    for shape in ({{"data": 1, "fsdp": 1, "tensor": 1}}, {{"data": 2, "fsdp": 2, "tensor": 2}}):
        devices = jax.devices()[:1] if shape["data"] == 1 else None
        mesh = make_mesh(shape, devices)
        program = build_train_program(config, cfg, mesh)
        state, bs, step = program.init_state(jax.random.key(0)), program.batch_sharding, program.train_step()
        for _ in range(2):
            state, m = step(state, shard_batch(batch, bs))
        losses[mesh.size] = float(m["loss"])
        if mesh.size == 8:
            q = state.params["layers"]["attention"]["q_proj"]["kernel"]     # stacked: (layers, d, heads, dim)
            assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding.spec
            mu = state.opt_state[1][0].mu["layers"]["attention"]["q_proj"]["kernel"]
            assert mu.sharding.spec == q.sharding.spec, mu.sharding.spec
            assert state.params["embedding"].sharding.spec == P(None, "fsdp")
            assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1:] == (32, 2, 16)
    print("LOSSES", losses[1], losses[8])
    assert abs(losses[1] - losses[8]) < 1e-5 * abs(losses[1]), losses
""")


@pytest.mark.slow
def test_sharded_train_step_matches_single_device(tmp_path):
    """Two steps on an 8-device (data 2, fsdp 2, tensor 2) mesh: parameters and Adam moments are sharded by
    the rules, and the loss equals the single-device run (only the summation order differs)."""
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests")))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=REPO,
                            env=dict(os.environ))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "LOSSES" in result.stdout
