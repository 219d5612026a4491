"""Pack tokenised samples into fixed-length rows with per-sample boundaries.

Two steps, both deterministic and free of global RNG state:

1. :func:`plan_packs` decides which samples share a row (from lengths only), so
   the plan can be computed on every rank without reading token data.
2. :func:`pack_row` materialises one row: tokens, next-token labels that never
   cross a sample boundary, the shifted loss mask, per-sample position ids and
   segment ids / ``cu_seqlens`` from which the attention structure is derived
   (see :mod:`psft_megatron.data.masks`).

Padding at the end of a row is its own segment (so no padded row of attention
is empty) and never carries loss.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

PackStrategy = Literal["best_fit", "sequential"]


@dataclass(frozen=True)
class PackedRow:
    """One fixed-length row of ``seq_length`` tokens holding one or more whole samples.

    ``labels[i]`` is ``tokens[i + 1]`` when position ``i + 1`` belongs to the same
    sample, else ``pad_id``; ``loss_mask[i]`` is the sample's response mask at
    ``i + 1`` under the same condition, else 0. Always multiply by ``loss_mask``:
    masked labels are a valid id only so that any cross-entropy implementation
    accepts them.
    """

    tokens: np.ndarray  # int64 [S]
    labels: np.ndarray  # int64 [S]
    loss_mask: np.ndarray  # float32 [S], aligned with labels
    position_ids: np.ndarray  # int64 [S], restart at 0 in every segment
    segment_ids: np.ndarray  # int32 [S], 0..n_samples-1, padding = n_samples
    cu_seqlens: np.ndarray  # int32 [n_segments + 1], ends at S (padding segment included)
    sample_ids: tuple[int, ...]  # dataset indices packed here, in row order

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def plan_packs(
    lengths: Sequence[int] | np.ndarray,
    seq_length: int,
    order: Sequence[int] | np.ndarray | None = None,
    strategy: PackStrategy = "best_fit",
) -> list[list[int]]:
    """Group sample indices into rows of at most ``seq_length`` tokens.

    ``order`` is the order in which samples are offered (default: index order);
    pass a seeded permutation to mix sources. ``best_fit`` puts each sample into
    the open row with the least room that still fits it (ties: the most recently
    created such row), opening a new row otherwise; ``sequential`` fills rows in
    order and starts a new one when the next sample does not fit. Both are
    deterministic functions of ``(lengths, order)``. Rows are returned in
    creation order, samples within a row in insertion order.

    Raises ``ValueError`` for a sample longer than ``seq_length`` or empty: the
    ingest stage's ``max_length`` must not exceed ``seq_length``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    idx = np.arange(len(lengths)) if order is None else np.asarray(order, dtype=np.int64)
    check_lengths(lengths, idx, seq_length)
    if strategy == "sequential":
        return _plan_sequential(lengths, idx, seq_length)
    if strategy == "best_fit":
        return _plan_best_fit(lengths, idx, seq_length)
    raise ValueError(f"unknown packing strategy {strategy!r}; use 'best_fit' or 'sequential'")


def check_lengths(lengths: np.ndarray, idx: np.ndarray, seq_length: int) -> None:
    """Raise ``ValueError`` naming the first sample in ``idx`` that is empty or longer than ``seq_length``."""
    if seq_length < 2:
        raise ValueError(f"seq_length must be >= 2, got {seq_length}")
    if len(idx) == 0:
        return
    sel = lengths[idx]
    too_long = np.nonzero(sel > seq_length)[0]
    if len(too_long):
        i = int(idx[too_long[0]])
        raise ValueError(
            f"sample {i} has {int(lengths[i])} tokens, more than seq_length={seq_length} "
            f"({len(too_long)} such samples); set the ingest max_length <= seq_length or raise seq_length"
        )
    empty = np.nonzero(sel <= 0)[0]
    if len(empty):
        raise ValueError(f"sample {int(idx[empty[0]])} is empty; the ingest stage should have skipped it")


def _plan_sequential(lengths: np.ndarray, idx: np.ndarray, seq_length: int) -> list[list[int]]:
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in idx.tolist():
        n = int(lengths[i])
        if cur and used + n > seq_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        rows.append(cur)
    return rows


def _plan_best_fit(lengths: np.ndarray, idx: np.ndarray, seq_length: int) -> list[list[int]]:
    # Rows bucketed by remaining room; `rooms` is the sorted list of non-empty buckets,
    # so each placement is a bisect (O(log S)) instead of a scan over all rows.
    rows: list[list[int]] = []
    buckets: dict[int, list[int]] = {}
    rooms: list[int] = []
    for i in idx.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(rooms, n)
        if k < len(rooms):
            room = rooms[k]
            bucket = buckets[room]
            r = bucket.pop()
            if not bucket:
                del buckets[room]
                rooms.pop(k)
        else:
            room = seq_length
            r = len(rows)
            rows.append([])
        rows[r].append(i)
        left = room - n
        if left > 0:
            if left not in buckets:
                buckets[left] = []
                bisect.insort(rooms, left)
            buckets[left].append(r)
    return rows


def pack_row(
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    seq_length: int,
    pad_id: int,
    sample_ids: Sequence[int] | None = None,
) -> PackedRow:
    """Build one :class:`PackedRow` from ``(input_ids, loss_mask)`` pairs, padding to ``seq_length``."""
    if not samples:
        raise ValueError("pack_row needs at least one sample")
    lens = np.array([len(ids) for ids, _ in samples], dtype=np.int64)
    total = int(lens.sum())
    if total > seq_length:
        raise ValueError(f"samples total {total} tokens, more than seq_length={seq_length}")
    if (lens <= 0).any():
        raise ValueError("pack_row got an empty sample")
    n = len(samples)
    pad = seq_length - total

    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    mask_in = np.zeros(seq_length, dtype=np.float32)
    tokens[:total] = np.concatenate([np.asarray(ids) for ids, _ in samples])
    mask_in[:total] = np.concatenate([np.asarray(m) for _, m in samples])

    seg_lens = np.append(lens, pad) if pad else lens
    segment_ids = np.repeat(np.arange(len(seg_lens), dtype=np.int32), seg_lens)
    cu_seqlens = np.zeros(len(seg_lens) + 1, dtype=np.int32)
    np.cumsum(seg_lens, out=cu_seqlens[1:])
    starts = np.repeat(cu_seqlens[:-1].astype(np.int64), seg_lens)
    position_ids = np.arange(seq_length, dtype=np.int64) - starts

    # Position i predicts token i+1 only inside the same sample (never into padding,
    # which is a different segment, and never from padding).
    same = np.zeros(seq_length, dtype=bool)
    same[:-1] = segment_ids[1:] == segment_ids[:-1]
    same &= segment_ids < n
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    labels[:-1] = np.where(same[:-1], tokens[1:], pad_id)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    loss_mask[:-1] = np.where(same[:-1], mask_in[1:], 0.0)

    ids = tuple(int(s) for s in sample_ids) if sample_ids is not None else tuple(range(n))
    return PackedRow(tokens, labels, loss_mask, position_ids, segment_ids, cu_seqlens, ids)


def packing_efficiency(rows: Sequence[Sequence[int]], lengths: np.ndarray, seq_length: int) -> float:
    """Fraction of row positions holding real tokens (1.0 = no padding)."""
    if not rows:
        return 0.0
    used = sum(int(lengths[r].sum()) for r in map(np.asarray, rows))
    return used / (len(rows) * seq_length)
