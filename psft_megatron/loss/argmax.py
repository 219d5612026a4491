"""Per-token argmax over vocab-parallel logits, without gathering the vocabulary.

Equals ``torch.argmax`` of the gathered full-vocabulary row, ties included (the lowest
global id wins, as ``torch.argmax`` returns the first maximal index): each rank takes its
shard's max and first local argmax, an all-reduce MAX finds the global max, and an
all-reduce MIN over the global ids of the ranks that hold it picks the lowest. Columns with
global index >= ``vocab_size`` (vocabulary padding) never win.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from psft_megatron.loss.groups import rank_and_size, resolve_tp_group

__all__ = ["vocab_parallel_argmax"]


@torch.no_grad()
def vocab_parallel_argmax(
    logits: torch.Tensor, *, tp_group: dist.ProcessGroup | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """Global token id of each row's maximum logit, int64, shaped ``logits.shape[:-1]``.

    ``logits``: ``[..., V/TP]`` local shard (rank r holds columns ``[r*V/TP, (r+1)*V/TP)``).
    """
    group = resolve_tp_group(tp_group)
    rank, world = rank_and_size(group)
    v_local = logits.shape[-1]
    v_valid = v_local if vocab_size is None else min(max(int(vocab_size) - rank * v_local, 0), v_local)
    z = logits.reshape(-1, v_local)[:, :v_valid]
    n = z.shape[0]
    big = torch.iinfo(torch.int64).max
    if v_valid:
        best, idx = z.float().max(dim=-1)  # first maximal index on ties
        ids = idx + rank * v_local
    else:  # a shard of padding only
        best = torch.full((n,), float("-inf"), device=logits.device)
        ids = torch.full((n,), big, dtype=torch.int64, device=logits.device)
    if world > 1:
        top = best.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        ids = torch.where(best == top, ids, torch.full_like(ids, big))
        dist.all_reduce(ids, op=dist.ReduceOp.MIN, group=group)
    return ids.view(logits.shape[:-1])
