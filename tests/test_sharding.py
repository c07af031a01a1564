"""Sharded training on 8 simulated CPU devices (in a subprocess: the device count is fixed at jax import).

One train step under each mesh must equal the step on one device, parameters must be laid out as the
rules table says, tensor parallelism must need only the reductions docs/sharding.md lists, and a
checkpoint must restore onto another mesh. The run with all four meshes is @slow; the default suite runs
the mesh that uses every axis kind at once (fsdp=2 x tensor=4).

Tolerances: every mesh computes the same fp32 sums in a different order (per-device partial sums, then
collectives), so losses agree to float32 rounding: rtol 1e-5 (a wrong shard or a missing reduction
changes them by percents). After two AdamW steps at lr 1e-3 each parameter has moved by about 2e-3;
Adam divides the gradient by its own magnitude, so rounding in the gradient moves an update by
about 1e-6 relative except where |g| is near eps, bounded by one step. atol 5e-5 is 2.5 % of one step
(measured: at most 6.3e-6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from hymba_jax.parallel import MeshError, check_divisible, collective_operands, make_mesh, resolve_mesh_shape
from train_testing import REPO

sys.path.insert(0, str(REPO / "tests"))
from sharding_testing import CHECKED, MESHES  # noqa: E402

RULES = {"batch": ("data", "fsdp"), "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "inner": "tensor",
         "mlp": "tensor"}   # DEFAULT_AXIS_RULES, written out independently


def run_worker(tmp_path, meshes: list[str]) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_testing.py"), str(out), str(tmp_path),
                           ";".join(meshes)], env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("sharding"), ["fsdp=2,tensor=4"])


def expected_spec(mesh_shape: dict, logical: tuple) -> list:
    """The mesh axes of each dimension, by the rules (size-1 mesh axes included, as flax writes them)."""
    return [RULES.get(name) if name in RULES else None for name in logical]


def check_mesh(result: dict, reference: dict, name: str) -> None:
    r = result["meshes"][name]
    assert r["losses"] == pytest.approx(reference["losses"], rel=1e-5), name
    assert r["grad_norms"] == pytest.approx(reference["grad_norms"], rel=1e-5), name
    assert r["max_param_diff"] < 5e-5, (name, r["worst_param"])
    sizes = MESHES[name]
    for param, logical in CHECKED.items():
        spec = expected_spec(sizes, logical)
        assert r["specs"][param] == [list(a) if isinstance(a, tuple) else a for a in spec], (name, param)
        assert r["mu_specs"][param] == r["specs"][param], (name, param)    # Adam moments follow the params
        ways = [1 if a is None else sizes[a] for a in spec]
        assert r["shard_shapes"][param] == [n // w for n, w in zip(r["global_shapes"][param], ways)], (name, param)


def test_fsdp_x_tensor_step_matches_one_device(default_run):
    check_mesh(default_run, default_run["reference"], "fsdp=2,tensor=4")
    shard = default_run["meshes"]["fsdp=2,tensor=4"]["shard_shapes"]
    assert shard["layers/ssm/in_proj/kernel"] == [2, 16, 2, 16]      # (layers, d/fsdp, x|z, d_inner/tensor)
    assert shard["layers/attention/q_proj/kernel"] == [2, 16, 1, 8]  # one head per tensor device


def test_tensor_parallel_forward_needs_only_the_documented_reductions(default_run):
    """Per compiled layer of the text pass (batch 8 x 32 tokens; on the CPU both layers are one compiled
    body, `uses_one_layer_body`): x_proj's output (dt_rank + 2 d_state = 12 wide, contracted over d_inner),
    the sums of squares of the two RMSNorms over d_inner (one number per token), out_proj and down_proj
    (hidden 32). No all-gather: nothing is re-assembled."""
    ops = default_run["forward_tensor4"]
    assert ops["all-gather"] == [] and ops["all-to-all"] == [] and ops["reduce-scatter"] == []
    text = Counter(s for s in ops["all-reduce"] if s.startswith("f32[8,"))
    assert default_run["one_layer_body"]
    layers = 1
    assert text == Counter({"f32[8,32,12]": layers, "f32[8,32]": 2 * layers, "f32[8,32,32]": 2 * layers})


def test_checkpoint_restores_across_meshes(default_run):
    c = default_run["checkpoint"]
    assert c["restored_step"] == 2
    assert c["restored_on_8_max_diff"] == 0.0                    # saved from 1 device, read exactly on 8
    assert c["restored_on_8_spec"] == [None, "tensor", "fsdp"]          # and laid out for the new mesh
    assert c["loss_step3_on_8"] == pytest.approx(c["loss_step3_on_1"], rel=1e-5)
    assert c["back_on_1_devices"] == 1
    assert c["back_on_1_max_diff_vs_1_device_run"] < 5e-5


@pytest.mark.slow
def test_every_mesh_matches_one_device(tmp_path):
    result = run_worker(tmp_path, list(MESHES))
    for name in MESHES:
        check_mesh(result, result["reference"], name)
    # Pure data parallelism: parameters whole on every device, one (combined) gradient all-reduce.
    assert result["meshes"]["data=8"]["collectives_train_step"]["all-gather"] == 0
    # FSDP gathers parameters for use; pure data parallelism never does.
    assert result["meshes"]["fsdp=8"]["collectives_train_step"]["all-gather"] > 0


# The shape of a TPU compile's reduce-scatter (python -m hymba_jax.aot, FSDP): a fusion calling an
# all-reduce-scatter computation, whose all-reduce is the reduce-scatter itself, not one more all-reduce.
TPU_HLO = """\
%all-reduce-scatter.1 (input: f32[2048,128]) -> f32[2048,32] {
  %input = f32[2048,128]{0,1:T(8,128)} parameter(0)
  %all-reduce.400 = f32[2048,128]{0,1:T(8,128)} all-reduce(%input), channel_id=104, replica_groups={{0,1,2,3}}
  ROOT %dynamic-slice.398 = f32[2048,32]{0,1:T(8,128)} dynamic-slice(%all-reduce.400, %c, %m)
}

ENTRY %main.7 (p0: f32[2048,128], p1: bf16[512,32]) -> (f32[2048,32], bf16[512,128], f32[8]) {
  %fusion = f32[2048,32]{0,1:T(8,128)} fusion(%fusion.42), kind=kCustom, calls=%all-reduce-scatter.1
  %all-gather.3 = bf16[512,128]{1,0} all-gather(%p1), channel_id=7, dimensions={1}
  %all-reduce.9 = (f32[8]{0}, f32[]{:T(128)}) all-reduce(%a, %b), channel_id=9, to_apply=%add
  %reduce-scatter.2 = f32[16]{0} reduce-scatter(%x), channel_id=10, dimensions={0}
}
"""


def test_collectives_are_counted_by_operand_and_tpu_reduce_scatters_as_such():
    ops = collective_operands(TPU_HLO)
    assert ops["reduce-scatter"] == ["f32[2048,32]", "f32[16]"]
    assert ops["all-reduce"] == ["f32[8]", "f32[]"]          # a tuple all-reduce counts each operand
    assert ops["all-gather"] == ["bf16[512,128]"]
    assert ops["all-to-all"] == [] and ops["collective-permute"] == []


def test_mesh_shape_errors_name_the_axis():
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 4}, 16) == {"data": 2, "fsdp": 2, "tensor": 4}
    with pytest.raises(MeshError, match="mesh.fsdp=-1: 8 devices are not divisible"):
        resolve_mesh_shape({"data": 3, "fsdp": -1}, 8)
    with pytest.raises(MeshError, match="mesh.pipeline"):
        resolve_mesh_shape({"pipeline": 2}, 8)


def test_indivisible_parameter_is_named():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    fake = jax.sharding.AbstractMesh((1, 1, 4), ("data", "fsdp", "tensor"))
    shapes = {"q_proj": jax.ShapeDtypeStruct((1600, 25, 64), "float32")}
    with pytest.raises(MeshError, match=r"\['q_proj'\]: dimension 1 of shape \(1600, 25, 64\) does not split 4 ways"):
        check_divisible(shapes, {"q_proj": NamedSharding(fake, PartitionSpec(None, "tensor"))})
    check_divisible(shapes, {"q_proj": NamedSharding(mesh, PartitionSpec(None, "tensor"))})
