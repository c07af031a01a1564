"""Data-parallel and FSDP scaling of train.py's step on the GPUs of one host: tokens/s and efficiency
against one GPU at the same per-GPU batch (weak scaling).

    PYTHONPATH=. python benchmarks/scaling.py --preset hymba_125m --seq 2048 --batch_per_device 8 \
        --meshes 1:data=1 2:data=2 2:fsdp=2 --steps 10 --json $OUT/scaling.json

A run is DEVICES:MESH (mesh axes as in config.mesh). Every run uses train.py's program
(`build_train_program`: AdamW with clipping, z-loss, donated sharded state, bf16 compute, fp32 master weights) on
synthetic packed rows (random tokens, 4 documents per row). The first run (the baseline) is compiled and
timed first while the others compile on host threads; the other runs are then timed one after another:
2 warm-up steps, then the median of --steps steps. Efficiency = tokens/s / (devices x tokens/s of the
1-device run). MFU uses train.metrics' FLOPs per token and the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import time

import jax
import ml_collections
import numpy as np

from hardware import matmul_rate
from hymba_jax.config import get_preset
from hymba_jax.model.lm import init_params
from hymba_jax.parallel import DEFAULT_AXIS_RULES, collective_operands, make_mesh
from hymba_jax.train.metrics import flops_per_token
from hymba_jax.train.program import build_train_program


def program_config(num_steps: int) -> ml_collections.ConfigDict:
    """The keys `build_train_program` reads: configs/hymba_125m.py's optimizer and z-loss with a 10-step
    warmup, no gradient accumulation, the default axis rules."""
    return ml_collections.ConfigDict(dict(
        num_steps=num_steps, grad_accum_steps=1, z_loss=1e-4, axis_rules=DEFAULT_AXIS_RULES,
        optimizer=dict(learning_rate=3e-3, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.01,
                       b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0)))


def synthetic_batch(rows: int, seq: int, vocab: int, docs: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(rows, seq + 1), dtype=np.int32)
    segments = np.repeat(np.arange(docs, dtype=np.int32), -(-seq // docs))[:seq]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.broadcast_to(segments, (rows, seq)).copy(), "weights": np.ones((rows, seq), np.float32)}


def parse_run(spec: str) -> tuple[int, dict]:
    devices, mesh = spec.split(":")
    shape = {axis: int(size) for axis, size in (part.split("=") for part in mesh.split(","))}
    return int(devices), shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="hymba_125m")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch_per_device", type=int, default=8)
    parser.add_argument("--meshes", nargs="+", default=["1:data=1", "2:data=2", "2:fsdp=2"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attention", default="auto", help="model attention_backend")
    parser.add_argument("--scan", default="auto", help="model scan_backend")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--deadline_s", type=float, default=1e9, help="start no timed run after this")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)

    cfg = get_preset(args.preset, dtype="bfloat16", param_dtype="float32", remat=args.remat,
                     attention_backend=args.attention, scan_backend=args.scan)
    config = program_config(1000)
    log(f"{jax.device_count()} x {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.preset} "
        f"seq {args.seq}, {args.batch_per_device} rows per device")

    runs = []
    for spec in args.meshes:
        n, shape = parse_run(spec)
        mesh = make_mesh(shape, devices=jax.devices()[:n])
        program = build_train_program(config, cfg, mesh)
        rows = args.batch_per_device * n
        lowered = program.train_step().lower(program.abstract_state(), program.abstract_batch(rows, args.seq))
        runs.append(dict(spec=spec, devices=n, mesh=mesh, program=program, rows=rows, lowered=lowered))
    log("lowered")

    def compile_one(run):
        t = time.perf_counter()
        run["compiled"] = run["lowered"].compile()
        run["compile_s"] = time.perf_counter() - t
        log(f"compiled {run['spec']} in {run['compile_s']:.0f} s")

    flops = flops_per_token(cfg, args.seq)
    peak = matmul_rate()
    log(f"bf16 matmul {peak / 1e12:.0f} TFLOP/s (MFU denominator, per GPU)")
    results = []

    def measure(run, params):
        if time.perf_counter() - start > args.deadline_s:
            log(f"deadline: skipping {run['spec']}")
            return
        state = run["program"].init_state(jax.random.key(0), params=params)
        host = synthetic_batch(run["rows"], args.seq, cfg.vocab_size)
        batch = {k: jax.device_put(v, run["program"].batch_sharding) for k, v in host.items()}
        times, losses = [], []
        for i in range(args.steps + 2):
            t = time.perf_counter()
            state, metrics = run["compiled"](state, batch)
            losses.append(float(metrics["loss"]))   # waits for the step
            if i >= 2:
                times.append(time.perf_counter() - t)
        memory = run["compiled"].memory_analysis()
        seconds = statistics.median(times)
        tokens_per_s = run["rows"] * args.seq / seconds
        result = dict(run=run["spec"], devices=run["devices"], mesh=dict(run["mesh"].shape), rows=run["rows"],
                      seq=args.seq, step_s=seconds, tokens_per_s=tokens_per_s,
                      tokens_per_s_per_device=tokens_per_s / run["devices"],
                      mfu=flops * tokens_per_s / (peak * run["devices"]),
                      compile_s=run["compile_s"], first_loss=losses[0], last_loss=losses[-1],
                      temp_gib=memory.temp_size_in_bytes / 2**30, argument_gib=memory.argument_size_in_bytes / 2**30,
                      collectives={op: len(shapes) for op, shapes in
                                   collective_operands(run["compiled"].as_text()).items()})
        base = next((r for r in results if r["devices"] == 1), None)
        result["efficiency"] = (tokens_per_s / (run["devices"] * base["tokens_per_s"])) if base else None
        results.append(result)
        log(json.dumps(result))

    # The first run (the 1-GPU baseline) is compiled and timed before the others, so a run cut short
    # still reports it; the others then compile concurrently (compilation is host work).
    with concurrent.futures.ThreadPoolExecutor(len(runs) + 1) as pool:
        init = pool.submit(init_params, cfg, jax.random.key(0, impl="unsafe_rbg"))   # layer by layer
        rest = [pool.submit(compile_one, run) for run in runs[1:]] if len(runs) > 1 else []
        compile_one(runs[0])
        params = init.result()
        measure(runs[0], params)
        for future in rest:
            future.result()
    for run in runs[1:]:
        measure(run, params)
    del params
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": args.preset,
                       "attention": args.attention, "scan": args.scan, "remat": args.remat, "results": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
