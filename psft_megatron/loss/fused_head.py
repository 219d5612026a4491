"""The output layer and the token statistics in one pass: the logits never exist as a whole.

Input: the final-norm hidden states exactly as megatron's output layer receives them
(``[s, b, h]``, or with sequence parallelism this rank's ``[s/TP, b, h]`` slice), the local
vocabulary shard of the output weight ``[V/TP, h]`` (the output layer's own, or the tied
word embedding), labels ``[s, b]``. Output: the same :class:`TokenStats` as
:func:`~psft_megatron.loss.token_stats.vocab_parallel_token_stats` on the logits
``hidden @ weight.T`` would give (per-token fp32 logp and entropy, both differentiable).

Chunk by chunk over tokens: logits ``[c, V/TP]`` of that chunk only (a matmul in the
weight's dtype, as megatron's output layer computes them, then fp32), this shard's max,
sum exp(z - max), sum exp(z - max)(z - max) and the label's logit, then the chunk's buffers
are reused. After the loop two all-reduces over TP combine the shards: MAX of the max, then
one SUM of the label logit - max and the sums, each shard's sums rescaled by
exp(shard max - global max) (so nothing waits for communication inside the loop).
Backward recomputes each chunk's logits, forms their gradient in fp32 (the same formula as
the unfused loss, :func:`~psft_megatron.loss.token_stats.softmax_grad_`), casts it to the
weight's dtype (the unfused path's logits gradient has that dtype too) and accumulates
``grad_hidden = g @ W`` and ``grad_weight += g.T @ hidden``. No ``[T, V/TP]`` tensor
exists at any time: working memory is a few ``[c, V/TP]`` chunk buffers.

Tensor / sequence parallelism, as megatron's ``ColumnParallelLinear`` (``gather_output=False``)
does it: with ``sequence_parallel`` the hidden slices are all-gathered along the sequence
inside the forward and again in backward (only the local slice is kept in between), and the
hidden-state gradient is reduce-scattered back to ``[s/TP, b, h]``; without it the hidden
states are the same on every TP rank and their gradient is all-reduced over TP (each rank
only has its vocabulary shard's part). Context parallelism needs nothing: tokens are
independent here.

The weight gradient goes where megatron's own layers put it. Under megatron's
``DistributedDataParallel`` (the weight has ``main_grad`` and ``grad_added_to_main_grad``)
it is accumulated chunk by chunk straight into ``weight.main_grad`` (the fp32 grad buffer),
as ``ColumnParallelLinear`` does with ``gradient_accumulation_fusion``, and autograd gets a
dummy gradient of megatron's kind (zeros where megatron set ``zero_out_wgrad``, the tied
embedding on a single stage, whose embedding-lookup gradient is added to it by autograd;
else uninitialised, and the DDP hook ignores it). Either way DDP's reduction and
``finalize_model_grads`` (which sums the tied embedding's ``main_grad`` over the pipeline
ends) see the usual buffers. Without ``main_grad`` (plain autograd) the gradient is summed
in fp32 and returned in the weight's dtype.

Vocabulary padding: rows ``>= vocab_size`` of the weight (global index) never enter the
matmul; they get probability 0 and exactly zero gradient, as in ``vocab_parallel_token_stats``.

Cost: four logits-sized matmuls (forward, the recompute, the two gradients) against the
unfused path's three. The trainer's loss, whose gradient reaches the head only through logp,
uses :mod:`psft_megatron.loss.fused_head_loss` instead, which forms that gradient in the
forward pass (three matmuls); this function serves any differentiable use of logp and entropy.
The chunk steps both share are in :mod:`psft_megatron.loss.head_chunks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from psft_megatron.loss.head_chunks import (
    FUSED_CHUNK_BYTES,
    ChunkPass,
    combine_shards,
    fused_chunk_size,
    gather_hidden,
    head_layout,
    scatter_hidden_grad,
    uses_main_grad,
    weight_grad_for_autograd,
)
from psft_megatron.loss.token_stats import TokenStats

__all__ = ["FUSED_CHUNK_BYTES", "OutputHead", "fused_chunk_size", "fused_token_stats"]


@dataclass(frozen=True)
class OutputHead:
    """The output layer as the fused loss needs it (see :func:`psft_megatron.model.gpt.loss_head`).

    ``weight``: local vocabulary shard ``[V_pad/TP, h]`` (the tied embedding where shared);
    ``sequence_parallel``: the hidden states are sequence-parallel slices; ``tp_group``: the
    output layer's tensor-parallel group (None: megatron's default).
    """

    weight: torch.Tensor
    sequence_parallel: bool = False
    tp_group: dist.ProcessGroup | None = None


class _FusedHeadTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, lay, with_entropy):
        x2 = gather_hidden(hidden, lay).reshape(-1, hidden.shape[-1])
        p = ChunkPass(x2, weight, labels, lay, with_entropy=with_entropy)
        n = p.n
        f32 = dict(dtype=torch.float32, device=x2.device)
        # This shard's per-token max, sums relative to it, and label logit, chunk by chunk; the
        # shards are combined once after the loop (nothing waits for communication inside it).
        m = torch.full((n,), float("-inf"), **f32)
        s = torch.zeros(n, **f32)
        t = torch.zeros(n, **f32) if with_entropy else None
        label_z = torch.zeros(n, **f32)
        if p.active:
            for c0 in p.chunks():
                c1 = p.end(c0)
                z = p.logits(c0, c1)
                p.shard_sums(z, m[c0:c1], s[c0:c1], t[c0:c1] if with_entropy else None, label_z[c0:c1], c0)
        in_range = p.in_range
        del p  # the chunk buffers
        gmax, log_s, logp, entropy = combine_shards(m, s, t, label_z, in_range, lay)

        # Only the local hidden slice is kept; backward gathers it again (as megatron does).
        ctx.save_for_backward(hidden, weight, labels, gmax, log_s, entropy if with_entropy else log_s)
        ctx.lay, ctx.with_entropy = lay, with_entropy
        ctx.set_materialize_grads(False)  # an unused output gives None: skip its term in backward
        shape = labels.shape
        if with_entropy:
            return logp.view(shape), entropy.view(shape)
        return logp.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, labels, gmax, log_s, entropy = ctx.saved_tensors
        nones = (None,) * 3
        if not ctx.with_entropy:
            g_ent = None
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (want_x or want_w):
            return (None, None) + nones
        lay = ctx.lay
        x = gather_hidden(hidden, lay)
        x2 = x.reshape(-1, x.shape[-1])
        p = ChunkPass(x2, weight, labels, lay, with_entropy=False, entropy_grad=g_ent is not None, stats=False)
        n = p.n
        f32 = dict(dtype=torch.float32, device=x2.device)
        g_lp = g_logp.reshape(-1).float() if g_logp is not None else torch.zeros(n, **f32)
        g_h = g_ent.reshape(-1).float() if g_ent is not None else None

        # Every row is written below, unless there is nothing to compute (then the gradient is 0).
        grad_x = (torch.empty_like(x2) if p.active else torch.zeros_like(x2)) if want_x else None
        to_main = want_w and uses_main_grad(weight)
        acc = None
        if to_main:
            acc = weight.main_grad  # megatron DDP's grad buffer: accumulate into it directly
        elif want_w:
            acc = torch.zeros(weight.shape, **f32)
        if p.active:
            for c0 in p.chunks():
                rs = slice(c0, p.end(c0))
                z = p.logits(rs.start, rs.stop)  # recomputed
                g = p.logits_grad_(
                    z, c0, gmax[rs], log_s[rs], g_lp[rs],
                    entropy[rs] if g_h is not None else None, g_h[rs] if g_h is not None else None,
                )  # fmt: skip
                p.backprop(g, z, c0, grad_x, acc)
        del p

        if want_x:
            grad_x = scatter_hidden_grad(grad_x.view(x.shape), lay)
        grad_w = None
        if to_main:
            grad_w = weight_grad_for_autograd(weight)
        elif want_w:
            grad_w = acc if acc.dtype == weight.dtype else acc.to(weight.dtype)
        return (grad_x, grad_w) + nones


def fused_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    vocab_size: int | None = None,
) -> TokenStats:
    """Log-prob of each label and each token's entropy from hidden states and the output weight.

    Equals ``vocab_parallel_token_stats(megatron_output_layer(hidden), labels, ...)`` without
    ever holding the logits (see the module docstring).

    Args:
        hidden: ``[..., h]`` final-norm hidden states, float; with ``sequence_parallel`` this
            rank's slice ``[s/TP, ..., h]`` of the sequence (dim 0), gathered here.
        weight: ``[V_pad/TP, h]`` this rank's vocabulary shard of the output weight (rows
            ``[r*V_pad/TP, (r+1)*V_pad/TP)`` on TP rank r), the tied embedding where shared.
        labels: ``[...]`` int64 global token ids shaped like the (gathered) hidden states without
            ``h``; ids outside ``[0, V)`` give a finite, meaningless logp (mask them).
        tp_group: tensor-parallel group; default megatron's, or one rank without its parallel state.
        sequence_parallel: ``hidden`` is sequence-parallel (megatron's ``config.sequence_parallel``).
        chunk_size: tokens per chunk of logits; None picks :func:`fused_chunk_size`.
        with_entropy: also return the entropy.
        vocab_size: the true vocabulary size V; weight rows with global index >= V (padding)
            are excluded exactly. None (or the padded size): every row is real.

    Returns:
        :class:`TokenStats`, fp32, shaped like ``labels``; gradients flow to ``hidden`` and
        ``weight`` (into ``weight.main_grad`` under megatron's DDP, see the module docstring).
    """
    lay = head_layout(
        hidden, weight, labels, tp_group=tp_group, sequence_parallel=sequence_parallel, chunk_size=chunk_size,
        vocab_size=vocab_size,
    )  # fmt: skip
    out = _FusedHeadTokenStats.apply(hidden, weight, labels, lay, with_entropy)
    if with_entropy:
        return TokenStats(logp=out[0], entropy=out[1])
    return TokenStats(logp=out, entropy=None)
