"""The offline default corpus: standard-library docstrings, deterministic, a few MB, split by hash."""

import pytest
from data_testing import data_cache_dir  # noqa: F401  (fixture)

from hymba_jax.data import default_corpus, records


@pytest.fixture(scope="module")
def corpus_dir(data_cache_dir):  # noqa: F811
    return default_corpus.prepare_default_corpus(data_cache_dir, val_fraction=0.02)


def test_default_corpus_size_and_split(corpus_dir):
    train = list(records.read_split(corpus_dir, "train"))
    validation = list(records.read_split(corpus_dir, "validation"))
    total_chars = sum(map(len, train)) + sum(map(len, validation))
    assert 1_000_000 < total_chars < 10_000_000
    assert len(train) > 500 and 0 < len(validation) < len(train) / 10
    assert not set(train) & set(validation)
    assert all(records.split_of(text, 0.02) == "validation" for text in validation)


def test_documents_are_deterministic_and_side_effect_free():
    json_package = default_corpus.stdlib_root() / "json"
    first = list(default_corpus.module_documents(json_package))
    assert first == list(default_corpus.module_documents(json_package))
    assert any("JSON" in document for document in first)


def test_prepared_corpus_is_reused(corpus_dir, data_cache_dir):  # noqa: F811
    mtime = (corpus_dir / "train.array_record").stat().st_mtime_ns
    assert default_corpus.prepare_default_corpus(data_cache_dir, val_fraction=0.02) == corpus_dir
    assert (corpus_dir / "train.array_record").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_full_rebuild_is_byte_identical(corpus_dir, tmp_path):
    rebuilt = default_corpus.prepare_default_corpus(tmp_path, val_fraction=0.02)
    assert rebuilt.name == corpus_dir.name
    for split in records.SPLITS:
        name = f"{split}.array_record"
        assert (rebuilt / name).read_bytes() == (corpus_dir / name).read_bytes()


def test_split_of_is_stable_and_proportional():
    texts = [f"document {i}" for i in range(20_000)]
    held_out = sum(records.split_of(text, 0.1) == "validation" for text in texts)
    assert 1_700 < held_out < 2_300
    assert [records.split_of(text, 0.1) for text in texts[:50]] == [records.split_of(text, 0.1) for text in texts[:50]]
