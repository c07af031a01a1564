"""Data for pretraining and fine-tuning: sources (default corpus, TFDS, local files, generated tasks),
tokenizer, chat conversations (chat.py), packing, Grain pipeline.

Typical use by the training program:

    tokenizer = load_tokenizer(config.data)
    train = make_dataset(config.data, tokenizer, split="train", global_batch_size=B, seq_len=L, seed=seed)
    batches = iter(train)   # dicts: inputs, targets, segment_ids (int32), weights (float32), (B/hosts, L)

This package never imports the model or the training code.
"""

from hymba_jax.data.checkpointing import iterator_restore_args, iterator_save_args
from hymba_jax.data.config import DataConfigError, default_data_config, validate_data_config
from hymba_jax.data.pipeline import make_dataset
from hymba_jax.data.sources import open_documents
from hymba_jax.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "DataConfigError",
    "Tokenizer",
    "default_data_config",
    "iterator_restore_args",
    "iterator_save_args",
    "load_tokenizer",
    "make_dataset",
    "open_documents",
    "train_sentencepiece",
    "validate_data_config",
]
