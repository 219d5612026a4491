"""The fused output layer with the loss's gradient formed in the forward pass: three matmuls, not four.

:func:`~psft_megatron.loss.fused_head.fused_token_stats` returns differentiable logp and entropy,
so its backward must recompute each chunk's logits (the gradient reaching logp is known only
then): four logits-sized matmuls against the unfused path's three. The training loss needs
less: every objective is a per-token function of logp alone (``loss_t = f(logp_t)``, see
:mod:`psft_megatron.loss.objectives`), and the statistics use logp and entropy detached. So
once a chunk's logp is known, ``d loss / d logp_t`` is too, and the logits' gradient
``dL/dz = f'(logp) (onehot - softmax)`` can be formed while the chunk's logits are still there:
the hidden states' gradient ``g @ W`` and the weight's ``g.T @ x`` are computed right away and
the logits never need recomputing (the idea of Liger-Kernel's fused linear cross entropy, here
vocab-parallel and for any objective of logp).

The forward pass must also know the factor megatron's schedule applies to the loss in
backward (the upstream gradient ``s`` of the returned scalar). Two ways:

* ``grad_scale`` given (the trainer passes :func:`~psft_megatron.loss.normalize.megatron_loss_grad`)
  and the weight under megatron's DDP: the logits' gradient is formed for that ``s``, the weight's
  gradient accumulated chunk by chunk straight into ``weight.main_grad`` (the fp32 grad buffer) as
  the recomputing head does in backward, and the hidden states' gradient kept, already reduced over
  TP, until backward hands it on (it replaces the hidden states the recomputing head keeps: no
  extra memory). Backward checks that ``s`` is what was announced (on a GPU a device-side assert,
  no host sync) and raises if not: by then ``main_grad`` holds a gradient for the announced factor.
* otherwise the gradients are formed for ``s = 1`` and multiplied by ``s`` in backward; the weight's
  is summed in an fp32 ``[V/TP, h]`` buffer held from forward to backward (``main_grad`` may already
  hold other micro-batches' gradients, so this one's part cannot go there before ``s`` is known).
  In bf16 the hidden states' gradient is then rounded before it is scaled.

Tensor parallelism: each chunk's logp needs the whole vocabulary, so the two all-reduces of
:func:`~psft_megatron.loss.head_chunks.combine_shards` run per chunk (``[3, c]`` floats), not
once after the loop. The SP all-gather of the hidden states and the reduce-scatter of their
gradient both run in the forward pass here (the gradient is known there); padding and the
``main_grad`` convention are as in :mod:`psft_megatron.loss.fused_head`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from psft_megatron.loss.head_chunks import (
    ChunkPass,
    HeadLayout,
    combine_shards,
    gather_hidden,
    head_layout,
    scatter_hidden_grad,
    uses_main_grad,
    weight_grad_for_autograd,
)
from psft_megatron.loss.token_stats import TokenStats

# (logp of tokens [c0, c1) fp32, requires grad; slice(c0, c1) of the flattened labels) -> per-token loss
TokenLossFn = Callable[[torch.Tensor, slice], torch.Tensor]


def _loss_and_grad(
    token_loss: TokenLossFn, logp: torch.Tensor, rows: slice, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum(token_loss(logp, rows))`` and, with ``need_grad``, its gradient with respect to ``logp``
    (autograd on ``c`` elements: any objective of logp works without a hand-written derivative)."""
    if not need_grad:  # also the only way under torch.inference_mode, where enable_grad records nothing
        with torch.no_grad():
            return token_loss(logp, rows).sum(), None
    with torch.enable_grad():  # autograd.Function.forward runs with grad disabled
        lp = logp.detach().requires_grad_()
        total = token_loss(lp, rows).sum()
        (g,) = torch.autograd.grad(total, lp, allow_unused=True)
    return total.detach(), (g if g is not None else torch.zeros_like(lp))


def _check_announced(g_loss: torch.Tensor, grad_scale: float) -> None:
    """Raise if backward's gradient ``g_loss`` is not the ``grad_scale`` announced in forward (by then
    ``weight.main_grad`` holds a gradient for the announced factor)."""
    fix = ("announced in forward (and used for weight.main_grad): pass the factor the schedule applies "
           "(psft_megatron.loss.normalize.megatron_loss_grad), or grad_scale=None")  # fmt: skip
    if g_loss.is_cuda:  # checked on the device: no host sync in the training step's backward
        ok = (g_loss.float() - grad_scale).abs() <= 1e-6 * abs(grad_scale)
        torch._assert_async(ok, f"the fused head's loss got a gradient other than grad_scale={grad_scale} " + fix)
        return
    got = float(g_loss)
    if abs(got - grad_scale) > 1e-6 * abs(grad_scale):
        raise RuntimeError(f"the fused head's loss got gradient {got} in backward, but grad_scale={grad_scale} was " + fix)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, lay: HeadLayout, token_loss: TokenLossFn, want_x, want_w, grad_scale):
        x = gather_hidden(hidden, lay)
        x2 = x.reshape(-1, x.shape[-1])
        p = ChunkPass(x2, weight, labels, lay, with_entropy=True)
        n = p.n
        f32 = dict(dtype=torch.float32, device=x2.device)
        logp = torch.zeros(n, **f32)
        entropy = torch.zeros(n, **f32)
        loss = torch.zeros((), **f32)
        grad_x = (torch.empty_like(x2) if p.active else torch.zeros_like(x2)) if want_x else None
        # direct: the gradients are formed for the announced upstream factor, the weight's straight into main_grad.
        direct = grad_scale is not None and want_w and uses_main_grad(weight)
        acc = (weight.main_grad if direct else torch.zeros(weight.shape, **f32)) if want_w else None
        c = min(n, lay.chunk)
        m, s, t, label_z = (torch.empty(c, **f32) for _ in range(4))
        for c0 in p.chunks():  # every TP rank runs every chunk: combine_shards all-reduces
            c1 = p.end(c0)
            k = c1 - c0
            mk, sk, tk, lk = m[:k], s[:k], t[:k], label_z[:k]
            if p.active:
                z = p.logits(c0, c1)
                p.shard_sums(z, mk, sk, tk, lk, c0)
            else:  # a shard of padding only: nothing to add
                mk.fill_(float("-inf"))
                for buf in (sk, tk, lk):
                    buf.zero_()
            gmax, log_s, lp, ent = combine_shards(mk, sk, tk, lk, p.in_range[c0:c1], lay)
            logp[c0:c1], entropy[c0:c1] = lp, ent
            val, g_lp = _loss_and_grad(token_loss, lp, slice(c0, c1), want_x or want_w)
            loss += val
            if p.active and g_lp is not None:
                g = p.logits_grad_(z, c0, gmax, log_s, g_lp * grad_scale if direct else g_lp)
                p.backprop(g, z, c0, grad_x, acc)
        del p
        # Kept for backward as attributes (not save_for_backward): backward scales them in place once.
        ctx.grad_x = scatter_hidden_grad(grad_x.view(x.shape), lay) if want_x else None
        ctx.acc, ctx.weight = (None if direct else acc), weight
        ctx.direct, ctx.grad_scale = direct, grad_scale
        logp, entropy = logp.view(labels.shape), entropy.view(labels.shape)
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        if ctx.weight is None:
            raise RuntimeError("the fused head's loss was backpropagated twice; its gradients are used up after one")
        nones = (None,) * 6
        grad_x, acc, weight = ctx.grad_x, ctx.acc, ctx.weight
        ctx.grad_x = ctx.acc = ctx.weight = None
        if g_loss is None:
            return (None, None) + nones
        if ctx.direct:
            _check_announced(g_loss, ctx.grad_scale)
            return (grad_x, weight_grad_for_autograd(weight)) + nones
        if grad_x is not None:
            grad_x.mul_(g_loss.to(grad_x.dtype))
        grad_w = None
        if acc is not None:
            if uses_main_grad(weight):
                weight.main_grad.addcmul_(acc, g_loss.to(acc.dtype))  # megatron DDP's fp32 grad buffer
                grad_w = weight_grad_for_autograd(weight)
            else:
                grad_w = acc.mul_(g_loss.to(acc.dtype)).to(weight.dtype)
        return (grad_x, grad_w) + nones


def fused_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    token_loss: TokenLossFn,
    *,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    grad_scale: float | None = None,
) -> tuple[torch.Tensor, TokenStats]:
    """``sum_t token_loss(logp)_t`` through the output layer, and the detached per-token logp and entropy.

    The same loss and gradients as ``token_loss`` applied to
    :func:`~psft_megatron.loss.fused_head.fused_token_stats`' logp, without recomputing the logits
    in backward (see the module docstring). Arguments as ``fused_token_stats``, plus:

    Args:
        token_loss: maps the fp32 logp of the flattened tokens ``[c0, c1)`` (``labels.reshape(-1)``
            order; a leaf that requires grad) and ``slice(c0, c1)`` to their per-token loss
            terms; called once per chunk. It must be a function of logp alone (masked tokens: 0).
        grad_scale: the gradient backward will send into the returned loss, when known in advance
            (see the module docstring); under megatron's DDP the weight's gradient then goes into
            ``weight.main_grad`` during the forward pass, with no weight-sized buffer.

    Returns:
        ``(loss, stats)``: the scalar fp32 loss, differentiable with respect to ``hidden`` and
        ``weight`` (under megatron's DDP the weight's gradient lands in ``weight.main_grad``);
        :class:`TokenStats` with detached fp32 logp and entropy shaped like ``labels``. Without
        grad mode, or with neither input requiring grad, no gradient work is done.
    """
    lay = head_layout(
        hidden, weight, labels, tp_group=tp_group, sequence_parallel=sequence_parallel, chunk_size=chunk_size,
        vocab_size=vocab_size,
    )  # fmt: skip
    grad_on = torch.is_grad_enabled()
    want_x, want_w = grad_on and hidden.requires_grad, grad_on and weight.requires_grad
    out = _FusedHeadLoss.apply(hidden, weight, labels, lay, token_loss, want_x, want_w, grad_scale)
    loss, logp, entropy = out
    return loss, TokenStats(logp=logp, entropy=entropy)
