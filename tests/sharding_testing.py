"""Runs in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set before jax is imported):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_testing.py OUT.json WORKDIR \
        'data=8;fsdp=8;data=2,tensor=4;fsdp=2,tensor=4'

Trains the same two steps from the same initial state on one device and under the given meshes (names
of MESHES, ';'-separated; fsdp=2,tensor=4 is always needed: the checkpoint test uses it), restores
checkpoints across meshes (1 device -> 8 and back) and counts the collectives of the compiled steps.
Writes the results as JSON for tests/test_sharding.py to assert on.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from hymba_jax.data import Tokenizer, make_dataset
from hymba_jax.model.lm import uses_one_layer_body
from hymba_jax.parallel import collective_operands, make_mesh, shard_batch
from hymba_jax.checkpoint import Checkpointer
from hymba_jax.train.config import model_config
from hymba_jax.train.program import build_train_program

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_testing import REPO, apply_overrides, small_overrides, write_small_corpus  # noqa: E402

sys.path.insert(0, str(REPO))
from configs.tiny import get_config  # noqa: E402

# Every sharded dimension divides 8 (fsdp) and 4 (tensor): 4 query and 4 KV heads, d_inner 64 = 4 x 16.
MODEL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, qk_head_dim=8, v_head_dim=16,
             d_inner=64, intermediate_size=64, d_state=4, dt_rank=4, num_meta_tokens=2, sliding_window=8,
             global_layers=(0,), kv_reuse_groups=())
MESHES = {
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
    "data=2,tensor=4": dict(data=2, fsdp=1, tensor=4),
    "fsdp=2,tensor=4": dict(data=1, fsdp=2, tensor=4),
}
# Parameters whose sharding is checked, with their logical axes (the model's; in the state's training layout
# the layers are stacked on a leading axis that is never sharded; no KV sharing here, so every layer has K/V).
CHECKED = {
    "embedding": ("vocab", "embed"),
    "layers/attention/q_proj/kernel": (None, "embed", "heads", "head_dim"),
    "layers/attention/k_proj/kernel": (None, "embed", "kv_heads", "head_dim"),
    "layers/ssm/in_proj/kernel": (None, "embed", None, "inner"),
    "layers/ssm/x_proj/kernel": (None, "inner", None),
    "layers/ssm/A_log": (None, "inner", "state"),
    "layers/out_proj/kernel": (None, "inner", "embed"),
    "layers/mlp/down_proj/kernel": (None, "mlp", "embed"),
    "layers/input_norm/scale": (None, "embed"),
}


def flat(tree) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def spec_list(spec) -> list:
    return [list(a) if isinstance(a, tuple) else a for a in spec]


def main(out_path: str, workdir: str, meshes: str) -> None:
    start = time.perf_counter()
    tick = lambda what: print(f"{time.perf_counter() - start:7.1f} s  {what}", flush=True)
    work = Path(workdir)
    corpus, spm = write_small_corpus(work / "corpus")
    overrides = small_overrides(corpus, spm, work / "cache")
    overrides.update({f"model.{k}": v for k, v in MODEL.items()})
    overrides.update({"batch_size": 8, "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 0, "z_loss": 1e-4})
    config = apply_overrides(get_config(), overrides)
    tokenizer = Tokenizer.from_file(spm)
    cfg = model_config(config, tokenizer.vocab_size)
    data = iter(make_dataset(config.data, tokenizer, split="train", global_batch_size=8, seq_len=32, seed=0))
    batches = [next(data) for _ in range(3)]
    results: dict = {"meshes": {}, "one_layer_body": uses_one_layer_body(cfg)}
    runs = {}

    def train(mesh, steps=(0, 1)):
        program = build_train_program(config, cfg, mesh)
        state, bsh = program.init_state(jax.random.key(0)), program.batch_sharding
        compiled = program.train_step().lower(state, shard_batch(batches[0], bsh)).compile()
        run = lambda state, i: compiled(state, shard_batch(batches[i], bsh))
        losses, norms = [], []
        for i in steps:
            state, metrics = run(state, i)
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
        return state, losses, norms, compiled, run

    one = make_mesh({"data": 1}, devices=jax.devices()[:1])
    tick("data ready")
    ref_state, ref_losses, ref_norms, _, ref_run = train(one)
    tick("1 device")
    ref_params = {k: np.asarray(v) for k, v in flat(jax.device_get(ref_state.params)).items()}
    results["reference"] = {"losses": ref_losses, "grad_norms": ref_norms}

    for name in meshes.split(";"):
        mesh = make_mesh(MESHES[name])
        state, losses, norms, compiled, run = train(mesh)
        runs[name] = run
        tick(name)
        params = flat(state.params)
        mu = flat(state.opt_state[1][0].mu)     # clip_by_global_norm, then AdamW's ScaleByAdamState
        diffs = {k: float(np.max(np.abs(np.asarray(jax.device_get(v)) - ref_params[k])) if v.size else 0.0)
                 for k, v in params.items()}
        results["meshes"][name] = {
            "losses": losses, "grad_norms": norms, "max_param_diff": max(diffs.values()),
            "worst_param": max(diffs, key=diffs.get),
            "specs": {k: spec_list(params[k].sharding.spec) for k in CHECKED},
            "mu_specs": {k: spec_list(mu[k].sharding.spec) for k in CHECKED},
            "shard_shapes": {k: list(params[k].addressable_shards[0].data.shape) for k in CHECKED},
            "global_shapes": {k: list(params[k].shape) for k in CHECKED},
            "collectives_train_step": {k: len(v) for k, v in collective_operands(compiled.as_text()).items()},
        }

    # Forward-only collectives under pure tensor parallelism: what docs/sharding.md explains.
    program = build_train_program(config, cfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 4},
                                                         devices=jax.devices()[:4]))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=program.batch_sharding)
             for k, v in batches[0].items()}
    results["forward_tensor4"] = collective_operands(
        program.eval_step().lower(program.abstract_state().params, batch).compile().as_text())

    tick("forward HLO")
    # Checkpoint written from 1 device, restored onto fsdp=2 x tensor=4 and back onto 1 device.
    results["checkpoint"] = checkpoint_round_trip(config, cfg, ref_state, ref_params, data, work, ref_run,
                                                  runs["fsdp=2,tensor=4"], one)
    tick("checkpoints")
    Path(out_path).write_text(json.dumps(results, indent=1))


def checkpoint_round_trip(config, cfg, ref_state, ref_params, data, work, run_on_1, run_on_8, one) -> dict:
    """Save after two steps on 1 device; restore on fsdp=2 x tensor=4 and take the third step there; save
    that and restore it on 1 device, to compare with the third step taken on 1 device."""
    shapes = jax.eval_shape(lambda: ref_state)
    saver = Checkpointer(work / "ckpt_from_1", async_save=False)
    saver.save(ref_state, data, config, cfg)
    saver.close()
    eight = make_mesh(MESHES["fsdp=2,tensor=4"])
    restored = Checkpointer(work / "ckpt_from_1").restore_latest(
        build_train_program(config, cfg, eight).state_shardings, shapes, data)
    summary = {
        "restored_step": int(restored.step),
        "restored_on_8_max_diff": max(float(np.max(np.abs(np.asarray(v) - ref_params[k])))
                                      for k, v in flat(jax.device_get(restored.params)).items()),
        "restored_on_8_spec": spec_list(flat(restored.params)["layers/out_proj/kernel"].sharding.spec)}
    state8, metrics8 = run_on_8(restored, 2)
    state1, metrics1 = run_on_1(ref_state, 2)
    saver = Checkpointer(work / "ckpt_from_8", async_save=False)
    saver.save(state8, data, config, cfg)
    saver.close()
    back = Checkpointer(work / "ckpt_from_8").restore_latest(build_train_program(config, cfg, one).state_shardings,
                                                             shapes, data)
    ref3 = flat(jax.device_get(state1.params))
    summary.update({
        "loss_step3_on_8": float(metrics8["loss"]), "loss_step3_on_1": float(metrics1["loss"]),
        "back_on_1_max_diff_vs_1_device_run": max(float(np.max(np.abs(np.asarray(v) - np.asarray(ref3[k]))))
                                                  for k, v in flat(jax.device_get(back.params)).items()),
        "back_on_1_devices": len(flat(back.params)["embedding"].sharding.device_set)})
    return summary


if __name__ == "__main__":
    main(*sys.argv[1:])
