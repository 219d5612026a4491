"""The loss of one micro-batch, end to end: what the trainer's ``loss_func`` calls.

logits shard -> per-token logp and entropy -> objective -> global-mean term + statistics.
With ``head`` (the fused output layer) the model output is the final-norm hidden states
and logp / entropy come from :func:`~psft_megatron.loss.fused_head.fused_token_stats`
instead: the same numbers, without the logits. A training micro-batch there goes through
:func:`~psft_megatron.loss.fused_head_loss.fused_head_loss`, which forms the objective's
gradient in the forward pass (no recomputed logits in backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from psft_megatron.loss.fused_head import OutputHead, fused_token_stats
from psft_megatron.loss.fused_head_loss import fused_head_loss
from psft_megatron.loss.groups import rank_and_size, resolve_tp_group
from psft_megatron.loss.head_chunks import HeadLayout, gather_hidden
from psft_megatron.loss.normalize import normalized_loss
from psft_megatron.loss.objectives import ObjectiveConfig, token_losses
from psft_megatron.loss.stats import LossStats
from psft_megatron.loss.token_stats import TokenStats, vocab_parallel_token_stats


class _OwnLogp:
    """Sentinel type of :data:`OWN_LOGP`."""

    def __repr__(self) -> str:
        return "OWN_LOGP"


# Pass as ``logp_old`` when the micro-batch runs on the snapshot weights themselves (the
# first mini-batch after a snapshot): its own detached log-probs are logp_old, ratio 1,
# which saves the snapshot forward pass for that mini-batch.
OWN_LOGP = _OwnLogp()


def output_token_stats(
    output: torch.Tensor,
    labels: torch.Tensor,
    *,
    head: OutputHead | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    inplace: bool = False,
    vocab_size: int | None = None,
) -> TokenStats:
    """Per-token logp (and entropy) from the model's last-stage output.

    ``head`` None: ``output`` is the vocab-parallel logits ``[s, b, V/TP]``
    (:func:`~psft_megatron.loss.token_stats.vocab_parallel_token_stats`). Otherwise ``output``
    is the hidden states the output layer would read and ``head`` that layer's weight and
    layout (:func:`psft_megatron.model.gpt.loss_head`); ``inplace`` does not apply there (no
    logits to reuse), and ``chunk_size`` counts tokens per chunk of recomputed logits.
    """
    if head is None:
        return vocab_parallel_token_stats(
            output, labels, tp_group=tp_group, chunk_size=chunk_size, with_entropy=with_entropy,
            inplace=inplace, vocab_size=vocab_size,
        )  # fmt: skip
    return fused_token_stats(
        output, head.weight, labels, tp_group=head.tp_group if head.tp_group is not None else tp_group,
        sequence_parallel=head.sequence_parallel, chunk_size=chunk_size, with_entropy=with_entropy,
        vocab_size=vocab_size,
    )  # fmt: skip


def output_logits(output: torch.Tensor, head: OutputHead | None = None) -> torch.Tensor:
    """The vocab-parallel logits ``[s, b, V/TP]`` of the model's last-stage output: ``output``
    itself, or with ``head`` (the fused output layer) the hidden states (gathered over the
    sequence under SP) times the head's local vocabulary shard. The fused path never keeps this
    tensor in training; this is for evaluation, one micro-batch at a time."""
    if head is None:
        return output
    group = resolve_tp_group(head.tp_group)
    rank, world = rank_and_size(group)
    lay = HeadLayout(group, world, rank, sp=head.sequence_parallel and world > 1, chunk=0,
                     v_valid=head.weight.shape[0])
    return torch.matmul(gather_hidden(output, lay), head.weight.t())


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
    logp_old: torch.Tensor | _OwnLogp | None = None,
    *,
    logp_ref: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    inplace: bool = False,
    vocab_size: int | None = None,
    head: OutputHead | None = None,
    grad_scale: float | None = None,
) -> MicroBatchLoss:
    """Loss term and statistics of one micro-batch from vocab-parallel logits ``[s, b, V/TP]``
    (or, with ``head``, from the hidden states through the fused output layer: a pass that needs
    gradients goes through :func:`~psft_megatron.loss.fused_head_loss.fused_head_loss`, one without
    through :func:`output_token_stats`).

    ``labels``, ``loss_mask`` and ``logp_old`` are ``[s, b]``; ``logp_old`` (from the
    snapshot forward pass, see :func:`snapshot_logp`, or :data:`OWN_LOGP`) is required by objectives that
    need a snapshot (psft); ``logp_ref`` ``[s, b]`` (the frozen reference's) by those that need a reference (sft_kl).
    ``global_count`` comes from :func:`~psft_megatron.loss.normalize.global_token_count`.
    ``vocab_size``: the true vocabulary size; the output layer's padded columns beyond it are
    left out of the softmax (see :func:`~psft_megatron.loss.token_stats.vocab_parallel_token_stats`).
    ``inplace=True``: backward writes the logits gradient into the logits' storage.
    ``grad_scale``: with ``head``, the gradient backward will send into ``loss``
    (:func:`~psft_megatron.loss.normalize.megatron_loss_grad` under megatron's schedule); the
    fused head then puts the weight's gradient into megatron DDP's ``main_grad`` during the
    forward pass instead of holding it in a weight-sized buffer (see :mod:`~psft_megatron.loss.fused_head_loss`).
    """
    if head is not None and torch.is_grad_enabled() and (logits.requires_grad or head.weight.requires_grad):
        return _fused_micro_batch_loss(
            logits, labels, loss_mask, global_count, objective, logp_old, logp_ref, head, tp_group, chunk_size,
            vocab_size, grad_scale,
        )  # fmt: skip
    ts = output_token_stats(
        logits, labels, head=head, tp_group=tp_group, chunk_size=chunk_size, inplace=inplace, vocab_size=vocab_size
    )
    if isinstance(logp_old, _OwnLogp):
        logp_old = ts.logp.detach()
    losses = token_losses(objective, ts.logp, loss_mask, logp_old, logp_ref)
    loss = normalized_loss(losses.loss, loss_mask, global_count)
    stats = LossStats.from_tokens(losses, ts.logp, ts.entropy, loss_mask)
    return MicroBatchLoss(loss=loss, logp=ts.logp.detach(), stats=stats)


def _fused_micro_batch_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    global_count: torch.Tensor,
    objective: ObjectiveConfig,
    logp_old: torch.Tensor | _OwnLogp | None,
    logp_ref: torch.Tensor | None,
    head: OutputHead,
    tp_group: dist.ProcessGroup | None,
    chunk_size: int | None,
    vocab_size: int | None,
    grad_scale: float | None,
) -> MicroBatchLoss:
    """:func:`micro_batch_loss` through the fused head, the objective's gradient formed chunk by chunk
    in the forward pass (:mod:`psft_megatron.loss.fused_head_loss`): each chunk's terms are
    ``token_losses(...) / global_count``, the same terms :func:`normalized_loss` sums."""
    own = isinstance(logp_old, _OwnLogp)
    mask_f = loss_mask.reshape(-1)
    old_f = logp_old.reshape(-1) if isinstance(logp_old, torch.Tensor) else None
    ref_f = logp_ref.reshape(-1) if logp_ref is not None else None
    denom = global_count.clamp(min=1).to(torch.float32)

    def chunk_terms(lp: torch.Tensor, rows: slice) -> torch.Tensor:
        old = lp.detach() if own else (old_f[rows] if old_f is not None else None)
        ref = ref_f[rows] if ref_f is not None else None
        return token_losses(objective, lp, mask_f[rows], old, ref).loss / denom

    loss, ts = fused_head_loss(
        hidden, head.weight, labels, chunk_terms, tp_group=head.tp_group if head.tp_group is not None else tp_group,
        sequence_parallel=head.sequence_parallel, chunk_size=chunk_size, vocab_size=vocab_size,
        grad_scale=grad_scale,
    )  # fmt: skip
    with torch.no_grad():  # the statistics, from the detached logp (the objective again, elementwise)
        losses = token_losses(objective, ts.logp, loss_mask, ts.logp if own else logp_old, logp_ref)
    stats = LossStats.from_tokens(losses, ts.logp, ts.entropy, loss_mask)
    return MicroBatchLoss(loss=loss, logp=ts.logp, stats=stats)


@torch.no_grad()
def snapshot_logp(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    head: OutputHead | None = None,
) -> torch.Tensor:
    """Per-token label log-probs (fp32, no entropy, no graph) from the snapshot model's logits,
    or with ``head`` its hidden states (``vocab_size``: the true vocabulary size, padded columns
    beyond it excluded)."""
    return output_token_stats(
        logits, labels, head=head, tp_group=tp_group, chunk_size=chunk_size, with_entropy=False, vocab_size=vocab_size
    ).logp
