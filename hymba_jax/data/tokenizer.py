"""SentencePiece tokenizer: the user's model file, or one trained on the default corpus and cached.

Special ids follow Llama (and so Hymba's released tokenizer): unk=0, bos=1, eos=2. A model without a
pad piece (Llama's tokenizer.model) gets pad = its piece count, appended after the last piece as
Hymba does ([PAD]=32000, vocab_size 32001); a trained model has '<pad>' at id 3 inside its
`vocab_size` pieces. `encode` adds neither bos nor eos: packing adds them per document.
`encode_exact` also leaves out SentencePiece's dummy-prefix space, so that the pieces of a chat
conversation (hymba_jax/data/chat.py), encoded one by one, concatenate to the ids of the whole.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_collections
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from hymba_jax.data import config as data_config
from hymba_jax.data import default_corpus, records

# Llama-2's trainer settings (lossless: identity normalization, byte fallback, digits split),
# with a pad piece at 3 so a trained vocabulary keeps its configured size.
_TRAINER_SETTINGS = dict(
    model_type="bpe",
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    input_sentence_size=0,
    num_threads=2,
    minloglevel=2,
)


class Tokenizer:
    """Text <-> token ids with a SentencePiece model; picklable, so Grain workers can use it."""

    def __init__(self, model_proto: bytes):
        self._model_proto = model_proto
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._processor.bos_id() < 0 or self._processor.eos_id() < 0:
            raise ValueError("the SentencePiece model defines no bos or eos piece; packing needs both")
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
        proto.normalizer_spec.add_dummy_prefix = False
        self._exact = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a SentencePiece `.model` file (e.g. Llama-2's tokenizer.model); ValueError naming the file
        when it is not one (SentencePiece's own error names neither the file nor the problem)."""
        path = Path(path).expanduser()
        try:
            return cls(path.read_bytes())
        except (RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not a usable SentencePiece model ({reason}); give a tokenizer .model file "
                             "such as Llama-2's tokenizer.model") from None

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def unk_id(self) -> int:
        return self._processor.unk_id()

    @property
    def piece_count(self) -> int:
        """Pieces of the SentencePiece model (ids 0 .. piece_count - 1)."""
        return self._processor.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The model's pad piece, else one id past its last piece (Hymba's [PAD])."""
        pad = self._processor.pad_id()
        return pad if pad >= 0 else self.piece_count

    def piece(self, token_id: int) -> str:
        """The piece `token_id` names (e.g. '<s>', '▁the'); the pad appended after the last piece is '[PAD]'."""
        if token_id == self.piece_count == self.pad_id:
            return "[PAD]"
        return self._processor.id_to_piece(token_id)

    @property
    def vocab_size(self) -> int:
        """Rows the embedding needs: every piece id and `pad_id`."""
        return max(self.piece_count, self.pad_id + 1)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos or eos."""
        return self._processor.encode(text)

    def encode_exact(self, text: str) -> list[int]:
        """Token ids of `text` as written: like `encode` but without the dummy-prefix space SentencePiece
        puts before a text ('hi' -> '▁h i' in `encode`, 'h i' here), so that texts encoded one after the
        other decode to their concatenation."""
        return self._exact.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; pad ids are dropped (bos/eos/unk decode to nothing or ' ⁇ ')."""
        return self._processor.decode([i for i in ids if i != self.pad_id])

    def __getstate__(self) -> bytes:
        return self._model_proto

    def __setstate__(self, model_proto: bytes) -> None:
        self.__init__(model_proto)


def train_sentencepiece(documents: Iterable[str], vocab_size: int) -> bytes:
    """A BPE SentencePiece model (serialized) of `vocab_size` pieces trained on the lines of `documents`.

    Deterministic for the same documents; about a second on the 2 MB default corpus.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_nonblank_lines(documents), model_writer=model, vocab_size=vocab_size, **_TRAINER_SETTINGS
    )
    return model.getvalue()


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer of `config.data`: its `tokenizer` file, or a cached one trained on the default corpus.

    The trained model is cached under `<cache_dir>/tokenizers/`, keyed by the default corpus, the
    vocabulary size, the trainer settings and the sentencepiece version.
    """
    data_config.validate_data_config(config)
    if config.tokenizer:
        return Tokenizer.from_file(config.tokenizer)
    cache = data_config.cache_dir(config)
    corpus = default_corpus.prepare_default_corpus(cache, config.val_fraction)
    key = records.fingerprint(corpus.name, config.vocab_size, _TRAINER_SETTINGS, spm.__version__)
    path = cache / "tokenizers" / f"spm-bpe{config.vocab_size}-{key}.model"
    if not path.is_file():
        model_proto = train_sentencepiece(records.read_split(corpus, "train"), config.vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        staging.write_bytes(model_proto)
        staging.replace(path)  # Atomic: concurrent processes never read half a model.
    return Tokenizer.from_file(path)


def _nonblank_lines(documents: Iterable[str]) -> Iterator[str]:
    for document in documents:
        yield from (line for line in document.splitlines() if line.strip())
