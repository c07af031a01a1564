"""One entry point from `config.data` to the documents of a split, whatever the source."""

from __future__ import annotations

import grain
import ml_collections

from hymba_jax.data import config as data_config
from hymba_jax.data import chat, default_corpus, local_files, records, tasks, tfds_source


def open_documents(config: ml_collections.ConfigDict, split: str) -> grain.MapDataset[str]:
    """The documents of `split` ('train' or 'validation') of the configured source, as strings.

    'default', 'files' and 'tasks' sources are prepared into the cache directory on first use; a TFDS
    source maps our split names to `data.tfds_train_split` / `data.tfds_validation_split`. With
    `data.format='chat'` a document is a checked conversation record (JSON, hymba_jax/data/chat.py).
    """
    data_config.validate_data_config(config)
    if split not in records.SPLITS:
        raise ValueError(f"split={split!r}: expected one of {records.SPLITS}")
    if config.source == "tfds":
        documents = tfds_source.open_tfds_texts(
            config.tfds_name,
            config.tfds_train_split if split == "train" else config.tfds_validation_split,
            data_dir=config.tfds_data_dir,
            text_key=config.text_key,
            download=config.tfds_download,
        )
        if len(documents) == 0:
            raise ValueError(f"TFDS dataset {config.tfds_name!r} split for {split!r} holds no documents")
        return documents
    cache = data_config.cache_dir(config)
    if config.source == "tasks":
        corpus = tasks.prepare_tasks(config.task_examples, cache, config.val_fraction)
    elif config.source == "files" and config.format == "chat":
        corpus = chat.prepare_chat_files(list(config.files), cache, config.val_fraction)
    elif config.source == "files":
        corpus = local_files.prepare_files(list(config.files), config.text_key, cache, config.val_fraction)
    else:
        corpus = default_corpus.prepare_default_corpus(cache, config.val_fraction)
    return records.read_split(corpus, split)
