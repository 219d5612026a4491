"""The loss of one micro-batch, end to end: what the trainer's ``loss_func`` calls.

logits shard -> per-token logp and entropy -> objective -> global-mean term + statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from psft_megatron.loss.normalize import normalized_loss
from psft_megatron.loss.objectives import ObjectiveConfig, token_losses
from psft_megatron.loss.stats import LossStats
from psft_megatron.loss.token_stats import vocab_parallel_token_stats


@dataclass
class MicroBatchLoss:
    """``loss``: differentiable ``sum(loss_t * mask) / global_count`` (multiply by
    :func:`~psft_megatron.loss.normalize.megatron_loss_scale` before handing it to megatron's
    schedule); ``logp``: detached per-token log-probs; ``stats``: this micro-batch's
    statistics (merge over micro-batches, then :func:`~psft_megatron.loss.stats.reduce_stats`)."""

    loss: torch.Tensor
    logp: torch.Tensor
    stats: LossStats


def micro_batch_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    global_count: torch.Tensor,
    objective: ObjectiveConfig,
    logp_old: torch.Tensor | None = None,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    inplace: bool = False,
) -> MicroBatchLoss:
    """Loss term and statistics of one micro-batch from vocab-parallel logits ``[s, b, V/TP]``.

    ``labels``, ``loss_mask`` and ``logp_old`` are ``[s, b]``; ``logp_old`` (from the
    snapshot forward pass, see :func:`snapshot_logp`) is required by ``psft``.
    ``global_count`` comes from :func:`~psft_megatron.loss.normalize.global_token_count`.
    """
    ts = vocab_parallel_token_stats(logits, labels, tp_group=tp_group, chunk_size=chunk_size, inplace=inplace)
    losses = token_losses(objective, ts.logp, loss_mask, logp_old)
    loss = normalized_loss(losses.loss, loss_mask, global_count)
    stats = LossStats.from_tokens(losses, ts.logp, ts.entropy, loss_mask)
    return MicroBatchLoss(loss=loss, logp=ts.logp.detach(), stats=stats)


@torch.no_grad()
def snapshot_logp(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token label log-probs (fp32, no entropy, no graph) from the snapshot model's logits."""
    return vocab_parallel_token_stats(
        logits, labels, tp_group=tp_group, chunk_size=chunk_size, with_entropy=False
    ).logp
