"""Shared helpers of the data tests: a session-wide cache, configs, and a tiny local TFDS builder.

The cache directory lives under pytest's session base temp directory, so every test module that asks
for it reuses the default corpus and tokenizer prepared by the first one (a few seconds, once).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hymba_jax.data import Tokenizer, default_data_config, load_tokenizer


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache directory for the whole test session (default corpus, tokenizer, prepared files)."""
    return tmp_path_factory.getbasetemp() / "hymba_jax_data_cache"


@pytest.fixture(scope="session")
def tokenizer(data_cache_dir: Path) -> Tokenizer:
    """The tokenizer trained on the default corpus (4096 pieces), cached for the session."""
    return load_tokenizer(data_config(data_cache_dir))


def data_config(cache_dir: Path, **overrides) -> ml_collections.ConfigDict:
    """`default_data_config()` with the test cache and the given fields."""
    config = default_data_config()
    config.cache_dir = str(cache_dir)
    config.update(overrides)
    return config


def segments(batch: dict[str, np.ndarray]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The (inputs, targets) token tuples of every segment of every row of a batch."""
    found = []
    for row in range(batch["segment_ids"].shape[0]):
        row_segments = batch["segment_ids"][row]
        for segment in np.unique(row_segments[row_segments > 0]):
            where = row_segments == segment
            found.append((tuple(batch["inputs"][row][where]), tuple(batch["targets"][row][where])))
    return found


TFDS_TEXTS = {
    "train": [f"Training document number {i}. " * (i % 7 + 1) for i in range(40)],
    "validation": [f"Held-out document {i}." for i in range(6)],
}


class HymbaTestText(tfds.core.GeneratorBasedBuilder):
    """A TFDS text dataset prepared locally (no download); registered as 'hymba_test_text'."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        return {split: self._generate_examples(texts) for split, texts in TFDS_TEXTS.items()}

    def _generate_examples(self, texts):
        for index, text in enumerate(texts):
            yield index, {"text": text}
