"""The Grain input pipeline: documents of a split -> this host's packed batches.

Order of operations, and why:
1. shard the random-access documents across hosts (each host reads only its own documents);
2. shuffle them globally with `seed` (a permutation, no buffer) and repeat, reshuffled each epoch;
3. tokenize (in Grain's reader threads), cut documents into row-length pieces, first-fit pack
   (`data.format='chat'`: render and tokenize each conversation into one example with its loss
   weights, truncated by the rule of hymba_jax/data/chat.py, never cut);
4. batch `global_batch_size // shard_count` rows; a last partial batch is completed with
   all-padding rows (weights 0), so a finite pass drops no token.
The iterator's `get_state()` / `set_state()` capture all of it (see `checkpointing.py`). With
`data.num_workers > 0` each worker process packs its own slice of the documents: the same tokens in
another (still deterministic) order than in-process.
"""

from __future__ import annotations

import functools

import grain
import ml_collections

from hymba_jax.data import chat, packing, sources
from hymba_jax.data.tokenizer import Tokenizer


def make_dataset(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    *,
    split: str,
    global_batch_size: int,
    seq_len: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> grain.IterDataset[dict]:
    """This host's batches of `split`: dicts of 'inputs', 'targets', 'segment_ids' int32 and 'weights' float32,
    each (global_batch_size // shard_count, seq_len).

    `num_epochs=None` repeats forever (training); `num_epochs=1, shuffle=False` is one deterministic
    pass (evaluation). `shard_options` defaults to this JAX process's shard, dropping the few
    remainder documents so that every host gets the same number of documents.
    """
    shard = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if global_batch_size % shard.shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by the {shard.shard_count} data shards"
        )
    rows_per_host = global_batch_size // shard.shard_count
    documents = _shard(sources.open_documents(config, split), shard)
    if shuffle:
        documents = documents.shuffle(seed)
    documents = documents.repeat(num_epochs)
    if config.format == "chat":
        examples = chat.ConversationToExample(tokenizer, chat.load_template(config, tokenizer), seq_len)
        pieces, features = documents.map(examples).to_iter_dataset(), chat.FEATURES
    else:
        pieces = grain.experimental.FlatMapIterDataset(
            documents.map(tokenizer.encode).to_iter_dataset(),
            packing.DocumentToPieces(tokenizer.bos_id, tokenizer.eos_id, seq_len),
        )
        features = packing.PACKED_FEATURES
    rows = packing.pack_pieces(pieces, seq_len=seq_len, num_bins=config.packing_bins, seed=seed,
                               shuffle_bins=shuffle, features=features)
    batches = rows.batch(
        rows_per_host, batch_fn=functools.partial(grain.experimental.batch_and_pad, batch_size=rows_per_host)
    ).map(functools.partial(packing.to_model_batch, pad_id=tokenizer.pad_id))
    if config.num_workers:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return batches


def _shard(documents: grain.MapDataset, shard: grain.sharding.ShardOptions) -> grain.MapDataset:
    """Every `shard_count`-th document from `shard_index` (strided, so ordered sources spread evenly)."""
    end = len(documents) - len(documents) % shard.shard_count if shard.drop_remainder else len(documents)
    if end <= shard.shard_index:
        raise ValueError(f"{len(documents)} documents cannot feed {shard.shard_count} data shards")
    return documents[shard.shard_index : end : shard.shard_count]
