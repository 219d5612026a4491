"""Per-token log-prob of the label and entropy from vocabulary-parallel logits.

Input: logits ``[s, b, V/TP]`` sharded over the vocabulary across the tensor-parallel
group, exactly as megatron's output layer (``ColumnParallelLinear`` with
``gather_output=False``) returns them, in fp32 or bf16; labels ``[s, b]`` int64.
Output, per token, in fp32: ``logp`` = log softmax(z)[label] and
``entropy`` = -sum_j p_j log p_j, both differentiable with respect to the logits.

Why not megatron's ``tensor_parallel.vocab_parallel_cross_entropy``:
  * it overwrites fp32 logits in place (``-= max``, ``exp(out=)``), so the caller's
    logits are garbage afterwards;
  * it gives no entropy, which PSFT monitors (and an entropy bonus would differentiate);
  * it keeps a full fp32 softmax shard alive from forward to backward, and its label
    smoothing averages over the local shard only.
Here everything is computed in fp32 from two all-reduces of per-token scalars (the max;
then the label's logit, sum exp(z - max) and sum exp(z - max) * (z - max) packed into one),
the vocabulary is never gathered, the fp32 working copy exists one token chunk at a time,
and backward recomputes the softmax from the (saved, untouched) logits: no communication
in backward. Backward forms log p as ``(z - max) - log_s`` with the max and the log-sum kept
apart, so it is as exact as fp32 ``log_softmax`` even at logits of 1e4 and more (one fp32
``max + log_s`` would put half an ulp of the max, ~1e-3 at 2.5e4, into every log p).
To never hold the logits at all, see :mod:`psft_megatron.loss.fused_head`.

Memory (one fp32 shard = tokens x V/TP x 4 bytes): kept from forward to backward are a
reference to the logits themselves (0.5 shard for bf16 logits, which megatron's CE would
replace by a 1-shard fp32 softmax) and six per-token vectors. Forward peaks at two fp32
chunk buffers; backward at the gradient (one shard in the logits' dtype, none with
``inplace=True``) plus at most two fp32 chunk buffers.

Vocabulary padding: the embedding / output layer is padded to a multiple of
``make_vocab_size_divisible_by`` (see ``ModelConfig.padded_vocab_size`` in :mod:`psft_megatron.model.config`),
and the output layer produces logits for the padded columns too (zeros for a model converted
from HF, random for a fresh one). Pass ``vocab_size`` (the true vocabulary size) to exclude
every column with global index >= ``vocab_size`` exactly, as if its logit were -inf: it gets
probability 0, adds nothing to the max, the sum of exponentials or the entropy, and its
gradient is exactly 0. No mask is built: only the shards holding padding (the last ones) do
anything different, and they read and compute on the valid leading columns of their shard
only (a shard made of padding alone contributes -inf to the max and 0 to the sums). With
``vocab_size=None`` (or the padded size) every column is part of the softmax, as in
megatron's own cross entropy.

Labels outside ``[0, V)`` (e.g. -100 on masked tokens; with ``vocab_size``, V is the true
size, so a label on a padded column counts as outside) are safe: no rank owns them, the
label logit counts as 0, and ``logp`` is finite but meaningless; mask such tokens out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from psft_megatron.loss.groups import rank_and_size, resolve_tp_group

# Auto chunking: bytes per fp32 working buffer (forward with entropy and backward with an
# entropy gradient hold two). On CPU the passes over a chunk are cache-bound: chunks that stay
# in L2 ran ~2x faster than whole shards (2-core box, V = 16k..128k). On GPU large chunks
# keep the per-chunk kernel launches negligible.
AUTO_CHUNK_BYTES = {"cpu": 1 << 20, "cuda": 128 << 20}


@dataclass
class TokenStats:
    """Per-token outputs of :func:`vocab_parallel_token_stats`, shaped like the labels, fp32."""

    logp: torch.Tensor
    entropy: torch.Tensor | None


def auto_chunk_size(vocab_local: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk so that one fp32 working buffer stays under :data:`AUTO_CHUNK_BYTES`."""
    budget = AUTO_CHUNK_BYTES.get(torch.device(device).type, AUTO_CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * max(1, vocab_local)))


def valid_shard_columns(vocab_size: int | None, v_local: int, rank: int, world: int) -> int:
    """Leading columns of TP rank ``rank``'s vocabulary shard (``v_local`` wide) that are real
    vocabulary, not padding (see the module docstring); ``vocab_size`` None: all of them."""
    if vocab_size is None:
        return v_local
    if not 1 <= vocab_size <= v_local * world:
        raise ValueError(f"vocab_size must be in [1, {v_local * world}] (the padded vocabulary), got {vocab_size}")
    return min(max(int(vocab_size) - rank * v_local, 0), v_local)


def softmax_grad_(
    out: torch.Tensor,
    z: torch.Tensor,
    m: torch.Tensor,
    log_s: torch.Tensor,
    g_lp: torch.Tensor,
    entropy: torch.Tensor | None = None,
    g_h: torch.Tensor | None = None,
    p_buf: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write into fp32 ``out`` ``[c, v]`` the gradient of ``sum_t g_lp_t logp_t + g_h_t H_t``
    with respect to the logits ``z`` ``[c, v]`` of one chunk, except the label's one-hot term
    ``+g_lp_t`` (the caller scatters it in: only the rank owning the label has it).

    Per token: ``m`` the max over the whole vocabulary, ``log_s`` = log sum exp(z - m),
    ``entropy`` H. d logp / dz_j = 1[j = label] - p_j and d H / dz_j = -p_j (log p_j + H).
    ``log p_j`` is computed as ``(z_j - m) - log_s``: the first difference is exact near the
    max whatever the logits' magnitude, whereas subtracting one fp32 ``m + log_s`` puts half
    an ulp of ``m`` into every log p (~1e-3 at |z| ~ 2.5e4). ``out`` may be ``z`` itself
    (fp32 logits overwritten in place); ``p_buf`` (fp32 ``[c, v]``) is needed with ``g_h``.
    """
    torch.sub(z, m.unsqueeze(1), out=out)  # bf16 - fp32 computes in fp32
    out.sub_(log_s.unsqueeze(1))  # log p_j
    if g_h is not None:
        torch.exp(out, out=p_buf)
        # -p * (g_lp + g_h * (log p + H)), with the signs folded into the factors
        out.add_(entropy.unsqueeze(1)).mul_(-g_h.unsqueeze(1))
        out.sub_(g_lp.unsqueeze(1)).mul_(p_buf)
    else:
        out.exp_().mul_(-g_lp.unsqueeze(1))  # -p * g_lp
    return out


def stats_from_sums(
    sums: torch.Tensor, group: dist.ProcessGroup | None, world: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per token ``(log_s, logp, entropy)`` from this shard's fp32 sums relative to the global max
    ``m``: rows ``[label logit - m, sum exp(z - m)]`` and, for the entropy, ``sum exp(z - m)(z - m)``,
    summed over the tensor-parallel ranks here (one all-reduce). ``log_s`` = log sum exp(z - m);
    ``entropy`` is None without the third row."""
    if world > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    log_s = sums[1].log()
    logp = sums[0] - log_s
    entropy = log_s - sums[2] / sums[1] if sums.shape[0] == 3 else None
    return log_s, logp, entropy


class _VocabParallelTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, world, rank, chunk, with_entropy, inplace, v_valid):
        v_local = logits.shape[-1]
        z = logits.reshape(-1, v_local)  # a view for contiguous logits: no copy
        n = z.shape[0]
        # Columns [v_valid, v_local) of this shard are vocabulary padding (see the module
        # docstring): everything below reads the valid leading columns only (a strided view).
        zv = z if v_valid == v_local else z[:, :v_valid]
        local = labels.reshape(-1).to(torch.int64) - rank * v_local
        in_range = (local >= 0) & (local < v_valid)
        local_idx = torch.where(in_range, local, torch.zeros_like(local))

        # Global max per token. Max is exact in any dtype, so read the logits as they are
        # instead of materialising an fp32 copy for it. A shard of padding only: -inf.
        if n and v_valid:
            m = zv.amax(dim=-1).float()
        else:
            m = torch.full((n,), float("-inf"), dtype=torch.float32, device=z.device)
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)

        # Rows: label logit - max (only the owning rank contributes), sum exp(z - max),
        # sum exp(z - max) * (z - max). One SUM all-reduce for all three.
        sums = torch.zeros(3 if with_entropy else 2, n, dtype=torch.float32, device=z.device)
        label_z = z.gather(1, local_idx.unsqueeze(1)).squeeze(1).float()
        sums[0] = torch.where(in_range, label_z - m, torch.zeros_like(m))
        # fp32 working buffers of one chunk, reused across chunks (out= ops): the caller's
        # logits are only read, and large allocations (page faults / allocator churn) happen once.
        # A shard of padding only leaves its sums at 0 (no buffers, no loop).
        rows = min(n, chunk) if v_valid else 0
        w_buf = torch.empty(rows, v_valid, dtype=torch.float32, device=z.device)
        e_buf = torch.empty_like(w_buf) if with_entropy else None
        for c0 in range(0, n if v_valid else 0, chunk):
            c1 = min(n, c0 + chunk)
            w = w_buf[: c1 - c0]
            torch.sub(zv[c0:c1], m[c0:c1].unsqueeze(1), out=w)  # bf16 - fp32 computes in fp32
            if with_entropy:
                e = e_buf[: c1 - c0]
                torch.exp(w, out=e)
                sums[1, c0:c1] = e.sum(dim=-1)
                # Row-wise dot product in place (w is not needed afterwards); a batched matmul
                # (bmm of [1,V]x[V,1]) is ~10x slower on CPU.
                sums[2, c0:c1] = w.mul_(e).sum(dim=-1)
            else:
                sums[1, c0:c1] = w.exp_().sum(dim=-1)
        del w_buf, e_buf
        log_s, logp, entropy = stats_from_sums(sums, group, world)

        ctx.chunk, ctx.inplace, ctx.v_valid = chunk, inplace, v_valid
        # The max and the log-sum stay apart (see softmax_grad_): no fp32 lse = m + log_s.
        ctx.save_for_backward(logits, local_idx, in_range, m, log_s, entropy if with_entropy else log_s)
        ctx.with_entropy = with_entropy
        ctx.set_materialize_grads(False)  # an unused output gives None: skip its term in backward
        shape = labels.shape
        if with_entropy:
            return logp.view(shape), entropy.view(shape)
        return logp.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        logits, local_idx, in_range, m, log_s, entropy = ctx.saved_tensors
        if not ctx.with_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return (None,) * 9
        v_local, v_valid = logits.shape[-1], ctx.v_valid
        z = logits.reshape(-1, v_local)
        n = z.shape[0]
        g_lp = g_logp.reshape(-1).float() if g_logp is not None else torch.zeros_like(m)
        g_h = g_ent.reshape(-1).float() if g_ent is not None else None
        onehot_val = torch.where(in_range, g_lp, torch.zeros_like(g_lp)).unsqueeze(1)
        chunk = ctx.chunk
        # inplace: the gradient goes into the logits' own storage (the caller opted in).
        grad = z if ctx.inplace else torch.empty_like(z)
        # Padded columns: probability 0, so exactly 0 gradient; the valid ones are computed
        # below through views of their leading columns.
        if v_valid < v_local:
            grad[:, v_valid:].zero_()
        gv = grad if v_valid == v_local else grad[:, :v_valid]
        zv = z if v_valid == v_local else z[:, :v_valid]
        rows = min(n, chunk) if v_valid else 0
        # fp32 gradients are computed straight into `grad`; other dtypes through one fp32 chunk.
        buf = torch.empty(rows, v_valid, dtype=torch.float32, device=z.device) if grad.dtype != torch.float32 else None
        p_buf = torch.empty(rows, v_valid, dtype=torch.float32, device=z.device) if g_h is not None else None
        for c0 in range(0, n if v_valid else 0, chunk):
            c1 = min(n, c0 + chunk)
            out = gv[c0:c1] if buf is None else buf[: c1 - c0]
            rs = slice(c0, c1)
            softmax_grad_(
                out, zv[rs], m[rs], log_s[rs], g_lp[rs],
                entropy[rs] if g_h is not None else None, g_h[rs] if g_h is not None else None,
                p_buf[: c1 - c0] if p_buf is not None else None,
            )  # fmt: skip
            out.scatter_add_(1, local_idx[c0:c1].unsqueeze(1), onehot_val[c0:c1])
            if buf is not None:
                gv[c0:c1].copy_(out)
        return grad.view(logits.shape), None, None, None, None, None, None, None, None


def vocab_parallel_token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = True,
    inplace: bool = False,
    vocab_size: int | None = None,
) -> TokenStats:
    """Log-prob of each label and each token's entropy from vocab-parallel logits.

    Args:
        logits: ``[..., V/TP]`` local vocabulary shard (fp32 or bf16), rank r holding
            columns ``[r*V/TP, (r+1)*V/TP)`` as megatron's output layer does.
        labels: ``[...]`` int64 global token ids; values outside ``[0, V)`` give a finite,
            meaningless logp (mask them).
        tp_group: the tensor-parallel group; default megatron's, or a single rank if
            megatron's parallel state is not initialised.
        chunk_size: tokens per fp32 working chunk; None picks :func:`auto_chunk_size`.
            A value >= the number of tokens processes everything at once.
        with_entropy: also return the entropy (costs one extra row-wise dot per chunk).
        inplace: forward never writes into ``logits``; with ``inplace=True`` backward
            writes the logits gradient into the logits' storage (saves one logits-sized
            allocation; the logits are clobbered after backward).
        vocab_size: the true vocabulary size V; columns with global index >= V (padding
            of the output layer) are excluded exactly, as if their logits were -inf (zero
            probability and gradient). None (or the padded size): every column is real.

    Returns:
        :class:`TokenStats` with fp32 ``logp`` and ``entropy`` shaped like ``labels``.
        Both are differentiable; gradients from either or both flow to ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    group = resolve_tp_group(tp_group)
    rank, world = rank_and_size(group)
    v_local = logits.shape[-1]
    chunk = auto_chunk_size(v_local, logits.device) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    v_valid = valid_shard_columns(vocab_size, v_local, rank, world)
    out = _VocabParallelTokenStats.apply(logits, labels, group, world, rank, chunk, with_entropy, inplace, v_valid)
    if with_entropy:
        return TokenStats(logp=out[0], entropy=out[1])
    return TokenStats(logp=out, entropy=None)
