"""Shared helpers of the training tests: a small offline corpus, its tokenizer and a tiny config.

Everything is built from the docstrings of a few standard-library modules (about 40 KB), so the tests
need no download and no default-corpus tokenizer training.
"""

from __future__ import annotations

import collections
import inspect
import json
import re
import textwrap
from pathlib import Path

from hymba_jax.data import train_sentencepiece

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(root: Path, **extra: str) -> dict:
    """The environment of train.py subprocesses: JAX's persistent compilation cache under `root`, shared
    by every subprocess of a test module so each program compiles once."""
    import os

    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               **extra)
    env.pop("XLA_FLAGS", None)
    return env


def write_small_corpus(directory: Path) -> tuple[Path, Path]:
    """(text file of blank-line separated documents, SentencePiece model of 512 pieces)."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = []
    for module in (json, inspect, textwrap, collections, re):
        for _, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80 and (inspect.isfunction(obj) or inspect.isclass(obj)):
                docs.append(inspect.cleandoc(doc).replace("\n\n", "\n"))
    text = directory / "corpus.txt"
    text.write_text("\n\n".join(docs) + "\n")
    model = directory / "spm.model"
    model.write_bytes(train_sentencepiece(docs, 512))
    return text, model


# A 2-layer hybrid model (one global layer, one sliding-window layer) that compiles in seconds.
SMALL_MODEL = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, qk_head_dim=16, v_head_dim=32,
                   d_inner=64, intermediate_size=64, d_state=4, dt_rank=4, num_meta_tokens=2,
                   sliding_window=8, global_layers=(0,), kv_reuse_groups=())


def small_overrides(corpus: Path, tokenizer: Path, cache: Path) -> dict:
    """Dotted config overrides (as for train.py's command line) of a seconds-long training run."""
    overrides = {f"model.{k}": v for k, v in SMALL_MODEL.items()}
    overrides.update({
        "data.source": "files", "data.files": [str(corpus)], "data.tokenizer": str(tokenizer),
        "data.cache_dir": str(cache), "data.val_fraction": 0.1, "seq_len": 32, "batch_size": 4,
        "num_steps": 8, "optimizer.warmup_steps": 2, "log_every": 1, "eval_every": 0, "eval_batches": 2,
        "checkpoint_every": 2, "keep_checkpoints": 2,
        "compilation_cache_dir": "",      # in-process runs stay out of ~/.cache; subprocesses: subprocess_env
    })
    return overrides


def small_run(root: Path, num_steps: int) -> dict:
    """Overrides of a small run whose corpus, tokenizer and data cache live under `root`, validated on one
    batch (the subprocess tests compare losses, not validation quality)."""
    corpus, tokenizer = write_small_corpus(root / "corpus")
    overrides = small_overrides(corpus, tokenizer, root / "cache")
    overrides.update({"num_steps": num_steps, "eval_batches": 1})
    return overrides


def apply_overrides(config, overrides: dict):
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = tuple(value) if isinstance(node[leaf], tuple) and value is not None else value
    return config


def config_file(directory: Path, overrides: dict) -> Path:
    """A config file for train.py: configs/tiny.py with `overrides` applied."""
    path = directory / "small_config.py"
    path.write_text(textwrap.dedent(f"""
        import importlib.util, json
        spec = importlib.util.spec_from_file_location("tiny", {str(REPO / 'configs' / 'tiny.py')!r})
        tiny = importlib.util.module_from_spec(spec); spec.loader.exec_module(tiny)
        import sys; sys.path.insert(0, {str(REPO / 'tests')!r})
        from train_testing import apply_overrides

        def get_config():
            return apply_overrides(tiny.get_config(), json.loads({json.dumps(json.dumps(overrides))}))
        """))
    return path
