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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from psft_megatron.loss.groups import rank_and_size, resolve_tp_group
from psft_megatron.loss.token_stats import TokenStats, auto_chunk_size, softmax_grad_, stats_from_sums

# Auto chunking: bytes of one fp32 logits chunk [c, V/TP]. Large enough that the chunk's
# matmuls (M = c tokens) run near full speed, small next to the logits they replace. On the
# 2-core CPU box, V = 128k, h = 1024: c = 130 tokens (64 MiB) cost 1.53x the unfused time,
# c = 520 (256 MiB) 1.32x, c = 1024 1.30x. On GPU 512 MiB is c = 1024 at V/TP = 128k. The
# elementwise passes then run over cache-sized row blocks of the chunk (token_stats.AUTO_CHUNK_BYTES).
FUSED_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 512 << 20}

log = logging.getLogger(__name__)
_MIXED_ADDMM = True  # torch.addmm(out_dtype=) works here (CUDA); cleared after the first failure


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


def fused_chunk_size(vocab_local: int, device: torch.device | str = "cpu") -> int:
    """Tokens per fused chunk so that one fp32 logits chunk stays under :data:`FUSED_CHUNK_BYTES`."""
    budget = FUSED_CHUNK_BYTES.get(torch.device(device).type, FUSED_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * max(1, vocab_local)))


def _all_gather_seq(x: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    out = torch.empty((x.shape[0] * world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_seq(g: torch.Tensor, group: dist.ProcessGroup, world: int) -> torch.Tensor:
    out = torch.empty((g.shape[0] // world, *g.shape[1:]), dtype=g.dtype, device=g.device)
    dist.reduce_scatter_tensor(out, g.contiguous(), group=group)
    return out


def _uses_main_grad(weight: torch.Tensor) -> bool:
    """megatron DDP's grad buffer is there to accumulate into (megatron-FSDP's is not handled: plain grad)."""
    ddp = hasattr(weight, "main_grad") and hasattr(weight, "grad_added_to_main_grad")
    return ddp and not hasattr(weight, "__fsdp_param__")


class _Chunks:
    """Reusable buffers for one chunk's logits: [c, v] in the weight's dtype (if not fp32) and fp32."""

    def __init__(self, rows: int, v: int, dtype: torch.dtype, device: torch.device):
        self.low = torch.empty(rows, v, dtype=dtype, device=device) if dtype != torch.float32 else None
        self.f32 = torch.empty(rows, v, dtype=torch.float32, device=device)

    def logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """fp32 ``x @ w.T`` ``[c, v]``, the matmul in ``w``'s dtype (megatron's output layer's rounding)."""
        c = x.shape[0]
        x = x.to(w.dtype)
        if self.low is None:
            return torch.matmul(x, w.t(), out=self.f32[:c])
        torch.matmul(x, w.t(), out=self.low[:c])
        return self.f32[:c].copy_(self.low[:c])


def _accumulate_wgrad(acc: torch.Tensor, g: torch.Tensor, g32: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += g.T @ x`` for one chunk; ``g`` and ``x`` in the weight's dtype, ``g32`` the fp32 buffer
    ``g`` was rounded from (free to overwrite).

    A low-precision weight with an fp32 accumulator (DDP's fp32 main_grad, or the plain-autograd
    accumulator) sums the exact products of the low-precision values in fp32, as megatron's
    ``wgrad_gemm_accum_fp32`` does: no rounding of each chunk's product to bf16.
    """
    global _MIXED_ADDMM
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), x)
    elif acc.is_cuda and _MIXED_ADDMM:
        try:  # cuBLAS: bf16 inputs, fp32 output accumulated in place (torch's documented out_dtype)
            torch.addmm(acc, g.t(), x, out_dtype=acc.dtype, out=acc)
        except (RuntimeError, TypeError) as e:  # an older torch: round each chunk's product instead
            log.warning("addmm(out_dtype=%s) unavailable (%s); summing bf16 chunk products in fp32", acc.dtype, e)
            _MIXED_ADDMM = False
            acc.add_(torch.matmul(g.t(), x))
    elif acc.is_cuda:
        acc.add_(torch.matmul(g.t(), x))
    else:  # CPU has no mixed-dtype GEMM: the same bf16 values as fp32 (exact), an fp32 GEMM
        g32.copy_(g)
        acc.addmm_(g32.t(), x.to(acc.dtype))


class _FusedHeadTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group, world, rank, sp, chunk, with_entropy, v_valid):
        x = _all_gather_seq(hidden, group, world) if sp and world > 1 else hidden
        h = x.shape[-1]
        x2 = x.reshape(-1, h)
        n, v_local = x2.shape[0], weight.shape[0]
        local = labels.reshape(-1).to(torch.int64) - rank * v_local
        in_range = (local >= 0) & (local < v_valid)
        local_idx = torch.where(in_range, local, torch.zeros_like(local))
        f32 = dict(dtype=torch.float32, device=x.device)

        # This shard's per-token max, sums relative to it, and label logit.
        m = torch.full((n,), float("-inf"), **f32)
        s = torch.zeros(n, **f32)
        t = torch.zeros(n, **f32) if with_entropy else None
        label_z = torch.zeros(n, **f32)
        if n and v_valid:
            wv = weight[:v_valid]  # padding rows never enter the matmul
            rows = min(n, chunk)
            bufs = _Chunks(rows, v_valid, weight.dtype, x.device)
            block = min(rows, auto_chunk_size(v_valid, x.device))  # cache-sized elementwise passes
            e_buf = torch.empty(block, v_valid, **f32) if with_entropy else None
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                z = bufs.logits(x2[c0:c1], wv)
                label_z[c0:c1] = z.gather(1, local_idx[c0:c1].unsqueeze(1)).squeeze(1)
                for r0 in range(0, c1 - c0, block):
                    r1 = min(c1 - c0, r0 + block)
                    zr, rs = z[r0:r1], slice(c0 + r0, c0 + r1)
                    m[rs] = zr.amax(dim=1)
                    zr.sub_(m[rs].unsqueeze(1))
                    if with_entropy:
                        e = e_buf[: r1 - r0]
                        torch.exp(zr, out=e)
                        s[rs] = e.sum(dim=1)
                        t[rs] = zr.mul_(e).sum(dim=1)
                    else:
                        s[rs] = zr.exp_().sum(dim=1)
            del bufs, e_buf

        # Combine the shards: the global max, then one SUM of [label logit - max, sum exp, sum exp * (z - max)]
        # with each shard's sums rescaled to the global max (a shard of padding only has m = -inf, s = 0).
        gmax = m.clone()
        if world > 1:
            dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(m - gmax)
        sums = torch.zeros(3 if with_entropy else 2, n, **f32)
        sums[0] = torch.where(in_range, label_z - gmax, torch.zeros_like(gmax))
        sums[1] = s * scale
        if with_entropy:
            # sum_j e^{z_j - M}(z_j - M) = e^{m - M} (t + (m - M) s); where() keeps -inf * 0 out.
            sums[2] = torch.where(s > 0, (t + (m - gmax) * s) * scale, torch.zeros_like(s))
        log_s, logp, entropy = stats_from_sums(sums, group, world)

        # Only the local hidden slice is kept; backward gathers it again (as megatron does).
        ctx.save_for_backward(hidden, weight, local_idx, in_range, gmax, log_s, entropy if with_entropy else log_s)
        ctx.group, ctx.world, ctx.sp, ctx.chunk, ctx.v_valid = group, world, sp, chunk, v_valid
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)  # an unused output gives None: skip its term in backward
        shape = labels.shape
        if with_entropy:
            return logp.view(shape), entropy.view(shape)
        return logp.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden, weight, local_idx, in_range, gmax, log_s, entropy = ctx.saved_tensors
        nones = (None,) * 8
        if not ctx.with_entropy:
            g_ent = None
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_logp is None and g_ent is None) or not (want_x or want_w):
            return (None, None) + nones
        group, world, sp, chunk, v_valid = ctx.group, ctx.world, ctx.sp, ctx.chunk, ctx.v_valid
        x = _all_gather_seq(hidden, group, world) if sp and world > 1 else hidden
        h = x.shape[-1]
        x2 = x.reshape(-1, h)
        n = x2.shape[0]
        f32 = dict(dtype=torch.float32, device=x.device)
        g_lp = g_logp.reshape(-1).float() if g_logp is not None else torch.zeros(n, **f32)
        g_h = g_ent.reshape(-1).float() if g_ent is not None else None
        onehot_val = torch.where(in_range, g_lp, torch.zeros_like(g_lp)).unsqueeze(1)

        # Every row is written below, unless there is nothing to compute (then the gradient is 0).
        grad_x = (torch.empty_like(x2) if n and v_valid else torch.zeros_like(x2)) if want_x else None
        to_main = want_w and _uses_main_grad(weight)
        if to_main:
            acc = weight.main_grad  # megatron DDP's grad buffer: accumulate into it directly
        elif want_w:
            acc = torch.zeros(weight.shape, **f32)
        if n and v_valid:
            wv = weight[:v_valid]
            acc_v = acc[:v_valid] if want_w else None
            rows = min(n, chunk)
            bufs = _Chunks(rows, v_valid, weight.dtype, x.device)
            block = min(rows, auto_chunk_size(v_valid, x.device))
            p_buf = torch.empty(block, v_valid, **f32) if g_h is not None else None
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                z = bufs.logits(x2[c0:c1], wv)
                for r0 in range(0, c1 - c0, block):  # the logits' gradient, in place, cache-sized blocks
                    r1 = min(c1 - c0, r0 + block)
                    rs = slice(c0 + r0, c0 + r1)
                    softmax_grad_(
                        z[r0:r1], z[r0:r1], gmax[rs], log_s[rs], g_lp[rs],
                        entropy[rs] if g_h is not None else None, g_h[rs] if g_h is not None else None,
                        p_buf[: r1 - r0] if p_buf is not None else None,
                    )  # fmt: skip
                z.scatter_add_(1, local_idx[c0:c1].unsqueeze(1), onehot_val[c0:c1])
                # The logits' gradient in the weight's dtype, as the unfused path has it.
                g = z if bufs.low is None else bufs.low[: c1 - c0].copy_(z)
                if want_x:
                    if grad_x.dtype == g.dtype:
                        torch.matmul(g, wv, out=grad_x[c0:c1])
                    else:  # e.g. fp32 hidden states with a bf16 weight
                        grad_x[c0:c1].copy_(torch.matmul(g, wv))
                if want_w:
                    _accumulate_wgrad(acc_v, g, z, x2[c0:c1].to(weight.dtype))
            del bufs, p_buf

        if want_x:
            grad_x = grad_x.view(x.shape)
            if world > 1:
                if sp:
                    grad_x = _reduce_scatter_seq(grad_x, group, world)
                else:
                    dist.all_reduce(grad_x, group=group)
        grad_w = None
        if to_main:
            # megatron's convention (ColumnParallelLinear with gradient_accumulation_fusion): a dummy
            # gradient so DDP's hook fires on this thread; zeros where autograd adds another use
            # (tied embedding on one stage), for which the hook then adds param.grad to main_grad.
            if getattr(weight, "zero_out_wgrad", False):
                grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            else:
                grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            weight.grad_added_to_main_grad = True
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
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: need [..., h] and [V/TP, h]")
    group = resolve_tp_group(tp_group)
    rank, world = rank_and_size(group)
    sp = bool(sequence_parallel) and world > 1
    tokens_shape = (hidden.shape[0] * world, *hidden.shape[1:-1]) if sp else hidden.shape[:-1]
    if tuple(tokens_shape) != tuple(labels.shape):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match the hidden states' tokens {tuple(tokens_shape)}"
            + (" (sequence-parallel slices gathered)" if sp else "")
        )
    v_local = weight.shape[0]
    chunk = fused_chunk_size(v_local, hidden.device) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    v_valid = v_local
    if vocab_size is not None:
        if not 1 <= vocab_size <= v_local * world:
            raise ValueError(f"vocab_size must be in [1, {v_local * world}] (the padded vocabulary), got {vocab_size}")
        v_valid = min(max(int(vocab_size) - rank * v_local, 0), v_local)
    out = _FusedHeadTokenStats.apply(hidden, weight, labels, group, world, rank, sp, chunk, with_entropy, v_valid)
    if with_entropy:
        return TokenStats(logp=out[0], entropy=out[1])
    return TokenStats(logp=out, entropy=None)
