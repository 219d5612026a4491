"""Split packed micro-batches over a context-parallel (CP) group, in TransformerEngine's THD layout.

With causal attention, cutting a sequence into CP contiguous pieces gives the last rank
the most work. TransformerEngine's THD context parallelism (and megatron's
``get_thd_batch_on_this_cp_rank``) instead pads each sequence to a multiple of 2 x CP,
cuts it into 2 x CP equal chunks and gives CP rank r chunks r and 2 x CP - 1 - r
(``tex.thd_get_partitioned_indices``). :func:`partitioned_indices` is that function
(TransformerEngine's is a CUDA kernel; this one runs anywhere and is what the tests check).

A packed row of ``S`` tokens holds several samples (plus a trailing padding segment).
:func:`split_micro_batches` pads every segment of every row to a multiple of 2 x CP,
extends each row's last segment so all rows of the call have one length ``L`` (a multiple
of ``multiple``, so sequence parallelism can cut the share evenly), flattens the rows to
THD and keeps this rank's chunks. Tokens, labels, loss masks and position ids are gathered
from the original rows; the inserted padding carries no loss and no attention. Every
micro-batch of one call gets the same ``L``: megatron's pipeline schedule sends tensors of
one shape, and the snapshot log-probs of a micro-batch must line up with its training pass.

:func:`thd_attention_mask` is the attention structure of one rank's queries against the
keys of every rank (in all-gather order), for attention that gathers K/V over CP
(:mod:`psft_megatron.model.cp_attention`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from psft_megatron.data.batches import MicroBatch, RowMap

__all__ = ["partitioned_indices", "split_micro_batches", "split_micro_batch", "thd_attention_mask",
           "padded_row_length"]


def _round_up(x: torch.Tensor | int, m: int) -> torch.Tensor | int:
    return (x + m - 1) // m * m


def partitioned_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices (into the padded THD tokens) that CP rank ``cp_rank`` keeps, in its local order.

    Per sequence (``cu_seqlens_padded``: cumulative padded lengths, each a multiple of
    2 x ``cp_size``): chunk ``cp_rank`` then chunk ``2 * cp_size - 1 - cp_rank`` of its
    2 x ``cp_size`` equal chunks, sequences in order, as ``tex.thd_get_partitioned_indices``.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp_size {cp_size}")
    cu = cu_seqlens_padded.to(torch.int64).cpu()
    lens = cu[1:] - cu[:-1]
    if bool((lens % (2 * cp_size)).any()):
        raise ValueError(f"every padded sequence length must be a multiple of 2 x CP = {2 * cp_size}, got {lens.tolist()}")
    chunk = lens // (2 * cp_size)
    local = 2 * chunk  # tokens of each sequence on each rank
    seq = torch.repeat_interleave(torch.arange(len(lens)), local)
    j = torch.arange(int(local.sum())) - torch.repeat_interleave(torch.cumsum(local, 0) - local, local)
    c = chunk[seq]
    first = j < c
    offset = torch.where(first, cp_rank * c + j, (2 * cp_size - 1 - cp_rank) * c + (j - c))
    return cu[:-1][seq] + offset


def padded_row_length(mb: MicroBatch, cp_size: int) -> int:
    """The longest row of ``mb`` once each of its segments is padded to a multiple of 2 x CP."""
    b, s = mb.shape
    cu = mb.cu_seqlens.to(torch.int64).cpu()
    lens = _round_up(cu[1:] - cu[:-1], 2 * cp_size)
    rows = cu[:-1] // s
    return int(torch.zeros(b, dtype=torch.int64).index_add_(0, rows, lens).max())


def split_micro_batch(mb: MicroBatch, cp_size: int, cp_rank: int, row_length: int) -> MicroBatch:
    """CP rank ``cp_rank``'s share of ``mb`` (``[b, S]`` as the loader made it), each row padded to ``row_length``.

    Returns a THD micro-batch ``[1, b * row_length / cp_size]`` with ``cu_seqlens`` (real lengths),
    ``cu_seqlens_padded``, ``max_seqlen`` (longest padded sequence: megatron sizes the RoPE table
    from it), per-sample ``position_ids``, and a :class:`RowMap` saying where each token came from.
    ``row_length`` must be a multiple of 2 x CP and at least :func:`padded_row_length`.
    """
    if mb.cp_size > 1 or mb.row_map is not None:
        raise ValueError("split_micro_batch takes a micro-batch as the loader made it ([rows, S])")
    b, s = mb.shape
    if row_length % (2 * cp_size) or row_length < padded_row_length(mb, cp_size):
        raise ValueError(f"row_length {row_length} must be a multiple of {2 * cp_size} and hold every padded row")
    cu = mb.cu_seqlens.to(torch.int64).cpu()
    starts, lens = cu[:-1], cu[1:] - cu[:-1]
    rows = starts // s
    padded = _round_up(lens, 2 * cp_size)
    # Each row's last segment takes up the room left, so every row is row_length long.
    last = torch.ones_like(rows, dtype=torch.bool)
    last[:-1] = rows[1:] != rows[:-1]
    used = torch.zeros(b, dtype=torch.int64).index_add_(0, rows, padded)
    padded = padded + torch.where(last, row_length - used[rows], torch.zeros_like(padded))
    cu_padded = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(padded, 0)])

    idx = partitioned_indices(cu_padded, cp_size, cp_rank)  # positions in the padded b x row_length layout
    seg = torch.searchsorted(cu_padded, idx, right=True) - 1
    pos = idx - cu_padded[seg]  # position inside its sample: RoPE's position
    real = pos < lens[seg]
    src = torch.where(real, starts[seg] + pos, torch.zeros_like(pos))  # into the flattened b*S tokens

    def take(t: torch.Tensor, fill: float | int) -> torch.Tensor:
        vals = t.reshape(-1)[src.to(t.device)]
        return torch.where(real.to(t.device), vals, torch.full_like(vals, fill)).unsqueeze(0)

    loss_mask = take(mb.loss_mask, 0)
    return replace(
        mb,
        # Inserted padding gets token and label 0 (any valid id: it has no loss and no attention).
        tokens=take(mb.tokens, 0),
        labels=take(mb.labels, 0),
        loss_mask=loss_mask,
        position_ids=pos.unsqueeze(0),
        segment_ids=seg.to(torch.int32).unsqueeze(0),
        cu_seqlens=torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)]).to(torch.int32),
        cu_seqlens_padded=cu_padded.to(torch.int32),
        max_seqlen=int(padded.max()),
        num_loss_tokens=int(loss_mask.sum()),
        sample_ids=[tuple(i for row in mb.sample_ids for i in row)],
        cp_size=cp_size,
        row_map=RowMap(row=rows[seg], index=torch.where(real, src - rows[seg] * s, torch.full_like(src, -1)),
                       num_rows=b, seq_length=s),
    )


def split_micro_batches(
    micro_batches: Sequence[MicroBatch], cp_size: int, cp_rank: int, multiple: int = 1
) -> list[MicroBatch]:
    """CP rank ``cp_rank``'s share of every micro-batch, all with one padded row length.

    The row length is the longest padded row of the call rounded up to a multiple of
    2 x CP x ``multiple`` (pass the TP size: under sequence parallelism each TP rank gets an
    equal slice of the share). The same call on every rank of a CP group and pipeline gives
    the same layout, so all of them agree on shapes without communicating.
    """
    if cp_size == 1 or not micro_batches:
        return list(micro_batches)
    step = 2 * cp_size * multiple
    row_length = _round_up(max(padded_row_length(mb, cp_size) for mb in micro_batches), step)
    return [split_micro_batch(mb, cp_size, cp_rank, int(row_length)) for mb in micro_batches]


def thd_attention_mask(
    cu_seqlens: torch.Tensor, cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int
) -> torch.Tensor:
    """Bool ``[t_local, t_local * cp_size]`` mask (True = masked) of rank ``cp_rank``'s queries against
    every rank's keys in all-gather order (rank 0's share, then rank 1's, ...).

    Query q sees key k iff both are real tokens of the same sample and k is not after q; a
    padding token sees only itself (so no softmax row is empty). ``cu_seqlens`` holds the real
    lengths, ``cu_seqlens_padded`` the padded ones (TransformerEngine's THD convention).
    """
    device = cu_seqlens_padded.device
    cu_p = cu_seqlens_padded.to(torch.int64).cpu()
    cu = cu_seqlens.to(torch.int64).cpu()
    lens = cu[1:] - cu[:-1]
    keys = torch.cat([partitioned_indices(cu_p, cp_size, r) for r in range(cp_size)])
    queries = keys.view(cp_size, -1)[cp_rank]

    def where(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg = torch.searchsorted(cu_p, pos, right=True) - 1
        return seg, (pos - cu_p[seg]) < lens[seg]

    q_seg, q_real = where(queries)
    k_seg, k_real = where(keys)
    visible = (q_seg[:, None] == k_seg[None, :]) & (keys[None, :] <= queries[:, None])
    visible &= q_real[:, None] & k_real[None, :]
    visible |= queries[:, None] == keys[None, :]
    return (~visible).to(device)
