"""Precision at huge logits (|z| ~ 2.5e4): the loss layer against float64, at TP = 1 and TP = 2.

At |z| = 2.5e4 one fp32 ulp is 2**-9 ~ 2e-3. A backward that recomputes ``log p = z - lse``
with ``lse = max + log(sum exp(z - max))`` rounded to one fp32 number puts up to half an ulp
(~1e-3) into every log-probability, i.e. a relative error of ~1e-3 in every p_j and in the
gradient. Keeping the max and the log-sum apart, ``(z - max) - log_s``, is exact in the first
subtraction (Sterbenz) and leaves only the round-off of the small log-sum: the gradient is
then as accurate as fp32 ``log_softmax`` (within 1e-5 of float64 here).

The fused output layer is checked the same way with hidden states and weights whose fp32
products are exact (dyadic values with few bits), so its logits are the float64 ones.
"""

from __future__ import annotations

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
HUGE = 2.5e4


def _huge_logits(s: int, b: int, V: int, seed: int) -> torch.Tensor:
    """fp32 logits around +-2.5e4 per token, one token spanning -2.5e4..+2.5e4 within its row."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(s, b, 1, generator=g) < 0.5, -1.0, 1.0)
    z = HUGE * sign + torch.randn(s, b, V, generator=g) * 4.0
    z[0, 0, : V // 2] -= 2 * HUGE * sign[0, 0]  # half the row at the other extreme: p exactly 0 there
    return z


def _reference(z64: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, u: torch.Tensor):
    """float64 logp, entropy and the gradient of sum(w * logp + u * H) w.r.t. the logits."""
    zr = z64.clone().requires_grad_()
    logq = torch.log_softmax(zr, dim=-1)
    lp = logq.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    (grad,) = torch.autograd.grad((lp * w.double() + ent * u.double()).sum(), zr)
    return lp.detach(), ent.detach(), grad


def _check_token_stats(tp_group, rank: int, tp: int) -> int:
    """vocab_parallel_token_stats at huge logits: values and gradients within 1e-5 of float64."""
    from psft_megatron.loss import vocab_parallel_token_stats

    s, b, V = 4, 3, 64
    full = _huge_logits(s, b, V, seed=5)
    g = torch.Generator().manual_seed(6)
    labels = torch.randint(0, V, (s, b), generator=g)
    w, u = torch.randn(s, b, generator=g), torch.randn(s, b, generator=g)
    lp_ref, ent_ref, g_ref = _reference(full.double(), labels, w, u)
    v_local = V // tp
    cols = slice(rank * v_local, (rank + 1) * v_local)
    checked = 0
    for chunk in (None, 5, 1):
        for inplace in (False, True):
            shard = full[..., cols].clone().requires_grad_()
            ts = vocab_parallel_token_stats(shard, labels, tp_group=tp_group, chunk_size=chunk, inplace=inplace)
            (grad,) = torch.autograd.grad((ts.logp * w + ts.entropy * u).sum(), shard)
            torch.testing.assert_close(ts.logp.double(), lp_ref, **FP32_TOL)
            torch.testing.assert_close(ts.entropy.double(), ent_ref, **FP32_TOL)
            torch.testing.assert_close(grad.double(), g_ref[..., cols], **FP32_TOL)
            checked += 1
    return checked


def _exact_head(T: int, h: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden [T, h] and weight [V, h] whose logits x @ W^T are exact in fp32 and around +-2.5e4.

    Column 0 of x is +-1 (the sign of the token's offset), column 0 of W the offset 25000;
    the rest are multiples of 1/16 below 2 in magnitude. Every product is a multiple of 2**-8
    and every partial sum stays below 2**15, so 23 bits hold it exactly in any order.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-24, 25, (T, h), generator=g).float() / 16
    W = torch.randint(-24, 25, (V, h), generator=g).float() / 16
    x[:, 0] = torch.where(torch.rand(T, generator=g) < 0.5, -1.0, 1.0)
    W[:, 0] = HUGE
    return x, W


def _check_fused_head(tp_group, rank: int, tp: int) -> int:
    """fused_token_stats and fused_head_loss at huge logits: values, hidden and weight gradients
    within 1e-5 of float64."""
    from psft_megatron.loss.fused_head import fused_token_stats
    from psft_megatron.loss.fused_head_loss import fused_head_loss

    T, h, V = 12, 16, 64
    x, W = _exact_head(T, h, V, seed=8)
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(0, V, (T,), generator=g)
    w, u = torch.randn(T, generator=g), torch.randn(T, generator=g)
    z64 = x.double() @ W.double().t()
    assert torch.equal((x @ W.t()).double(), z64), "the test's logits must be exact in fp32"
    assert z64.abs().amax() > 0.9 * HUGE
    lp_ref, ent_ref, gz = _reference(z64, labels, w, u)
    gx_ref, gW_ref = gz @ W.double(), gz.t() @ x.double()
    v_local = V // tp
    rows = slice(rank * v_local, (rank + 1) * v_local)
    checked = 0
    for chunk in (None, 5, 1):
        xs, Ws = x.clone().requires_grad_(), W[rows].clone().requires_grad_()
        ts = fused_token_stats(xs, Ws, labels, tp_group=tp_group, chunk_size=chunk)
        (ts.logp * w + ts.entropy * u).sum().backward()
        torch.testing.assert_close(ts.logp.double(), lp_ref, **FP32_TOL)
        torch.testing.assert_close(ts.entropy.double(), ent_ref, **FP32_TOL)
        torch.testing.assert_close(xs.grad[:, 1:].double(), gx_ref[:, 1:], **FP32_TOL)
        # Column 0 carries the common offset: its exact gradient is 25000 * sum_j g_j = 0 (softmax
        # is shift-invariant), which any fp32 dot product of length V gets only within its textbook
        # bound (V + 8) * 2**-24 * sum_j |g_j W_j0| (V products plus the few fp32 ops forming g_j).
        bound = (V + 8) * 2.0**-24 * (gz.abs() @ W[:, 0].double().abs())
        assert ((xs.grad[:, 0].double() - gx_ref[:, 0]).abs() <= bound).all()
        torch.testing.assert_close(Ws.grad.double(), gW_ref[rows], **FP32_TOL)
        checked += 1
    # The training head (fused_head_loss: the gradient of sum(w * logp) formed in forward).
    _, _, gz = _reference(z64, labels, w, torch.zeros_like(u))
    gx_ref, gW_ref = gz @ W.double(), gz.t() @ x.double()
    bound = (V + 8) * 2.0**-24 * (gz.abs() @ W[:, 0].double().abs())
    for chunk in (None, 5, 1):
        xs, Ws = x.clone().requires_grad_(), W[rows].clone().requires_grad_()
        loss, ts = fused_head_loss(xs, Ws, labels, lambda lp, r: lp * w[r], tp_group=tp_group, chunk_size=chunk)
        loss.backward()
        torch.testing.assert_close(ts.logp.double(), lp_ref, **FP32_TOL)
        torch.testing.assert_close(ts.entropy.double(), ent_ref, **FP32_TOL)
        torch.testing.assert_close(xs.grad[:, 1:].double(), gx_ref[:, 1:], **FP32_TOL)
        assert ((xs.grad[:, 0].double() - gx_ref[:, 0]).abs() <= bound).all()
        torch.testing.assert_close(Ws.grad.double(), gW_ref[rows], **FP32_TOL)
        checked += 1
    return checked


def test_huge_logits_tp1():
    assert _check_token_stats(None, 0, 1) == 6
    assert _check_fused_head(None, 0, 1) == 6


def _tp2_worker() -> dict:
    import torch.distributed as dist

    # The two ranks form the tensor-parallel group (no megatron needed: saves its import per process).
    group = dist.group.WORLD
    rank = dist.get_rank(group)
    return {"token_stats": _check_token_stats(group, rank, 2), "fused": _check_fused_head(group, rank, 2)}


@pytest.mark.slow
def test_huge_logits_tp2():
    for r in run_in_processes(_tp2_worker, 2, timeout=120):
        assert r == {"token_stats": 6, "fused": 6}
