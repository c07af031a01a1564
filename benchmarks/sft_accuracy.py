"""Accuracy of a fine-tuned model on held-out conversations, before and after fine-tuning.

    python train.py --config configs/tiny_sft.py --workdir /tmp/hymba-tiny-sft
    python benchmarks/sft_accuracy.py --workdir /tmp/hymba-tiny-sft [--limit 300]

'after' is the workdir's latest checkpoint; 'before' is the model the run started from: its init_from_hf
checkpoint, or the random initialisation of its seed (init_params with the same key as the run). The
questions are the first --limit records of the run's validation split (never trained on: the split hashes
the messages), everything but the last assistant message asked through the run's chat template; an answer
is right when the greedy reply (up to the end-of-turn eos), stripped, equals the record's last assistant
message stripped. With the generated tasks (configs/tiny_sft.py) accuracy is also given per task.
Prints the result and writes it to <workdir>/sft_accuracy.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import jax

from hymba_jax.data import chat
from hymba_jax.data.sources import open_documents
from hymba_jax.infer.engine import Generator
from hymba_jax.loading import load_chat_template, load_model, load_tokenizer
from hymba_jax.model import init_params
from hymba_jax.checkpoint import read_workdir_config


def accuracy(config, params, prompts: list[list[int]], answers: list[str], tasks: list[str], tokenizer,
             max_new_tokens: int) -> dict:
    """{'accuracy', 'per_task': {task: accuracy}, 'examples': first three (question ids decoded, reply)}."""
    replies = Generator(config, params).generate(prompts, max_new_tokens, stop_ids=[tokenizer.eos_id])
    right = collections.defaultdict(list)
    for reply, answer, task in zip(replies, answers, tasks):
        right[task].append(tokenizer.decode(reply).strip() == answer.strip())
    every = [r for rs in right.values() for r in rs]
    return {"accuracy": sum(every) / len(every), "per_task": {t: sum(r) / len(r) for t, r in sorted(right.items())},
            "examples": [tokenizer.decode(reply) for reply in replies[:3]]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a fine-tuning run's workdir (data.format='chat')")
    parser.add_argument("--limit", type=int, default=300, help="held-out conversations to ask")
    args = parser.parse_args()
    train_config = read_workdir_config(args.workdir)
    if train_config.data.get("format") != "chat":
        raise SystemExit(f"{args.workdir}: trained with data.format={train_config.data.get('format', 'text')!r}; "
                         "this benchmark asks the held-out conversations of a data.format='chat' run")
    tokenizer = load_tokenizer(args.workdir)
    template = load_chat_template(args.workdir, tokenizer)
    records = [json.loads(d) for d in list(open_documents(train_config.data, "validation"))[: args.limit]]
    prompts = [chat.prompt_ids(tokenizer, template, r["messages"][:-1]) for r in records]
    answers = [r["messages"][-1]["content"] for r in records]
    tasks = [r.get("task", "all") for r in records]
    max_new_tokens = max(len(tokenizer.encode_exact(a)) for a in answers) + 4

    start = time.perf_counter()
    config, params = load_model(args.workdir)
    if train_config.init_from_hf:
        base_config, base_params = load_model(train_config.init_from_hf)
    else:
        base_config, base_params = config, init_params(config, jax.random.key(train_config.seed))
    result = {"workdir": args.workdir, "questions": len(records), "template": template.origin,
              "before": accuracy(base_config, base_params, prompts, answers, tasks, tokenizer, max_new_tokens),
              "after": accuracy(config, params, prompts, answers, tasks, tokenizer, max_new_tokens),
              "expected_examples": answers[:3]}
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=2))
    (Path(args.workdir) / "sft_accuracy.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
