"""Recall of a tiny Hymba vs attention-only and SSM-only models trained the same way on MQAR.

Each model (same widths and layer layout; `layer_kind` hybrid / attention / ssm) trains for --steps steps
of AdamW on MQAR sequences (loss on the value positions only), then reports MQAR accuracy at the training
length and at 2x, and needle-in-a-haystack accuracy at lengths past the sliding window.

    python benchmarks/eval_recall.py --steps 600 --output runs/recall.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hymba_jax.config import hymba_tiny
from hymba_jax.downstream.recall import RecallVocab, make_accuracy_fn, mqar_batch, needle_batch, recall_accuracy
from hymba_jax.model.lm import HymbaForCausalLM, init_params


def tiny_config(kind: str, window: int, layers: int, vocab_size: int):
    """hidden 64, the last layer global, the others sliding-window (Hymba's layout at tiny scale)."""
    return hymba_tiny(vocab_size=vocab_size, hidden_size=64, num_layers=layers, num_heads=4, num_kv_heads=2,
                      qk_head_dim=16, v_head_dim=32, intermediate_size=128, d_inner=128, d_state=8, dt_rank=8,
                      num_meta_tokens=4, sliding_window=window, global_layers=(layers - 1,), kv_reuse_groups=(),
                      max_position_embeddings=1024, orig_max_position_embeddings=1024, rope_type="default",
                      layer_kind=kind)


def train(config, vocab, args) -> tuple[dict, list[float]]:
    model = HymbaForCausalLM(config)
    params = init_params(config, jax.random.key(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(50, args.steps // 4), args.steps, args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, inputs, targets, weights):
        def loss_fn(p):
            logits = model.apply({"params": p}, inputs)
            nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
            return jnp.sum(nll * weights) / jnp.sum(weights)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    losses = []
    for i in range(args.steps):
        b = mqar_batch(rng, vocab, args.batch, args.length, args.pairs, args.pairs)
        params, opt_state, loss = step(params, opt_state, b.inputs, b.targets, b.weights)
        losses.append(float(loss))
        if (i + 1) % max(1, args.steps // 10) == 0:
            print(f"  {config.layer_kind} step {i + 1}: loss {np.mean(losses[-50:]):.3f}", flush=True)
    return params, losses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--keys", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kinds", default="hybrid,attention,ssm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_batch", type=int, default=256)
    p.add_argument("--output", default="")
    args = p.parse_args()
    vocab = RecallVocab(2 * args.keys + 16, num_keys=args.keys, num_values=args.keys)
    report = {"device": str(jax.devices()[0].device_kind), "args": vars(args), "models": {}}
    for kind in args.kinds.split(","):
        config = tiny_config(kind, args.window, args.layers, vocab.vocab_size)
        start = time.perf_counter()
        params, losses = train(config, vocab, args)
        train_s = time.perf_counter() - start
        acc_fn = make_accuracy_fn(config)
        rng = np.random.default_rng(10_000 + args.seed)
        row = {"train_seconds": round(train_s, 1), "final_loss": float(np.mean(losses[-20:]))}
        for length in (args.length, 2 * args.length):
            row[f"mqar_acc@{length}"] = recall_accuracy(
                acc_fn, params, mqar_batch(rng, vocab, args.eval_batch, length, args.pairs, args.pairs))
        for length in (4 * args.window, 16 * args.window):
            accs = [recall_accuracy(acc_fn, params, needle_batch(rng, vocab, args.eval_batch, length, d))
                    for d in (0.0, 0.25, 0.5, 0.75)]
            row[f"needle_acc@{length}"] = float(np.mean(accs))
        report["models"][kind] = row
        print(kind, json.dumps(row), flush=True)
    print(f"chance: {1 / vocab.num_values:.3f}; sliding window {args.window}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
