"""A generated instruction set whose answers can be checked: the offline fine-tuning example's data.

Three tasks, drawn uniformly from `random.Random(0)`:

* add:    "What is 47 + 85?"                -> "132"            (a, b in 0..99)
* larger: "Which is larger, 318 or 92?"     -> "318"            (a != b in 0..999)
* repeat: "Repeat after me: kol bex"        -> "kol bex"        (two random 3-letter lowercase words)

Each example is one user and one assistant message, stored like a `.jsonl` record (hymba_jax/data/chat.py)
with "source" "tasks:<index>". The train/validation split hashes the messages, so a question in the
validation split never occurs in training (the held-out tasks of benchmarks/sft_accuracy.py).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Iterator
from pathlib import Path

from hymba_jax.data import chat, records

GENERATED_TASKS = ("add", "larger", "repeat")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(3))


def example(rng: random.Random) -> tuple[str, str, str]:
    """(task, question, answer) of one generated example."""
    task = rng.choice(GENERATED_TASKS)
    if task == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return task, f"What is {a} + {b}?", str(a + b)
    if task == "larger":
        a, b = rng.sample(range(1000), 2)
        return task, f"Which is larger, {a} or {b}?", str(max(a, b))
    words = f"{_word(rng)} {_word(rng)}"
    return task, f"Repeat after me: {words}", words


def task_records(count: int) -> Iterator[str]:
    """`count` prepared records (JSON strings), the same for the same count."""
    rng = random.Random(0)
    for index in range(count):
        task, question, answer = example(rng)
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield json.dumps({"messages": messages, "source": f"tasks:{index}", "task": task})


def prepare_tasks(count: int, cache_dir: Path, val_fraction: float) -> Path:
    """The prepared corpus of `count` generated examples, built on first use (well under a second)."""
    key = records.fingerprint("tasks-v1", count, val_fraction)
    return records.ensure_prepared(cache_dir / "corpora" / f"tasks-{key}", lambda: task_records(count),
                                   val_fraction, split_text=chat.messages_text)
