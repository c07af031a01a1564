"""Where task documents come from: local JSONL files, or a Hugging Face `datasets` cache.

Local files: `<data_dir>/<task>.jsonl` holds the evaluation documents (schemas in tasks.py) and
`<data_dir>/<task>.fewshot.jsonl`, when present, the few-shot pool (MMLU's dev split; for other tasks the
eval documents themselves are the pool, as the harness does when a task has no training split). Without
local files, the Hugging Face dataset the harness uses is read from the local `datasets` cache with
HF_DATASETS_OFFLINE=1: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

from hymba_jax.downstream.tasks import Task


class TaskData(NamedTuple):
    docs: list[dict]            # evaluation documents, after the task's preprocessing
    fewshot_pool: list[dict]    # few-shot candidates, preprocessed
    pool_is_eval_split: bool


def read_jsonl(path: Path) -> list[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
    return docs


def _hf_split(task: Task, split: str) -> list[dict]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"{task.name}: no local JSONL file and the `datasets` package is not "
                                "installed; write <data_dir>/{task.name}.jsonl (schema in tasks.py)") from None
    path, name = task.hf_dataset
    try:
        return [dict(row) for row in datasets.load_dataset(path, name, split=split)]
    except Exception as e:  # datasets raises many types for a missing cache entry
        raise FileNotFoundError(f"{task.name}: no local file and {path}/{name} split {split!r} is not in the "
                                f"Hugging Face cache ({type(e).__name__}: {e}); write "
                                f"<data_dir>/{task.name}.jsonl (schema in hymba_jax/downstream/tasks.py)") from None


def load_task_data(task: Task, data_dir: Optional[str | os.PathLike] = None, limit: Optional[int] = None
                   ) -> TaskData:
    """The task's documents (the first `limit` when given) and few-shot pool."""
    local = Path(data_dir) / f"{task.name}.jsonl" if data_dir else None
    if local is not None and local.is_file():
        docs = read_jsonl(local)
        fewshot_file = local.with_suffix(".fewshot.jsonl")
        pool = read_jsonl(fewshot_file) if fewshot_file.is_file() else None
    else:
        docs = _hf_split(task, task.eval_split)
        pool = _hf_split(task, task.fewshot_split) if task.fewshot_split and task.num_fewshot else None
    if not docs:
        raise ValueError(f"{task.name}: no documents found")
    docs = [task.process(d) for d in docs]
    pool_is_eval = pool is None
    pool = docs if pool is None else [task.process(d) for d in pool]
    return TaskData(docs[:limit] if limit else docs, pool, pool_is_eval)
