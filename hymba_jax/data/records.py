"""Prepared corpora: documents split into train/validation and stored as ArrayRecord files.

A prepared corpus is a directory holding `train.array_record` and `validation.array_record`, one
UTF-8 document per record. It is written once into a temporary sibling directory and renamed into
place, so concurrent processes (several hosts sharing a cache, or a crash half-way) never see a
partial corpus. Records are random-access, so Grain can shuffle and shard documents globally.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import grain
from array_record.python.array_record_module import ArrayRecordWriter

SPLITS = ("train", "validation")


def fingerprint(*parts: object) -> str:
    """A short stable hex digest of `parts` (their reprs), for naming cache entries."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


def split_of(text: str, val_fraction: float) -> str:
    """'validation' for a `val_fraction` share of documents chosen by a hash of their text, else 'train'.

    Hashing the text (not the position) keeps the split stable when documents are added or
    reordered, and puts duplicated documents on the same side.
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") < val_fraction * 2**64 else "train"


def ensure_prepared(directory: Path, documents: Callable[[], Iterable[str]], val_fraction: float,
                    split_text: Callable[[str], str] = lambda text: text) -> Path:
    """Writes `documents()` into `directory` as a prepared corpus unless it is already there.

    Each document goes to the split `split_of(split_text(document))`: chat records carry the file and
    line they came from, which must not move a conversation between splits, so they hash their messages.
    """
    if all(_split_path(directory, split).is_file() for split in SPLITS):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_splits(staging, documents(), val_fraction, split_text)
    except BaseException:  # A bad input file: leave no half-written staging directory behind.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(directory)
    except OSError:  # Another process finished first; its corpus is identical.
        shutil.rmtree(staging)
    return directory


def read_split(directory: Path, split: str) -> grain.MapDataset[str]:
    """The documents of one split of a prepared corpus, as a random-access dataset of strings.

    Raises ValueError when the split holds no documents (a corpus too small for `val_fraction`).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    source = grain.sources.ArrayRecordDataSource([str(_split_path(directory, split))])
    if len(source) == 0:
        raise ValueError(
            f"split {split!r} of the prepared corpus {directory} holds no documents: add documents "
            "or change data.val_fraction"
        )
    return grain.MapDataset.source(source).map(_decode_utf8)


def _write_splits(directory: Path, documents: Iterable[str], val_fraction: float,
                  split_text: Callable[[str], str]) -> None:
    writers = {split: ArrayRecordWriter(str(_split_path(directory, split)), "group_size:1") for split in SPLITS}
    try:
        for text in documents:
            writers[split_of(split_text(text), val_fraction)].write(text.encode("utf-8"))
    finally:
        for writer in writers.values():
            writer.close()


def _decode_utf8(record: bytes) -> str:
    return record.decode("utf-8")


def _split_path(directory: Path, split: str) -> Path:
    return directory / f"{split}.array_record"
