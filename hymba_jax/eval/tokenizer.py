"""Tokenizers the evaluation code accepts: anything with `encode`, `decode`, `bos_id`, `eos_id`.

Evaluation needs text <-> ids only. `load_tokenizer(spec)` gives a SentencePiece model (the released
Hymba tokenizer is the Llama-2 SentencePiece model, `tokenizer.model` beside the checkpoint) or
`AsciiTokenizer`, an exact character tokenizer small enough for the 101-token test fixtures.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    """encode(text) -> ids without BOS/EOS; decode(ids) -> text; bos_id / eos_id are ints."""

    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class AsciiTokenizer:
    """Printable ASCII and newline, one id per character: 0 pad, 1 BOS, 2 EOS, then '\\n', ' ' .. '~'.

    99 ids in all, so it fits every model with vocab_size >= 99 (the tiny fixtures have 101). Exact and
    reversible; a character outside this set is an error naming it.
    """

    CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
    OFFSET = 3
    bos_id = 1
    eos_id = 2
    vocab_size = OFFSET + len(CHARS)

    def __init__(self):
        self._ids = {c: i + self.OFFSET for i, c in enumerate(self.CHARS)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"AsciiTokenizer: character {e.args[0]!r} is not printable ASCII or newline; "
                             "use a SentencePiece tokenizer for general text") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.CHARS[i - self.OFFSET] for i in ids
                       if self.OFFSET <= i < self.OFFSET + len(self.CHARS))


def load_tokenizer(spec: str, checkpoint: str | os.PathLike | None = None) -> Tokenizer:
    """'ascii' -> AsciiTokenizer; a .model path -> SentencePiece; '' -> `tokenizer.model` in `checkpoint`."""
    if spec == "ascii":
        return AsciiTokenizer()
    path = spec or (os.path.join(checkpoint, "tokenizer.model") if checkpoint is not None else "")
    if path and os.path.isfile(path):
        from hymba_jax.data.tokenizer import Tokenizer as SentencePieceTokenizer  # needs ml_collections

        return SentencePieceTokenizer.from_file(path)
    if spec:
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file; pass a SentencePiece .model path or 'ascii'")
    raise ValueError(f"no tokenizer given and no tokenizer.model in {checkpoint!r}: pass tokenizer=ascii "
                     "(printable-ASCII characters, for test models) or tokenizer=/path/to/tokenizer.model")
