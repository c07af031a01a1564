"""The paper's benchmark suite end to end on synthetic subsets: requests/s of the scorer and generator.

Writes synthetic documents in each task's JSONL schema (random words, lengths like the real tasks),
loads a model (default: the 1.5B preset with random weights, bf16), compiles each bucket once (timed
separately) and runs `hymba_jax.downstream.evaluate` over all tasks with the character tokenizer.

    python benchmarks/eval_suite.py --checkpoint preset:hymba_1p5b --docs 32 --output runs/eval_suite.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import jax

from hymba_jax.downstream import AsciiTokenizer, PAPER_SUITE, Scorer, evaluate, format_table
from hymba_jax.loading import load_model

LEXICON_SEED = 7


def make_task_files(directory: str, docs: int, seed: int = 0) -> None:
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lexicon = ["".join(rnd.choice(letters) for _ in range(rnd.randint(2, 8))) for _ in range(500)]

    def words(n: int) -> str:
        return " ".join(rnd.choice(lexicon) for _ in range(n))

    def arc(n_words):
        return {"question": words(n_words) + "?", "choices": {"text": [words(4) for _ in range(4)],
                "label": list("ABCD")}, "answerKey": rnd.choice("ABCD")}

    subjects = ["college_physics", "world_history", "abstract_algebra"]

    def mmlu(subject):
        return {"question": words(25) + "?", "subject": subject, "choices": [words(5) for _ in range(4)],
                "answer": rnd.randrange(4)}

    makers = {
        "arc_easy": lambda: arc(20),
        "arc_challenge": lambda: arc(25),
        "piqa": lambda: {"goal": words(10) + ".", "sol1": words(20), "sol2": words(20), "label": rnd.randrange(2)},
        "hellaswag": lambda: {"activity_label": words(2), "ctx_a": words(40) + ".", "ctx_b": words(3),
                              "endings": [words(20) for _ in range(4)], "label": str(rnd.randrange(4))},
        "winogrande": lambda: {"sentence": words(10) + " _ " + words(10) + ".", "option1": words(2),
                               "option2": words(2), "answer": rnd.choice("12")},
        "mmlu": lambda: mmlu(rnd.choice(subjects)),
        "squad_completion": lambda: {"text": words(150), "value": words(3)},
        "lambada_openai": lambda: {"text": words(70)},
    }
    for name, make in makers.items():
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            for _ in range(docs):
                f.write(json.dumps(make()) + "\n")
    with open(os.path.join(directory, "mmlu.fewshot.jsonl"), "w") as f:
        for subject in subjects:
            for _ in range(5):
                f.write(json.dumps(mmlu(subject)) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="preset:hymba_1p5b")
    p.add_argument("--dtype", default="bfloat16", help="weights and compute (as measured in docs/performance.md)")
    p.add_argument("--scan_backend", default="", help="model scan_backend ('' = the checkpoint's)")
    p.add_argument("--attention_backend", default="", help="model attention_backend ('' = the checkpoint's)")
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--tasks", default=",".join(PAPER_SUITE))
    p.add_argument("--max_length", type=int, default=2048)
    p.add_argument("--buckets", default="512,1024,2048")
    p.add_argument("--tokens_per_batch", type=int, default=32768)
    p.add_argument("--output", default="")
    args = p.parse_args()
    start = time.perf_counter()
    backends = dict(scan_backend=args.scan_backend, attention_backend=args.attention_backend)
    config, params = load_model(args.checkpoint, args.dtype, param_dtype=args.dtype,
                                **{k: v for k, v in backends.items() if v})
    jax.block_until_ready(params)
    load_s = time.perf_counter() - start
    scorer = Scorer(config, params, max_length=args.max_length, tokens_per_batch=args.tokens_per_batch,
                    buckets=[int(b) for b in args.buckets.split(",")])
    compile_s = {}
    for bucket in scorer.buckets:  # one compile per bucket, timed apart from the evaluation
        t = time.perf_counter()
        scorer.loglikelihood([([1] * (bucket - 1), [5])])
        compile_s[bucket] = round(time.perf_counter() - t, 1)
        print(f"bucket {bucket}: compiled and ran in {compile_s[bucket]} s", flush=True)
    with tempfile.TemporaryDirectory() as data_dir:
        make_task_files(data_dir, args.docs)
        t = time.perf_counter()
        results = evaluate(scorer, AsciiTokenizer(), args.tasks.split(","), data_dir=data_dir)
        total_s = time.perf_counter() - t
    n_requests = sum(r["num_requests"] for r in results["results"].values())
    results["benchmark"] = {
        "device": jax.devices()[0].device_kind, "checkpoint": args.checkpoint, "dtype": args.dtype,
        "scan_backend": config.scan_backend, "attention_backend": config.attention_backend,
        "docs_per_task": args.docs, "load_seconds": round(load_s, 1), "compile_seconds": compile_s,
        "suite_seconds": round(total_s, 1), "requests": n_requests, "requests_per_s": n_requests / total_s,
        "num_params": sum(x.size for x in jax.tree.leaves(params)),
    }
    print(format_table(results))
    print(json.dumps(results["benchmark"]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
