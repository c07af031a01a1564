"""Tokenizers the evaluation code accepts: anything with `encode`, `decode`, `bos_id`, `eos_id`.

Evaluation needs text <-> ids only: a SentencePiece model (the released Hymba tokenizer is the Llama-2
SentencePiece model, `tokenizer.model` beside the checkpoint) or `AsciiTokenizer`, an exact character
tokenizer small enough for the 101-token test fixtures. `hymba_jax.loading.load_tokenizer` gives either.
"""

from __future__ import annotations

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

