"""One full training step of Hymba-1.5B (and a Llama-style model of about the same size) on one GPU:
tokens/s and MFU for each scan backend, attention backend and remat policy given.

    PYTHONPATH=. python benchmarks/train_step.py --runs hymba:pallas_gpu:cudnn:none:2048:8 ...

A run is model:scan:attention:remat:seq:batch, model 'hymba' (hymba_1p5b) or 'llama' (llama_style(2048,
32, 16, 4, 5504): 1.48B parameters, attention only, all global). The step is the minimal one written here
(next-token cross-entropy, optax.adamw, jit with donated state): bf16 compute, fp32 master weights and
optimizer state. Time: median of timed steps after two warm-up steps. MFU = model FLOPs per token x
tokens/s / bf16 matmul rate measured in the same process, with model FLOPs per token = 6 x parameters
(the tied embedding counted once, as the LM head) + attention: 3 (forward + backward) x 2 x heads x
(qk_head_dim + v_head_dim) x the mean number of keys a text token attends (meta tokens + causal or
window), summed over layers. With --breakdown, also times the forward only and forward+backward (no
optimizer) for each run; with --profile DIR, traces two steps with jax.profiler and prints where the GPU
time goes (benchmarks/profile_summary.py).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time

import jax
import numpy as np
import optax

from hardware import matmul_rate, timeit
from profile_summary import print_summary, summarize
from hymba_jax.config import HymbaConfig, hymba_1p5b, llama_style
from hymba_jax.model.lm import HymbaForCausalLM, init_params
from hymba_jax.train.metrics import flops_per_token


# The initial parameters come from an 'unsafe_rbg' key, whose RngBitGenerator XLA compiles faster than
# threefry's expansion (benchmarks/init.py; on the GPU the init's compile, not its run, is what costs).
# The values are as random; only their stream differs.
INIT_KEY = jax.random.key(0, impl="unsafe_rbg")


def model_config(name: str, scan: str, attention: str, remat: str) -> HymbaConfig:
    numerics = dict(dtype="bfloat16", param_dtype="float32", scan_backend=scan, attention_backend=attention,
                    remat=remat)
    if name == "hymba":
        return hymba_1p5b(**numerics)
    if name == "llama":
        return llama_style(2048, 32, 16, 4, 5504, vocab_size=32001, **numerics)
    raise SystemExit(f"unknown model {name!r}: 'hymba' or 'llama'")


def run(spec: str, peak: float, steps: int, breakdown: bool, profile_dir: str | None) -> dict:
    name, scan, attention, remat, seq, batch = spec.split(":")
    seq, batch = int(seq), int(batch)
    cfg = model_config(name, scan, attention, remat)
    model = HymbaForCausalLM(cfg)
    clock = time.perf_counter()
    log = lambda msg: print(f"{spec}: {msg} [{time.perf_counter() - clock:.0f} s]", flush=True)
    params = jax.block_until_ready(init_params(cfg, INIT_KEY))
    log("initialised")
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    optimizer = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = jax.jit(optimizer.init)(params)
    ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)

    def loss_fn(p, tokens):
        logits = model.apply({"params": p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    result = dict(run=spec, params=n_params)
    start = time.perf_counter()
    lowered = step.lower(params, opt_state, ids)
    result["lower_s"] = time.perf_counter() - start
    log("lowered")
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    result["compile_s"] = time.perf_counter() - start - result["lower_s"]
    log("compiled")
    result["temp_gib"] = mem.temp_size_in_bytes / 2 ** 30
    result["args_gib"] = mem.argument_size_in_bytes / 2 ** 30
    for _ in range(2):
        params, opt_state, loss = compiled(params, opt_state, ids)
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, ids)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch * seq
    flops = flops_per_token(cfg, seq)
    result.update(step_s=step_s, tokens_per_s=tokens / step_s, loss=float(loss),
                  mfu=flops * tokens / step_s / peak, flops_per_token=flops,
                  attention_flops_share=1 - 6.0 * n_params / flops)
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2 ** 30
    log(f"timed: {step_s:.3f} s per step")
    if profile_dir:
        run_dir = f"{profile_dir}/{spec.replace(':', '_')}"
        with jax.profiler.trace(run_dir, create_perfetto_trace=True):
            for _ in range(2):
                params, opt_state, loss = compiled(params, opt_state, ids)
            jax.block_until_ready(loss)
        result["profile"] = summarize(run_dir, steps=2)
        print_summary(result["profile"], 1e3 * step_s)
    if breakdown:
        for part, fn in (("forward", loss_fn), ("forward_backward", jax.value_and_grad(loss_fn))):
            part_compiled = jax.jit(fn).lower(params, ids).compile()
            result[f"{part}_s"] = timeit(part_compiled, params, ids, reps=1, samples=steps)
        cost = part_compiled.cost_analysis()            # of forward+backward, the last one
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        result["xla_flops_fwd_bwd"] = float(cost.get("flops", 0.0))
        result["xla_bytes_fwd_bwd"] = float(cost.get("bytes accessed", 0.0))
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=["hymba:pallas_gpu:cudnn:none:2048:8"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true")
    parser.add_argument("--profile", default=None, help="trace two steps of each run into this directory")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    peak = matmul_rate()
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, bf16 matmul {peak / 1e12:.0f} TFLOP/s",
          flush=True)
    results = []
    for spec in args.runs:
        try:
            result = run(spec, peak, args.steps, args.breakdown, args.profile)
        except Exception as e:  # noqa: BLE001 - an out-of-memory run is reported and the next one runs
            result = dict(run=spec, error=f"{type(e).__name__}: {str(e)[:400]}")
        gc.collect()
        jax.clear_caches()
        results.append(result)
        print(json.dumps(result), flush=True)
    print(f"\n{'run':42s} {'step s':>7s} {'tok/s':>8s} {'MFU':>6s} {'temp GiB':>9s} {'compile s':>9s}")
    for r in results:
        if "error" in r:
            print(f"{r['run']:42s} {r['error'][:80]}")
            continue
        print(f"{r['run']:42s} {r['step_s']:7.3f} {r['tokens_per_s']:8.0f} {100 * r['mfu']:5.1f}% "
              f"{r['temp_gib']:9.1f} {r['compile_s']:9.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=jax.devices()[0].device_kind, matmul_flops=peak, runs=results), fh, indent=2)


if __name__ == "__main__":
    main()
