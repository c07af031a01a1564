"""SentencePiece tokenizer: Llama's special ids, deterministic cached training, lossless round trips."""

import pickle

import pytest
import sentencepiece as spm
from data_testing import data_cache_dir, data_config, tokenizer  # noqa: F401  (fixtures)

from hymba_jax.data import Tokenizer, load_tokenizer, train_sentencepiece

SAMPLE = "Return the value of x.\n\tIndented  twice;  digits 12345, café, ☃ and 𝛑."


def test_trained_tokenizer_follows_llama_ids(tokenizer):  # noqa: F811
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (1, 2, 3, 4096)
    assert tokenizer._processor.unk_id() == 0


def test_round_trip_is_lossless(tokenizer):  # noqa: F811
    ids = tokenizer.encode(SAMPLE)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
    assert tokenizer.decode(ids) == SAMPLE
    assert tokenizer.decode([tokenizer.pad_id, *ids, tokenizer.pad_id]) == SAMPLE


def test_training_is_deterministic():
    documents = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(300)]
    assert train_sentencepiece(documents, 300) == train_sentencepiece(documents, 300)


def test_trained_tokenizer_is_cached(tokenizer, data_cache_dir):  # noqa: F811
    (model_file,) = (data_cache_dir / "tokenizers").glob("spm-bpe4096-*.model")
    mtime = model_file.stat().st_mtime_ns
    again = load_tokenizer(data_config(data_cache_dir))
    assert model_file.stat().st_mtime_ns == mtime
    assert again.encode(SAMPLE) == tokenizer.encode(SAMPLE)


def test_model_file_without_pad_gets_hymba_pad(tmp_path):
    model_file = tmp_path / "llama_like.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"line {i} of some text to learn from" for i in range(200)]),
        model_prefix=str(tmp_path / "llama_like"),
        vocab_size=300,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        minloglevel=2,
    )
    loaded = load_tokenizer(data_config(tmp_path, tokenizer=str(model_file)))
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (1, 2, 300, 301)


def test_tokenizer_pickles(tokenizer):  # noqa: F811
    restored = pickle.loads(pickle.dumps(tokenizer))
    assert isinstance(restored, Tokenizer) and restored.encode(SAMPLE) == tokenizer.encode(SAMPLE)


@pytest.mark.parametrize("content", [b"hello world", b""])
def test_a_file_that_is_not_sentencepiece_is_named(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a usable SentencePiece model"):
        Tokenizer.from_file(path)
