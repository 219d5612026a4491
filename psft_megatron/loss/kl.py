"""Per-token KL divergence between two models' vocab-parallel logits, without gathering the vocabulary.

Input: two logits tensors ``[..., V/TP]`` sharded over the vocabulary exactly as megatron's
output layer returns them (rank r holds columns ``[r*V/TP, (r+1)*V/TP)``), for the same
tokens; ``p`` is the model being measured, ``q`` the reference. Output, per token, in fp32:

    KL(p || q) = sum_j p_j (log p_j - log q_j)

computed from three all-reduces of per-token scalars over the tensor-parallel group (the
two maxima, then the two sums of exponentials, then the local KL sums), so no rank ever
holds a full-vocabulary row. ``log p_j`` is formed as ``(z_j - max) - log sum exp(z - max)``
with the max and the log-sum kept apart (as in :mod:`psft_megatron.loss.token_stats`), and
the work runs one token chunk at a time in fp32 buffers, so memory stays one chunk of the
shard whatever the number of tokens.

Vocabulary padding: columns with global index >= ``vocab_size`` get probability 0 under both
models, exactly as if their logits were -inf.

Forward only (evaluation: the drift of a checkpoint from its reference); the all-reduces are
not part of autograd, so this is not a training loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from psft_megatron.loss.groups import rank_and_size, resolve_tp_group
from psft_megatron.loss.token_stats import auto_chunk_size, valid_shard_columns

__all__ = ["vocab_parallel_kl"]


@torch.no_grad()
def vocab_parallel_kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token ``KL(softmax(p) || softmax(q))`` from vocab-parallel logits, fp32, shaped ``p_logits.shape[:-1]``.

    Args:
        p_logits, q_logits: ``[..., V/TP]`` local shards of the same shape (fp32 or bf16).
        tp_group: the tensor-parallel group; default megatron's, or a single rank if
            megatron's parallel state is not initialised.
        vocab_size: the true vocabulary size; padded columns (global index >= it) are excluded.
        chunk_size: tokens per fp32 working chunk (None: :func:`auto_chunk_size`).
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits {tuple(p_logits.shape)} and q_logits {tuple(q_logits.shape)} differ in shape")
    group = resolve_tp_group(tp_group)
    rank, world = rank_and_size(group)
    v_local = p_logits.shape[-1]
    v_valid = valid_shard_columns(vocab_size, v_local, rank, world)
    zp = p_logits.reshape(-1, v_local)[:, :v_valid]
    zq = q_logits.reshape(-1, v_local)[:, :v_valid]
    n = zp.shape[0]
    chunk = auto_chunk_size(v_local, p_logits.device) if chunk_size is None else max(1, int(chunk_size))
    dev = p_logits.device

    # 1. per-token maxima of both models (a shard of padding only contributes -inf)
    m = torch.full((2, n), float("-inf"), dtype=torch.float32, device=dev)
    if n and v_valid:
        m[0] = zp.amax(dim=-1).float()
        m[1] = zq.amax(dim=-1).float()
    if world > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)

    # 2. sums of exp(z - max) of both models
    s = torch.zeros(2, n, dtype=torch.float32, device=dev)
    for c0 in range(0, n if v_valid else 0, chunk):
        c1 = min(n, c0 + chunk)
        s[0, c0:c1] = torch.exp(zp[c0:c1].float() - m[0, c0:c1, None]).sum(-1)
        s[1, c0:c1] = torch.exp(zq[c0:c1].float() - m[1, c0:c1, None]).sum(-1)
    if world > 1:
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    log_s = s.log()

    # 3. local sum_j p_j (log p_j - log q_j) over this shard's columns, then summed over TP
    kl = torch.zeros(n, dtype=torch.float32, device=dev)
    for c0 in range(0, n if v_valid else 0, chunk):
        c1 = min(n, c0 + chunk)
        logp = (zp[c0:c1].float() - m[0, c0:c1, None]) - log_s[0, c0:c1, None]
        logq = (zq[c0:c1].float() - m[1, c0:c1, None]) - log_s[1, c0:c1, None]
        kl[c0:c1] = (logp.exp() * (logp - logq)).sum(-1)
    if world > 1:
        dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
    return kl.view(p_logits.shape[:-1])
