"""Documents -> next-token pairs -> packed rows -> model batches.

Each document becomes `[bos] + tokens + [eos]`; its inputs are that sequence without the last token
and its targets without the first, so every token after bos is a target exactly once. A document
longer than a row is cut into row-length pieces; each piece is its own segment, so attention,
positions and SSM state restart at each piece (the model derives positions from `segment_ids`).
Grain's first-fit packer fills rows without splitting pieces further. Fine-tuning examples
(hymba_jax/data/chat.py) are pieces that also carry their per-token loss `weights`, packed alongside.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import grain
import numpy as np

PACKED_FEATURES = ("inputs", "targets")


@dataclasses.dataclass(frozen=True)
class DocumentToPieces(grain.experimental.FlatMapTransform):
    """Token ids of one document -> pieces {'inputs': (n,), 'targets': (n,)} int32 with n <= seq_len.

    An empty document gives no pieces. A document of T tokens gives ceil((T + 1) / seq_len) pieces.
    """

    bos_id: int
    eos_id: int
    seq_len: int
    # Grain's IterDataset flat map does not bound the fan-out; long documents give many pieces.
    max_fan_out: int = sys.maxsize

    def flat_map(self, tokens: Sequence[int]) -> list[dict[str, np.ndarray]]:
        if not len(tokens):
            return []
        sequence = np.asarray([self.bos_id, *tokens, self.eos_id], dtype=np.int32)
        inputs, targets = sequence[:-1], sequence[1:]
        return [
            {"inputs": inputs[start : start + self.seq_len], "targets": targets[start : start + self.seq_len]}
            for start in range(0, len(inputs), self.seq_len)
        ]


def pack_pieces(
    pieces: grain.IterDataset, *, seq_len: int, num_bins: int, seed: int, shuffle_bins: bool,
    features: Sequence[str] = PACKED_FEATURES,
) -> grain.IterDataset:
    """Packs pieces into rows of `seq_len`: `features` (default 'inputs', 'targets'; fine-tuning adds
    'weights'), and 'inputs_segment_ids' (1, 2, ..; 0 = padding).

    First-fit over `num_bins` open rows; a piece never straddles two rows.
    """
    return grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={feature: seq_len for feature in features},
        num_packing_bins=num_bins,
        seed=seed,
        shuffle_bins=shuffle_bins,
    )


def to_model_batch(packed: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """The batch format the model and loss read, from a batch of packed rows (B, L).

    Returns 'inputs', 'targets', 'segment_ids' int32 (B, L) and 'weights' float32 (B, L): 1 where the
    target is a real token, times the packed 'weights' when the pieces carry them (fine-tuning: 1 on
    assistant tokens). Padding positions hold `pad_id` in inputs and targets and segment id 0.
    """
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)
    is_token = segment_ids > 0
    weights = np.where(is_token, packed["weights"], 0.0) if "weights" in packed else is_token
    return {
        "inputs": np.where(is_token, packed["inputs"], pad_id).astype(np.int32),
        "targets": np.where(is_token, packed["targets"], pad_id).astype(np.int32),
        "segment_ids": segment_ids,
        "weights": weights.astype(np.float32),
    }
