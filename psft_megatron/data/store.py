"""Random access to tokenised samples: the loader's only view of the data.

Two implementations: :class:`InMemorySamples` (a list of ``TokenizedSample``,
for tests and small runs) and ``psft_megatron.data.cache.CachedSamples``
(memory-mapped arrays written once by rank 0 or ``tools/prepare_data.py``).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Protocol

import numpy as np

from psft_megatron.data.types import TokenizedSample


class SampleStore(Protocol):
    """Flat, indexable samples plus the per-sample counts the loader plans with."""

    lengths: np.ndarray  # int64 [n], tokens per sample
    loss_tokens: np.ndarray  # int64 [n], trained label positions per sample = sum(loss_mask[1:])
    fingerprint: str  # content identity; a resumed loader refuses a different one

    def __len__(self) -> int: ...

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids int32 [n], loss_mask uint8 [n])`` of sample ``i``."""
        ...


class InMemorySamples:
    """A :class:`SampleStore` over flat in-memory arrays."""

    def __init__(self, samples: Iterable[TokenizedSample]):
        ids, masks = [], []
        for s in samples:
            ids.append(np.asarray(s.input_ids, dtype=np.int32))
            masks.append(np.asarray(s.loss_mask, dtype=np.uint8))
        self.lengths = np.array([len(a) for a in ids], dtype=np.int64)
        self.offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.tokens = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        self.loss_mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
        self.loss_tokens = loss_tokens_per_sample(self.loss_mask, self.offsets)
        self.fingerprint = content_fingerprint(self.tokens, self.loss_mask, self.offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.loss_mask[a:b]


def loss_tokens_per_sample(loss_mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-sample count of label positions that carry loss: ``loss_mask[start+1:end].sum()``."""
    if len(offsets) <= 1:
        return np.zeros(0, dtype=np.int64)
    csum = np.zeros(len(loss_mask) + 1, dtype=np.int64)
    np.cumsum(loss_mask, out=csum[1:], dtype=np.int64)
    starts, ends = offsets[:-1], offsets[1:]
    # The first token of a sample is never a label (nothing in the sample predicts it).
    return csum[ends] - csum[np.minimum(starts + 1, ends)]


def content_fingerprint(tokens: np.ndarray, loss_mask: np.ndarray, offsets: np.ndarray) -> str:
    """Hex sha256 over the sha256 of each flat array (int32 tokens, uint8 mask, int64 offsets).

    Hashing each array separately lets the cache writer compute the same value
    while streaming the three files side by side.
    """
    parts = [
        hashlib.sha256(np.ascontiguousarray(arr, dtype=dt).tobytes()).digest()
        for arr, dt in ((tokens, np.int32), (loss_mask, np.uint8), (offsets, np.int64))
    ]
    return combine_digests(parts)


def combine_digests(parts: list[bytes]) -> str:
    """The fingerprint of per-array digests (tokens, loss_mask, offsets)."""
    return hashlib.sha256(b"".join(parts)).hexdigest()
