"""TFDS sources without TensorFlow: a locally prepared ArrayRecord dataset, tfds mock data, clear errors."""

import collections

import pytest
import tensorflow_datasets as tfds
from data_testing import TFDS_TEXTS, HymbaTestText, data_cache_dir, data_config, segments, tokenizer  # noqa: F401

from hymba_jax.data import make_dataset, open_documents


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    HymbaTestText(data_dir=str(directory), file_format="array_record").download_and_prepare()
    return directory


def tfds_config(cache_dir, **overrides):
    return data_config(cache_dir, **({"source": "tfds", "tfds_name": "hymba_test_text"} | overrides))


def test_prepared_dataset_splits(tfds_dir, tmp_path):
    config = tfds_config(tmp_path, tfds_data_dir=str(tfds_dir))
    for split, texts in TFDS_TEXTS.items():
        assert sorted(open_documents(config, split)) == sorted(texts)


def test_tfds_batches_hold_every_document(tfds_dir, tmp_path, tokenizer):  # noqa: F811
    config = tfds_config(tmp_path, tfds_data_dir=str(tfds_dir))
    dataset = make_dataset(config, tokenizer, split="train", global_batch_size=2, seq_len=64, num_epochs=1)
    eos_targets = sum(collections.Counter(t)[tokenizer.eos_id] for b in dataset for _, t in segments(b))
    assert eos_targets == len(TFDS_TEXTS["train"])


def test_mock_data_works_without_tensorflow(tmp_path):
    config = tfds_config(tmp_path, tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=3):
        documents = list(open_documents(config, "train"))
    assert len(documents) == 3 and all(isinstance(text, str) for text in documents)


def test_unknown_name_split_and_feature_are_named(tfds_dir, tmp_path):
    with pytest.raises(ValueError, match="data.tfds_name='no_such_dataset_xyz' is not a TFDS dataset"):
        open_documents(tfds_config(tmp_path, tfds_name="no_such_dataset_xyz"), "train")
    with pytest.raises(FileNotFoundError, match="'tiny_shakespeare' has no split 'train' prepared as ArrayRecord"):
        open_documents(tfds_config(tmp_path, tfds_name="tiny_shakespeare", tfds_data_dir=str(tmp_path)), "train")
    with pytest.raises((ValueError, FileNotFoundError), match="'test'"):
        open_documents(tfds_config(tmp_path, tfds_data_dir=str(tfds_dir), tfds_validation_split="test"), "validation")
    with pytest.raises(ValueError, match="no feature data.text_key='content'"):
        open_documents(tfds_config(tmp_path, tfds_data_dir=str(tfds_dir), text_key="content"), "train")
