"""The Grain pipeline: exact packing, batch format, host sharding, determinism and checkpointable state."""

import collections

from absl import flags

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_testing import data_cache_dir, data_config, segments, tokenizer  # noqa: F401  (fixtures)

from hymba_jax.data import iterator_restore_args, iterator_save_args, make_dataset, open_documents
from hymba_jax.data.packing import DocumentToPieces

SEQ_LEN = 32
LONG_DOCUMENT = " ".join(f"word{i}" for i in range(400))  # Several rows long.


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("pipeline_files")
    texts = [f"Document {i} says: " + "short text. " * (i % 9) for i in range(60)] + [LONG_DOCUMENT]
    (data_dir / "docs.txt").write_text("\n\n".join(texts))
    return data_config(data_dir / "cache", source="files", files=[str(data_dir / "docs.txt")], packing_bins=8)


def expected_pieces(config, tokenizer, split="train"):  # noqa: F811
    to_pieces = DocumentToPieces(tokenizer.bos_id, tokenizer.eos_id, SEQ_LEN)
    return collections.Counter(
        (tuple(piece["inputs"]), tuple(piece["targets"]))
        for text in open_documents(config, split)
        for piece in to_pieces.flat_map(tokenizer.encode(text))
    )


def one_pass(config, tokenizer, **kwargs):  # noqa: F811
    kwargs = dict(split="train", global_batch_size=4, seq_len=SEQ_LEN, seed=3, num_epochs=1) | kwargs
    return list(make_dataset(config, tokenizer, **kwargs))


def test_document_pieces_shift_and_split():
    to_pieces = DocumentToPieces(bos_id=1, eos_id=2, seq_len=4)
    pieces = to_pieces.flat_map([10, 11, 12, 13, 14])
    assert [p["inputs"].tolist() for p in pieces] == [[1, 10, 11, 12], [13, 14]]
    assert [p["targets"].tolist() for p in pieces] == [[10, 11, 12, 13], [14, 2]]
    assert to_pieces.flat_map([]) == []


def test_every_target_appears_once_in_its_segment(config, tokenizer):  # noqa: F811
    batches = one_pass(config, tokenizer)
    found = collections.Counter(segment for batch in batches for segment in segments(batch))
    assert found == expected_pieces(config, tokenizer)
    assert any(len(inputs) == SEQ_LEN for inputs, _ in found)  # The long document filled whole rows.


def test_batch_format_and_padding(config, tokenizer):  # noqa: F811
    for batch in one_pass(config, tokenizer):
        assert set(batch) == {"inputs", "targets", "segment_ids", "weights"}
        assert all(batch[k].shape == (4, SEQ_LEN) and batch[k].dtype == np.int32 for k in ("inputs", "targets", "segment_ids"))
        assert batch["weights"].dtype == np.float32
        padding = batch["segment_ids"] == 0
        np.testing.assert_array_equal(batch["weights"], (~padding).astype(np.float32))
        assert (batch["inputs"][padding] == tokenizer.pad_id).all() and (batch["targets"][padding] == tokenizer.pad_id).all()
        for row in batch["segment_ids"]:  # Segments are numbered 1, 2, ... in order, padding at the end.
            ids = row[row > 0]
            assert (np.diff(ids) >= 0).all() and ids[0] == 1 and set(ids) == set(range(1, ids[-1] + 1))
            assert not row[len(ids) :].any()


def test_hosts_read_disjoint_shards(config, tokenizer):  # noqa: F811
    per_host = [
        one_pass(config, tokenizer, shard_options=grain.sharding.ShardOptions(index, 2, drop_remainder=True))
        for index in range(2)
    ]
    assert all(batch["inputs"].shape == (2, SEQ_LEN) for batches in per_host for batch in batches)
    found = [collections.Counter(s for batch in batches for s in segments(batch)) for batches in per_host]
    everything = expected_pieces(config, tokenizer)
    assert found[0] + found[1] <= everything  # No piece is read by both hosts...
    assert sum((everything - found[0] - found[1]).values()) <= 13  # ...and only the remainder document is dropped.


def test_same_seed_same_batches_other_seed_other_batches(config, tokenizer):  # noqa: F811
    first, again, other = (
        next(iter(make_dataset(config, tokenizer, split="train", global_batch_size=4, seq_len=SEQ_LEN, seed=seed)))
        for seed in (0, 0, 1)
    )
    np.testing.assert_array_equal(first["inputs"], again["inputs"])
    assert not np.array_equal(first["inputs"], other["inputs"])


def test_training_repeats_forever(config, tokenizer):  # noqa: F811
    iterator = iter(make_dataset(config, tokenizer, split="train", global_batch_size=4, seq_len=SEQ_LEN))
    epoch_batches = len(one_pass(config, tokenizer))
    assert len([next(iterator) for _ in range(3 * epoch_batches)]) == 3 * epoch_batches


def test_validation_is_one_finite_pass(config, tokenizer):  # noqa: F811
    batches = one_pass(config, tokenizer, split="validation", shuffle=False)
    found = collections.Counter(s for batch in batches for s in segments(batch))
    assert found == expected_pieces(config, tokenizer, "validation")


def assert_same_batches(first, second):
    for a, b in zip(first, second, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_state_restore_gives_identical_batches(config, tokenizer):  # noqa: F811
    dataset = make_dataset(config, tokenizer, split="train", global_batch_size=4, seq_len=SEQ_LEN, seed=5)
    iterator = iter(dataset)
    for _ in range(len(one_pass(config, tokenizer)) + 3):  # Into the second epoch.
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(10)]
    restored = iter(dataset)
    restored.set_state(state)
    assert_same_batches(expected, [next(restored) for _ in range(10)])


def test_orbax_checkpoint_round_trip(config, tokenizer, tmp_path):  # noqa: F811
    dataset = make_dataset(config, tokenizer, split="train", global_batch_size=4, seq_len=SEQ_LEN, seed=5)
    iterator = iter(dataset)
    for _ in range(7):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
        manager.save(7, args=ocp.args.Composite(data=iterator_save_args(iterator)))
        manager.wait_until_finished()
        expected = [next(iterator) for _ in range(5)]
        fresh = iter(dataset)
        restored = manager.restore(7, args=ocp.args.Composite(data=iterator_restore_args(fresh)))
    assert restored.data is fresh
    assert_same_batches(expected, [next(fresh) for _ in range(5)])


@pytest.mark.slow
def test_worker_processes_are_exact_and_deterministic(config, tokenizer):  # noqa: F811
    """Workers each pack their own slice of the documents: another order than in-process, same tokens."""
    flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags, which absl's app.run parses in train.py.
    config = config.copy_and_resolve_references()
    config.num_workers = 2
    first, second = one_pass(config, tokenizer), one_pass(config, tokenizer)
    assert_same_batches(first, second)
    assert collections.Counter(s for batch in first for s in segments(batch)) == expected_pieces(config, tokenizer)
