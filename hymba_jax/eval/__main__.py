"""`python -m hymba_jax.eval --checkpoint DIR --tasks arc_easy,piqa [--data_dir D] [--limit N]`: runs
tasks and writes one JSON of results and a readable table (see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import os

from hymba_jax.eval import PAPER_SUITE, Scorer, evaluate, format_table
from hymba_jax.loading import load_model, load_tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hymba_jax.eval", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="HF checkpoint dir, training workdir, or preset:NAME")
    p.add_argument("--tokenizer", default="", help="'' (the checkpoint's own), 'ascii' or a .model path")
    p.add_argument("--tasks", default=",".join(PAPER_SUITE), help="comma-separated task names")
    p.add_argument("--data_dir", default=None, help="folder of <task>.jsonl files (else the HF datasets cache)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    p.add_argument("--num_fewshot", default="", help="overrides, e.g. mmlu=0,squad_completion=0")
    p.add_argument("--dtype", default="float32", help="compute dtype (the weights stay fp32)")
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--tokens_per_batch", type=int, default=8192)
    p.add_argument("--no_bos", action="store_true", help="do not start contexts with BOS")
    p.add_argument("--output", default="eval_results.json")
    args = p.parse_args(argv)
    shots = {k: int(v) for k, v in (kv.split("=") for kv in args.num_fewshot.split(",") if kv)}
    config, params = load_model(args.checkpoint, dtype=args.dtype)
    scorer = Scorer(config, params, max_length=args.max_length, tokens_per_batch=args.tokens_per_batch)
    tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
    results = evaluate(scorer, tokenizer, [t for t in args.tasks.split(",") if t], data_dir=args.data_dir,
                       limit=args.limit, num_fewshot=shots, add_bos=not args.no_bos)
    results["config"].update(checkpoint=args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    print(format_table(results))
    print(f"results written to {args.output}")


if __name__ == "__main__":
    main()
