"""The data settings of the training program: the `config.data` sub-dict and its validation.

Every error names the offending key as `data.<key>` so a mistyped config file is fixed without
reading this module.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

SOURCES = ("default", "tfds", "files", "tasks")
FORMATS = ("text", "chat")


class DataConfigError(ValueError):
    """A data setting that cannot work (the message names the key)."""


def default_data_config() -> ml_collections.ConfigDict:
    """The data sub-dict that `configs/*.py` embed as `config.data` and override field by field."""
    config = ml_collections.ConfigDict()
    # Where documents come from: 'default' (offline stdlib-docstring corpus), 'tfds', 'files' or 'tasks'
    # (generated instruction examples with checkable answers, hymba_jax/data/tasks.py; format 'chat').
    config.source = "default"
    # 'text': documents, every token a target (pretraining). 'chat': conversation records (.jsonl, schema in
    # hymba_jax/data/chat.py) rendered by a chat template, loss on assistant tokens only (fine-tuning).
    config.format = "text"
    # format 'chat': '' = the chat_template of the tokenizer_config.json beside data.tokenizer, else the
    # default template; 'default'; or a .jinja file / tokenizer_config.json / its directory.
    config.chat_template = ""
    # source 'tasks': how many examples to generate.
    config.task_examples = 20000
    # TFDS: dataset name (e.g. 'lm1b', 'c4/en', 'tiny_shakespeare'), data_dir ('' = TFDS default),
    # the split names used for our 'train' and 'validation' splits, and whether a missing dataset may
    # be downloaded and prepared (as ArrayRecord) at run time.
    config.tfds_name = ""
    config.tfds_data_dir = ""
    config.tfds_train_split = "train"
    config.tfds_validation_split = "validation"
    config.tfds_download = False
    # The text feature of TFDS examples, the field of JSONL lines and the column of Parquet files.
    config.text_key = "text"
    # Local files (paths or glob patterns) of .txt, .jsonl or .parquet documents.
    config.files = ()   # a tuple, so that --config.data.files='("a.txt",)' works on the command line
    # Fraction of documents (chosen by a hash of their text) held out for validation ('default', 'files').
    config.val_fraction = 0.02
    # '' trains a SentencePiece model of `vocab_size` pieces on the default corpus; else a .model path.
    config.tokenizer = ""
    config.vocab_size = 4096
    # '' means $HYMBA_JAX_CACHE, else ~/.cache/hymba_jax.
    config.cache_dir = ""
    # First-fit packing bins: more bins waste less padding but hold more documents in flight.
    config.packing_bins = 64
    # Processes that prepare batches in parallel (0 = in the main process).
    config.num_workers = 0
    return config


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raises `DataConfigError` naming the first key of `config` that cannot work."""
    expected = set(default_data_config().keys())
    unknown = sorted(set(config.keys()) - expected)
    missing = sorted(expected - set(config.keys()))
    if unknown or missing:
        raise DataConfigError(f"data config: unknown keys {unknown}, missing keys {missing}")
    if config.source not in SOURCES:
        raise DataConfigError(f"data.source={config.source!r}: expected one of {SOURCES}")
    if config.format not in FORMATS:
        raise DataConfigError(f"data.format={config.format!r}: expected one of {FORMATS}")
    if config.format == "chat" and config.source not in ("files", "tasks"):
        raise DataConfigError(f"data.source={config.source!r}: data.format='chat' reads conversation records "
                              "from 'files' (.jsonl) or the generated 'tasks'")
    if config.chat_template not in ("", "default") and not Path(config.chat_template).expanduser().exists():
        raise DataConfigError(f"data.chat_template={config.chat_template!r}: no such file or directory; give a "
                              ".jinja file, a tokenizer_config.json (or its directory), 'default', or ''")
    if config.source == "tasks" and config.format != "chat":
        raise DataConfigError("data.source='tasks' holds conversations: set data.format='chat'")
    if config.source == "tasks" and config.task_examples < 1:
        raise DataConfigError(f"data.task_examples={config.task_examples}: must be at least 1")
    if config.source == "tfds" and not config.tfds_name:
        raise DataConfigError("data.tfds_name is empty but data.source='tfds': name a TFDS dataset, e.g. 'lm1b'")
    if config.source == "files" and not list(config.files):
        raise DataConfigError("data.files is empty but data.source='files': list paths or globs of .txt/.jsonl/.parquet")
    if not config.text_key:
        raise DataConfigError("data.text_key is empty: name the text feature/field/column, e.g. 'text'")
    if not 0.0 < config.val_fraction < 1.0:
        raise DataConfigError(f"data.val_fraction={config.val_fraction}: must lie strictly between 0 and 1")
    if config.tokenizer and not Path(config.tokenizer).expanduser().is_file():
        raise DataConfigError(
            f"data.tokenizer={config.tokenizer!r}: no such file; give a SentencePiece .model path "
            "or '' to train one on the default corpus"
        )
    if not config.tokenizer and not 300 <= config.vocab_size <= 65536:
        raise DataConfigError(
            f"data.vocab_size={config.vocab_size}: a trained tokenizer needs 300..65536 pieces "
            "(256 byte pieces plus specials and merges)"
        )
    if config.packing_bins < 1:
        raise DataConfigError(f"data.packing_bins={config.packing_bins}: must be at least 1")
    if config.num_workers < 0:
        raise DataConfigError(f"data.num_workers={config.num_workers}: must be 0 or more")


def cache_dir(config: ml_collections.ConfigDict) -> Path:
    """The directory that holds prepared corpora and trained tokenizers."""
    configured = config.cache_dir or os.environ.get("HYMBA_JAX_CACHE") or "~/.cache/hymba_jax"
    return Path(configured).expanduser()
