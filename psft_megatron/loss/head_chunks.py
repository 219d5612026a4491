"""The pieces both fused output layers are made of: one token chunk of logits at a time.

:mod:`psft_megatron.loss.fused_head` (differentiable logp / entropy, backward recomputes each
chunk's logits) and :mod:`psft_megatron.loss.fused_head_loss` (the loss's gradient formed in the
forward pass, no recompute) run the same steps, here once:

* :func:`head_layout` checks the inputs and fixes the TP group, chunk size and valid vocabulary rows;
* :func:`gather_hidden` / :func:`scatter_hidden_grad`: the sequence-parallel all-gather of the
  hidden states and the reduce-scatter (or, without SP, all-reduce over TP) of their gradient, as
  megatron's ``ColumnParallelLinear`` (``gather_output=False``) does;
* :class:`ChunkPass`: a chunk's fp32 logits, this shard's max / sums / label logit (the logits
  left intact), the logits' gradient in place and its two matmuls;
* :func:`combine_shards`: the two all-reduces that turn the shards' sums into logp and entropy;
* :func:`weight_grad_for_autograd`: megatron DDP's ``main_grad`` convention for the weight.

Vocabulary padding: rows ``>= vocab_size`` of the weight (global index) never enter the
matmul; they get probability 0 and exactly zero gradient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from psft_megatron.loss.groups import rank_and_size, resolve_tp_group
from psft_megatron.loss.token_stats import auto_chunk_size, softmax_grad_, stats_from_sums, valid_shard_columns

# Auto chunking: bytes of one fp32 logits chunk [c, V/TP]. Large enough that the chunk's
# matmuls (M = c tokens) run near full speed, small next to the logits they replace. On the
# 2-core CPU box, V = 128k, h = 1024: c = 130 tokens (64 MiB) cost 1.53x the unfused time,
# c = 520 (256 MiB) 1.32x, c = 1024 1.30x (recomputing head). On GPU 512 MiB is c = 1024 at
# V/TP = 128k. The elementwise passes then run over cache-sized row blocks of the chunk
# (token_stats.AUTO_CHUNK_BYTES).
FUSED_CHUNK_BYTES = {"cpu": 256 << 20, "cuda": 512 << 20}
# ... and at most this many tokens: past ~1-2k rows a GEMM runs at full speed on a GPU (on the CPU
# box 520 rows were already within 2% of 1024), so a small vocabulary shard (V/TP = 16k at TP = 8)
# gets 2k-token chunks, not 8k-token ones as large as a third of its whole logits.
FUSED_CHUNK_MAX_TOKENS = 2048

log = logging.getLogger(__name__)
_MIXED_ADDMM = True  # torch.addmm(out_dtype=) works here (CUDA); cleared after the first failure


def fused_chunk_size(vocab_local: int, device: torch.device | str = "cpu") -> int:
    """Tokens per fused chunk: one fp32 logits chunk under :data:`FUSED_CHUNK_BYTES`, at most
    :data:`FUSED_CHUNK_MAX_TOKENS`."""
    budget = FUSED_CHUNK_BYTES.get(torch.device(device).type, FUSED_CHUNK_BYTES["cuda"])
    return max(1, min(FUSED_CHUNK_MAX_TOKENS, budget // (4 * max(1, vocab_local))))


@dataclass(frozen=True)
class HeadLayout:
    """Where this rank's shard sits: TP group / size / rank, SP, tokens per chunk, valid weight rows."""

    group: dist.ProcessGroup | None
    world: int
    rank: int
    sp: bool
    chunk: int
    v_valid: int


def head_layout(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None,
    sequence_parallel: bool,
    chunk_size: int | None,
    vocab_size: int | None,
) -> HeadLayout:
    """Check the fused head's inputs (one-line errors) and fix its layout; see ``fused_token_stats``'s arguments."""
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
    v_valid = valid_shard_columns(vocab_size, v_local, rank, world)
    return HeadLayout(group=group, world=world, rank=rank, sp=sp, chunk=chunk, v_valid=v_valid)


def gather_hidden(hidden: torch.Tensor, lay: HeadLayout) -> torch.Tensor:
    """The whole sequence's hidden states: with SP the TP ranks' slices all-gathered along dim 0."""
    if not (lay.sp and lay.world > 1):
        return hidden
    out = torch.empty((hidden.shape[0] * lay.world, *hidden.shape[1:]), dtype=hidden.dtype, device=hidden.device)
    dist.all_gather_into_tensor(out, hidden.contiguous(), group=lay.group)
    return out


def scatter_hidden_grad(grad: torch.Tensor, lay: HeadLayout) -> torch.Tensor:
    """This rank's shard's part of the hidden states' gradient, summed over TP: reduce-scattered
    back to the SP slice, or all-reduced (every TP rank holds the same hidden states)."""
    if lay.world == 1:
        return grad
    if lay.sp:
        out = torch.empty((grad.shape[0] // lay.world, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=lay.group)
        return out
    dist.all_reduce(grad, group=lay.group)
    return grad


def uses_main_grad(weight: torch.Tensor) -> bool:
    """megatron DDP's grad buffer is there to accumulate into (megatron-FSDP's is not handled: plain grad)."""
    ddp = hasattr(weight, "main_grad") and hasattr(weight, "grad_added_to_main_grad")
    return ddp and not hasattr(weight, "__fsdp_param__")


def weight_grad_for_autograd(weight: torch.Tensor) -> torch.Tensor:
    """What backward returns for a weight whose gradient already went into ``weight.main_grad``.

    megatron's convention (``ColumnParallelLinear`` with ``gradient_accumulation_fusion``): a dummy
    gradient so DDP's hook fires on this thread; zeros where autograd adds another use (the tied
    embedding on one stage, ``zero_out_wgrad``), for which the hook then adds ``param.grad`` to
    ``main_grad``; else uninitialised (the hook ignores it). Sets ``grad_added_to_main_grad``.
    """
    if getattr(weight, "zero_out_wgrad", False):
        grad = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    else:
        grad = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    weight.grad_added_to_main_grad = True
    return grad


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


def combine_shards(
    m: torch.Tensor,
    s: torch.Tensor,
    t: torch.Tensor | None,
    label_z: torch.Tensor,
    in_range: torch.Tensor,
    lay: HeadLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per token ``(gmax, log_s, logp, entropy)`` from this shard's max ``m``, sums relative to it
    (``s`` = sum exp(z - m), ``t`` = sum exp(z - m)(z - m), None without entropy) and label logit.

    Two all-reduces over TP: MAX of the max, then one SUM of [label logit - max, sum exp, sum exp *
    (z - max)] with each shard's sums rescaled to the global max (a shard of padding only has
    m = -inf, s = 0). ``log_s`` = log sum exp(z - gmax) over the whole vocabulary.
    """
    gmax = m.clone()
    if lay.world > 1:
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=lay.group)
    scale = torch.exp(m - gmax)
    sums = torch.zeros(3 if t is not None else 2, m.shape[0], dtype=torch.float32, device=m.device)
    sums[0] = torch.where(in_range, label_z - gmax, torch.zeros_like(gmax))
    sums[1] = s * scale
    if t is not None:
        # sum_j e^{z_j - M}(z_j - M) = e^{m - M} (t + (m - M) s); where() keeps -inf * 0 out.
        sums[2] = torch.where(s > 0, (t + (m - gmax) * s) * scale, torch.zeros_like(s))
    log_s, logp, entropy = stats_from_sums(sums, lay.group, lay.world)
    return gmax, log_s, logp, entropy


class ChunkPass:
    """One pass over the token chunks of the hidden states ``x2`` ``[n, h]`` against the weight shard.

    Holds the chunk buffers (allocated once, reused): the logits of one chunk ``[c, V/TP]`` in the
    weight's dtype (if not fp32) and fp32, and cache-sized row-block buffers for the elementwise
    passes (``stats``: the buffers of :meth:`shard_sums`, which a backward pass does not run).
    ``local_idx`` / ``in_range``: each label's column in this shard, and whether it owns it.
    """

    def __init__(self, x2: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, lay: HeadLayout,
                 *, with_entropy: bool, entropy_grad: bool = False, stats: bool = True):  # fmt: skip
        self.x2, self.lay, self.n = x2, lay, x2.shape[0]
        self.weight = weight
        self.wv = weight[: lay.v_valid]  # padding rows never enter the matmul
        local = labels.reshape(-1).to(torch.int64) - lay.rank * weight.shape[0]
        self.in_range = (local >= 0) & (local < lay.v_valid)
        self.local_idx = torch.where(self.in_range, local, torch.zeros_like(local))
        self.active = bool(self.n and lay.v_valid)  # this shard has logits to compute
        f32 = dict(dtype=torch.float32, device=x2.device)
        rows = min(self.n, lay.chunk) if self.active else 0
        v = lay.v_valid if self.active else 0
        low = weight.dtype != torch.float32
        self.low = torch.empty(rows, v, dtype=weight.dtype, device=x2.device) if low else None
        self.f32 = torch.empty(rows, v, **f32)
        self.block = min(rows, auto_chunk_size(max(v, 1), x2.device))
        self.d_buf = torch.empty(self.block, v, **f32) if stats and with_entropy else None
        self.e_buf = torch.empty(self.block, v, **f32) if stats else None
        self.p_buf = torch.empty(self.block, v, **f32) if entropy_grad else None

    def chunks(self) -> range:
        """Start indices of the token chunks (the same on every TP rank: all run the same collectives)."""
        return range(0, self.n, self.lay.chunk)

    def end(self, c0: int) -> int:
        return min(self.n, c0 + self.lay.chunk)

    def logits(self, c0: int, c1: int) -> torch.Tensor:
        """fp32 ``x @ w.T`` ``[c, v]`` of tokens ``[c0, c1)``, the matmul in the weight's dtype
        (megatron's output layer's rounding)."""
        x = self.x2[c0:c1].to(self.wv.dtype)
        if self.low is None:
            return torch.matmul(x, self.wv.t(), out=self.f32[: c1 - c0])
        torch.matmul(x, self.wv.t(), out=self.low[: c1 - c0])
        return self.f32[: c1 - c0].copy_(self.low[: c1 - c0])

    def shard_sums(self, z: torch.Tensor, m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None,
                   label_z: torch.Tensor, c0: int) -> None:  # fmt: skip
        """Write this shard's max, sum exp(z - max), sum exp(z - max)(z - max) (``t`` not None) and
        label logit of the chunk ``z`` (tokens from ``c0``) into ``m``, ``s``, ``t``, ``label_z``
        (indexed from 0 for this chunk). ``z`` is left unchanged."""
        c = z.shape[0]
        label_z.copy_(z.gather(1, self.local_idx[c0 : c0 + c].unsqueeze(1)).squeeze(1))
        for r0 in range(0, c, self.block):
            r1 = min(c, r0 + self.block)
            zr, e = z[r0:r1], self.e_buf[: r1 - r0]
            m[r0:r1] = zr.amax(dim=1)
            if t is not None:
                d = torch.sub(zr, m[r0:r1].unsqueeze(1), out=self.d_buf[: r1 - r0])
                torch.exp(d, out=e)
                s[r0:r1] = e.sum(dim=1)
                t[r0:r1] = e.mul_(d).sum(dim=1)  # row-wise dot in place (a bmm is ~10x slower on CPU)
            else:
                torch.sub(zr, m[r0:r1].unsqueeze(1), out=e)
                s[r0:r1] = e.exp_().sum(dim=1)

    def logits_grad_(self, z: torch.Tensor, c0: int, gmax: torch.Tensor, log_s: torch.Tensor, g_lp: torch.Tensor,
                     entropy: torch.Tensor | None = None, g_h: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Overwrite the chunk's fp32 logits ``z`` with the gradient of ``sum_t g_lp_t logp_t + g_h_t H_t``
        (per-token vectors of this chunk, indexed from 0) and return it in the weight's dtype, as the
        unfused path's logits gradient has it (:func:`~psft_megatron.loss.token_stats.softmax_grad_`)."""
        c = z.shape[0]
        for r0 in range(0, c, self.block):  # cache-sized row blocks
            r1 = min(c, r0 + self.block)
            softmax_grad_(
                z[r0:r1], z[r0:r1], gmax[r0:r1], log_s[r0:r1], g_lp[r0:r1],
                entropy[r0:r1] if g_h is not None else None, g_h[r0:r1] if g_h is not None else None,
                self.p_buf[: r1 - r0] if g_h is not None else None,
            )  # fmt: skip
        onehot = torch.where(self.in_range[c0 : c0 + c], g_lp, torch.zeros_like(g_lp))
        z.scatter_add_(1, self.local_idx[c0 : c0 + c].unsqueeze(1), onehot.unsqueeze(1))
        return z if self.low is None else self.low[:c].copy_(z)

    def backprop(self, g: torch.Tensor, z: torch.Tensor, c0: int,
                 grad_x: torch.Tensor | None, acc: torch.Tensor | None) -> None:  # fmt: skip
        """``grad_x[c0:c1] = g @ W`` and ``acc[:v_valid] += g.T @ x[c0:c1]`` for the chunk's logits
        gradient ``g`` (weight's dtype; ``z`` its fp32 buffer, free to overwrite)."""
        c1 = c0 + g.shape[0]
        if grad_x is not None:
            if grad_x.dtype == g.dtype:
                torch.matmul(g, self.wv, out=grad_x[c0:c1])
            else:  # e.g. fp32 hidden states with a bf16 weight
                grad_x[c0:c1].copy_(torch.matmul(g, self.wv))
        if acc is not None:
            _accumulate_wgrad(acc[: self.lay.v_valid], g, z, self.x2[c0:c1].to(self.weight.dtype))
