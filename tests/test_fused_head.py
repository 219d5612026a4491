"""The fused output layer + loss against the unfused path and float64, at TP = 1, 2, 2+SP and PP = 2.

Function level (``fused_token_stats``, and ``fused_head_loss`` with a nonlinear per-token loss and
an upstream gradient of 3, in plain autograd and both ``main_grad`` modes): logp, entropy and the gradients of the hidden states and
of the weight shard against
  * a float64 reference from the full (unsharded) hidden states and weight (fp32 inputs), and
  * the unfused path: megatron's ``ColumnParallelLinear`` (at TP = 1 its plain matmul) then
    ``vocab_parallel_token_stats(..., inplace=True)``, in fp32 and in bf16 (same logits rounding),
with vocabulary padding (shards split by the true vocabulary, a shard of padding only), token
chunks of 1, 5 and all (auto), logp-only and entropy-only gradients, megatron DDP's ``main_grad``
convention, and a check that no op ever outputs a ``[T, V/TP]``-sized tensor.

Model level (megatron ``GPTModel`` -> ``PSFTGPTModel``, megatron DDP with fp32 grad buffers,
megatron's pipeline schedule and ``finalize_model_grads``, 2 micro-batches): a snapshot pass and
a PSFT train pass run unfused and fused on the same weights (fused: the loss's gradient formed in
the forward pass, with and without the trainer's ``grad_scale``); snapshot logp, per-token logp,
loss, statistics and every parameter's ``main_grad`` must agree within fp32 round-off, at
TP=1 x DP=2 (tied), TP=2 (untied), TP=2 + SP (tied), PP=2 (tied: the gradient reaches the first
stage's embedding through finalize_model_grads) and a bf16 model at TP=2 + SP.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from psft_megatron.testing.multiproc import run_in_processes

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
# bf16 gradients of the two paths: each one bf16 rounding of (nearly) the same fp32 value, so at
# most one ulp apart, i.e. 2**-7 relative.
BF16_PAIR_TOL = dict(atol=1e-5, rtol=2.0**-7)


# ----------------------------------------------------------------------------- function level


def _data(s: int, b: int, h: int, V_pad: int, V: int, seed: int):
    """Hidden [s, b, h], weight [V_pad, h] (padding rows large: a leak would dominate), labels, mask, weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, b, h, generator=g)
    W = torch.randn(V_pad, h, generator=g) * 0.6
    W[V:] = 3.0 + torch.randn(V_pad - V, h, generator=g)
    labels = torch.randint(0, V, (s, b), generator=g)
    mask = torch.rand(s, b, generator=g) < 0.8
    labels[~mask & (torch.rand(s, b, generator=g) < 0.5)] = -100
    w, u = torch.randn(s, b, generator=g), torch.randn(s, b, generator=g)
    return x, W, labels, mask, w, u


def _reference(x: torch.Tensor, W: torch.Tensor, labels, mask, w, u, V: int):
    """float64 logp, entropy and gradients of sum(mask * w * logp + u * H) w.r.t. x and W."""
    xr, Wr = x.double().requires_grad_(), W.double().requires_grad_()
    logq = torch.log_softmax(xr @ Wr[:V].t(), dim=-1)
    lp = logq.gather(-1, labels.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    gx, gW = torch.autograd.grad((torch.where(mask, lp, 0.0) * w.double() + ent * u.double()).sum(), (xr, Wr))
    return lp.detach(), ent.detach(), gx, gW


def _unfused(x_in: torch.Tensor, W_shard: torch.Tensor, labels, tp_group, sp: bool, V: int, layer=None):
    """megatron's output layer (ColumnParallelLinear, or a matmul at TP = 1) + vocab_parallel_token_stats."""
    from psft_megatron.loss import vocab_parallel_token_stats

    if layer is None:
        logits = torch.matmul(x_in, W_shard.t())
    else:
        with torch.no_grad():
            layer.weight.copy_(W_shard)
        logits, _ = layer(x_in)
    return vocab_parallel_token_stats(logits, labels, tp_group=tp_group, inplace=True, vocab_size=V)


FN_SHAPE = (6, 2, 16, 48)  # s, b, h, padded V of the function-level checks


def _shard(rank: int, tp: int, sp: bool) -> tuple[slice, slice, int]:
    """This TP rank's weight rows, its sequence slice (SP) and the shard width, for FN_SHAPE."""
    s, _, _, V_pad = FN_SHAPE
    v_local = V_pad // tp
    rows = slice(rank * v_local, (rank + 1) * v_local)
    return rows, (slice(rank * s // tp, (rank + 1) * s // tp) if sp else slice(None)), v_local


def _check_function(tp_group, rank: int, tp: int, sp: bool, layers=None) -> int:
    """fused_token_stats vs float64 and vs the unfused path; returns the number of cases checked."""
    from psft_megatron.loss import fused_token_stats

    s, b, h, V_pad = FN_SHAPE
    rows, seq, v_local = _shard(rank, tp, sp)
    checked = 0
    # 48: no padding; 37 splits the last shard; 13 leaves shard 1 of 2 padding only.
    for V in (V_pad, 37, 13):
        x, W, labels, mask, w, u = _data(s, b, h, V_pad, V, seed=V)
        lp_ref, ent_ref, gx_ref, gW_ref = _reference(x, W, labels, mask, w, u, V)
        for dtype in (torch.float32, torch.bfloat16):
            xd, Wd = x.to(dtype), W.to(dtype)
            # The unfused path on the same inputs (megatron's layer rounds its logits to `dtype`).
            xu, Wu = xd[seq].clone().requires_grad_(), Wd[rows].clone()
            layer = None if layers is None else layers[dtype]
            ts_u = _unfused(xu, Wu.requires_grad_() if layer is None else Wu, labels, tp_group, sp, V, layer)
            (torch.where(mask, ts_u.logp, 0.0) * w + ts_u.entropy * u).sum().backward()
            gW_u = Wu.grad if layer is None else layer.weight.grad.clone()
            if layer is not None:
                layer.weight.grad = None
            for chunk in (None, 5, 1):  # None: auto, all n tokens in one chunk at these sizes
                xs, Ws = xd[seq].clone().requires_grad_(), Wd[rows].clone().requires_grad_()
                ts = fused_token_stats(
                    xs, Ws, labels, tp_group=tp_group, sequence_parallel=sp, chunk_size=chunk, vocab_size=V
                )
                (torch.where(mask, ts.logp, 0.0) * w + ts.entropy * u).sum().backward()
                assert ts.logp.dtype == ts.entropy.dtype == torch.float32 and ts.logp.shape == labels.shape
                assert xs.grad.dtype == Ws.grad.dtype == dtype and xs.grad.shape == xs.shape
                assert torch.isfinite(ts.logp).all()
                # Padding rows of the weight: exactly zero gradient.
                pad = Ws.grad[max(V - rank * v_local, 0) :]
                assert torch.equal(pad, torch.zeros_like(pad))
                # Against the unfused path (logp of masked tokens is meaningless in both).
                torch.testing.assert_close(ts.logp[mask], ts_u.logp[mask], **FP32_TOL)
                torch.testing.assert_close(ts.entropy, ts_u.entropy, **FP32_TOL)
                grad_tol = FP32_TOL if dtype == torch.float32 else BF16_PAIR_TOL
                torch.testing.assert_close(xs.grad, xu.grad, **grad_tol)
                torch.testing.assert_close(Ws.grad, gW_u, **grad_tol)
                if dtype == torch.float32:  # against float64 (bf16 logits are rounded like megatron's)
                    torch.testing.assert_close(ts.logp[mask].double(), lp_ref[mask], **FP32_TOL)
                    torch.testing.assert_close(ts.entropy.double(), ent_ref, **FP32_TOL)
                    torch.testing.assert_close(xs.grad.double(), gx_ref[seq], **FP32_TOL)
                    torch.testing.assert_close(Ws.grad.double(), gW_ref[rows], **FP32_TOL)
                checked += 1
        checked += _check_partial_grads(x, W, labels, mask, w, u, V, tp_group, rank, tp, sp, rows, seq)
    return checked


def _check_partial_grads(x, W, labels, mask, w, u, V, tp_group, rank, tp, sp, rows, seq) -> int:
    """logp-only and entropy-only gradients, no-entropy mode and no-grad mode against float64."""
    from psft_megatron.loss import fused_token_stats, snapshot_logp
    from psft_megatron.loss.fused_head import OutputHead

    xr, Wr = x.double().requires_grad_(), W.double().requires_grad_()
    logq = torch.log_softmax(xr @ Wr[:V].t(), dim=-1)
    lp = logq.gather(-1, labels.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    for kind in ("logp", "entropy", "no_entropy"):
        target = (torch.where(mask, lp, 0.0) * w.double()).sum() if kind != "entropy" else (ent * u.double()).sum()
        gx_ref, gW_ref = torch.autograd.grad(target, (xr, Wr), retain_graph=True)
        xs, Ws = x[seq].clone().requires_grad_(), W[rows].clone().requires_grad_()
        ts = fused_token_stats(
            xs, Ws, labels, tp_group=tp_group, sequence_parallel=sp, chunk_size=5, vocab_size=V,
            with_entropy=kind != "no_entropy",
        )  # fmt: skip
        out = (torch.where(mask, ts.logp, 0.0) * w).sum() if kind != "entropy" else (ts.entropy * u).sum()
        out.backward()
        assert (ts.entropy is None) == (kind == "no_entropy")
        torch.testing.assert_close(xs.grad.double(), gx_ref[seq], **FP32_TOL)
        torch.testing.assert_close(Ws.grad.double(), gW_ref[rows], **FP32_TOL)
    # The snapshot pass through the head: no graph, same logp.
    head = OutputHead(weight=W[rows], sequence_parallel=sp, tp_group=tp_group)
    snap = snapshot_logp(x[seq], labels, head=head, chunk_size=4, vocab_size=V)
    assert not snap.requires_grad
    torch.testing.assert_close(snap[mask].double(), lp.detach()[mask], **FP32_TOL)
    return 4


def _check_main_grad_convention() -> None:
    """Under megatron DDP (main_grad + grad_added_to_main_grad) the weight gradient is accumulated
    into main_grad, autograd gets megatron's dummy (zeros with zero_out_wgrad), the flag is set."""
    from psft_megatron.loss import fused_token_stats

    x, W, labels, mask, w, u = _data(5, 2, 16, 48, 40, seed=3)
    _, _, _, gW_ref = _reference(x, W, labels, mask, w, u, 40)
    for zero_out in (False, True):
        Wp = torch.nn.Parameter(W.clone())
        Wp.main_grad = torch.full_like(W, 0.5)  # accumulates on top of what is there
        Wp.grad_added_to_main_grad = False
        if zero_out:
            Wp.zero_out_wgrad = True
        ts = fused_token_stats(x, Wp, labels, chunk_size=3, vocab_size=40)
        (torch.where(mask, ts.logp, 0.0) * w + ts.entropy * u).sum().backward()
        assert Wp.grad_added_to_main_grad is True
        torch.testing.assert_close(Wp.main_grad.double(), gW_ref + 0.5, **FP32_TOL)
        assert Wp.grad.shape == W.shape
        if zero_out:
            assert torch.equal(Wp.grad, torch.zeros_like(W))


def _check_fp32_hidden_with_bf16_weight() -> None:
    """fp32 hidden states (as megatron's Float16Module hands them over) with a bf16 weight: the same
    numbers as bf16 hidden states, the hidden-state gradient in fp32."""
    from psft_megatron.loss import fused_token_stats

    x, W, labels, mask, w, u = _data(5, 2, 16, 48, 40, seed=4)
    xb, Wb = x.bfloat16(), W.bfloat16()
    out = []
    for xs in (xb.clone().requires_grad_(), xb.float().requires_grad_()):
        Ws = Wb.clone().requires_grad_()
        ts = fused_token_stats(xs, Ws, labels, chunk_size=3, vocab_size=40)
        (torch.where(mask, ts.logp, 0.0) * w + ts.entropy * u).sum().backward()
        out.append((ts.logp, ts.entropy, xs.grad, Ws.grad))
    assert out[1][2].dtype == torch.float32
    for a, c in zip(out[0], out[1]):
        assert torch.equal(a.float(), c.float())


def _nonlinear_terms(lp: torch.Tensor, mask, w, old) -> torch.Tensor:
    """A per-token loss of logp alone, nonlinear and with a flat (clipped) region, as PSFT's is."""
    r = (lp - old).clamp(-0.4, 0.4).exp()
    return torch.where(mask, w * lp - 0.5 * r, torch.zeros_like(lp))


def _check_head_loss(tp_group, rank: int, tp: int, sp: bool, layers=None) -> int:
    """fused_head_loss (gradient formed in forward) vs float64 and vs the unfused path, every mode."""
    from psft_megatron.loss import fused_head_loss

    s, b, h, V_pad = FN_SHAPE
    rows, seq, v_local = _shard(rank, tp, sp)
    checked = 0
    for V in (V_pad, 37, 13):
        x, W, labels, mask, w, u = _data(s, b, h, V_pad, V, seed=V + 100)
        old = torch.randn(s, b, generator=torch.Generator().manual_seed(V)) * 0.5 - 3.0
        xr, Wr = x.double().requires_grad_(), W.double().requires_grad_()
        logq = torch.log_softmax(xr @ Wr[:V].t(), dim=-1)
        lp64 = logq.gather(-1, labels.clamp(0, V - 1).unsqueeze(-1)).squeeze(-1)
        ent64 = -(logq.exp() * logq).sum(-1)
        loss64 = _nonlinear_terms(lp64, mask, w.double(), old.double()).sum()
        gx64, gW64 = torch.autograd.grad(loss64, (xr, Wr))
        mf, wf, of = mask.reshape(-1), w.reshape(-1), old.reshape(-1)

        def terms(lp, r):
            return _nonlinear_terms(lp, mf[r], wf[r], of[r])

        def run(xs, Ws, upstream: float, chunk, grad_scale=None):
            loss, ts = fused_head_loss(
                xs, Ws, labels, terms, tp_group=tp_group, sequence_parallel=sp, chunk_size=chunk, vocab_size=V,
                grad_scale=grad_scale,
            )  # fmt: skip
            assert not ts.logp.requires_grad and not ts.entropy.requires_grad and ts.logp.shape == labels.shape
            (loss * upstream).backward()
            return loss, ts

        for dtype in (torch.float32, torch.bfloat16):
            xd, Wd = x.to(dtype), W.to(dtype)
            # The unfused path with the same per-token loss (megatron's layer at TP = 2).
            xu, Wu = xd[seq].clone().requires_grad_(), Wd[rows].clone()
            layer = None if layers is None else layers[dtype]
            if layer is None:
                Wu.requires_grad_()
            ref_u: dict[float, tuple] = {}
            # Upstream gradient 3 (not a power of two): the announced factor enters the logits' gradient
            # before its rounding to the weight's dtype, exactly as the unfused path's. Formed for 1 and
            # scaled in backward instead, the bf16 roundings match the unfused path only for powers of two.
            # plain_announced: grad_scale given but no main_grad: formed for 1 and scaled in backward.
            ups = {"plain": 3.0, "plain_announced": 3.0, "main_grad": 3.0, "main_grad_buffer": 3.0}
            if dtype == torch.bfloat16:
                ups.update(plain=2.0, plain_announced=2.0, main_grad_buffer=2.0)
            for up in sorted(set(ups.values())):
                xu.grad = None
                if layer is None:
                    Wu.grad = None
                ts_u = _unfused(xu, Wu if layer is None else Wu.detach(), labels, tp_group, sp, V, layer)
                (up * _nonlinear_terms(ts_u.logp, mask, w, old).sum()).backward()
                gW_u = Wu.grad if layer is None else layer.weight.grad.clone()
                if layer is not None:
                    layer.weight.grad = None
                ref_u[up] = (xu.grad.clone(), gW_u.clone())
            grad_tol = FP32_TOL if dtype == torch.float32 else BF16_PAIR_TOL
            for chunk in (None, 5, 1):
                for mode, up in ups.items():
                    xs, Ws = xd[seq].clone().requires_grad_(), torch.nn.Parameter(Wd[rows].clone())
                    plain = mode.startswith("plain")
                    if not plain:  # megatron DDP's fp32 grad buffer, holding other micro-batches' part
                        Ws.main_grad = torch.full(Ws.shape, 0.5)
                        Ws.grad_added_to_main_grad = False
                    announce = mode in ("main_grad", "plain_announced")
                    loss, ts = run(xs, Ws, up, chunk, grad_scale=up if announce else None)
                    gW = Ws.grad if plain else Ws.main_grad - 0.5
                    if not plain:
                        assert Ws.grad_added_to_main_grad is True
                    assert xs.grad.dtype == dtype and xs.grad.shape == xs.shape
                    pad = gW[max(V - rank * v_local, 0) :]
                    assert torch.equal(pad, torch.zeros_like(pad))  # padding rows: exactly no gradient
                    torch.testing.assert_close(ts.logp[mask], ts_u.logp.detach()[mask], **FP32_TOL)
                    torch.testing.assert_close(ts.entropy, ts_u.entropy.detach(), **FP32_TOL)
                    torch.testing.assert_close(xs.grad, ref_u[up][0], **grad_tol)
                    torch.testing.assert_close(gW.to(dtype), ref_u[up][1], **grad_tol)
                    if dtype == torch.float32:
                        torch.testing.assert_close(loss.double(), loss64.detach(), **FP32_TOL)
                        torch.testing.assert_close(ts.logp[mask].double(), lp64.detach()[mask], **FP32_TOL)
                        torch.testing.assert_close(ts.entropy.double(), ent64.detach(), **FP32_TOL)
                        torch.testing.assert_close(xs.grad.double(), up * gx64[seq], **FP32_TOL)
                        torch.testing.assert_close(gW.double(), up * gW64[rows], **FP32_TOL)
                    checked += 1
        # No grad mode and inference mode: the same loss and statistics, nothing to backpropagate.
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                loss, ts = fused_head_loss(x[seq], W[rows].requires_grad_(), labels, terms, tp_group=tp_group,
                                           sequence_parallel=sp, chunk_size=4, vocab_size=V)  # fmt: skip
            assert not loss.requires_grad
            torch.testing.assert_close(loss.double(), loss64.detach(), **FP32_TOL)
            torch.testing.assert_close(ts.logp[mask].double(), lp64.detach()[mask], **FP32_TOL)
        checked += 1
    return checked


def _check_head_loss_misuse() -> None:
    """A grad_scale that backward contradicts, and a second backward, fail loudly."""
    from psft_megatron.loss import fused_head_loss

    x, W, labels, mask, w, u = _data(5, 2, 16, 48, 40, seed=5)
    old = torch.zeros(5, 2)

    def terms(lp, r):
        return _nonlinear_terms(lp, mask.reshape(-1)[r], w.reshape(-1)[r], old.reshape(-1)[r])

    Wp = torch.nn.Parameter(W.clone())
    Wp.main_grad, Wp.grad_added_to_main_grad = torch.zeros_like(W), False
    loss, _ = fused_head_loss(x.clone().requires_grad_(), Wp, labels, terms, chunk_size=3, grad_scale=2.0)
    with pytest.raises(RuntimeError, match=r"got gradient 3.0 in backward, but grad_scale=2.0 was announced"):
        (loss * 3.0).backward()
    loss, _ = fused_head_loss(x.clone().requires_grad_(), W.clone().requires_grad_(), labels, terms, chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


def test_micro_batch_loss_fused_matches_unfused_for_every_objective():
    """micro_batch_loss through the fused head (gradient formed in forward) against the unfused
    logits path for every registered objective, logp_old given and OWN_LOGP, grad_scale announced."""
    from psft_megatron.loss import ObjectiveConfig, OutputHead, micro_batch_loss, objective_names
    from psft_megatron.loss.compute import OWN_LOGP

    x, W, labels, mask, w, u = _data(7, 2, 16, 48, 40, seed=21)
    count = mask.sum() + 3  # other micro-batches' tokens count too
    aux = torch.log_softmax(x @ W[:40].t(), -1).gather(-1, labels.clamp(0, 39).unsqueeze(-1)).squeeze(-1)
    aux = aux + torch.tensor([-0.5, -0.1, 0.1, 0.5])[torch.arange(14).remainder(4)].view(7, 2)  # some ratios clip
    cases = [(name, aux) for name in objective_names()] + [("psft", OWN_LOGP)]
    for name, old in cases:
        cfg = ObjectiveConfig(name=name)
        kw = dict(logp_old=old if cfg.needs_snapshot else None, logp_ref=aux if cfg.needs_reference else None)
        out = []
        for fused in (False, True):
            xs, Ws = x.clone().requires_grad_(), torch.nn.Parameter(W.clone())
            Ws.main_grad, Ws.grad_added_to_main_grad = torch.zeros_like(W), False
            if fused:
                res = micro_batch_loss(xs, labels, mask, count, cfg, head=OutputHead(Ws), chunk_size=3, vocab_size=40,
                                       grad_scale=2.0, **kw)  # fmt: skip
            else:
                res = micro_batch_loss(xs @ Ws.t(), labels, mask, count, cfg, vocab_size=40, **kw)
            (2.0 * res.loss).backward()
            gW = Ws.main_grad if fused else Ws.grad
            out.append((res.loss.detach(), res.logp, xs.grad, gW, res.stats.summary()))
        (lu, lpu, gxu, gwu, su), (lf, lpf, gxf, gwf, sf) = out
        assert float(gwu.abs().max()) > 0, name
        torch.testing.assert_close(lf, lu, **FP32_TOL)
        torch.testing.assert_close(lpf[mask], lpu[mask], **FP32_TOL)
        torch.testing.assert_close(gxf, gxu, **FP32_TOL)
        torch.testing.assert_close(gwf, gwu, **FP32_TOL)
        assert su.keys() == sf.keys() and all(abs(sf[k] - su[k]) <= 1e-5 * max(1.0, abs(su[k])) for k in su), name
        if name == "psft" and old is not OWN_LOGP:
            assert 0 < su["clip_fraction"] < 1


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_function_tp1_against_unfused_and_float64():
    assert _check_function(None, 0, 1, False) == 3 * (2 * 3 + 4)
    _check_main_grad_convention()
    _check_fp32_hidden_with_bf16_weight()


def test_fused_head_loss_tp1_against_unfused_and_float64():
    assert _check_head_loss(None, 0, 1, False) == 3 * (2 * 3 * 4 + 1)
    _check_head_loss_misuse()


def test_no_logits_sized_tensor_ever():
    """Forward + backward with 7-token chunks of T = 96 tokens: no op output reaches T x V / 4."""
    from psft_megatron.loss import fused_token_stats

    T, h, V = 96, 8, 64
    x, W, labels, mask, w, u = _data(T, 1, h, V, V, seed=11)
    xs, Ws = x.requires_grad_(), W.requires_grad_()
    with _LargestOutput() as probe:
        ts = fused_token_stats(xs, Ws, labels, chunk_size=7)
        (torch.where(mask, ts.logp, 0.0) * w + ts.entropy * u).sum().backward()
    # One chunk of logits, the weight's gradient or the hidden states' gradient; T x V is 8x more.
    assert probe.largest <= max(7 * V, V * h, T * h), probe.largest
    with _LargestOutput() as unfused:
        ts = _unfused(xs, Ws, labels, None, False, V)
        (torch.where(mask, ts.logp, 0.0) * w + ts.entropy * u).sum().backward()
    assert unfused.largest >= T * V  # the probe sees the logits of the unfused path


def test_auto_chunk_size():
    """256 MiB (CPU) / 512 MiB (GPU) of fp32 logits per chunk, never more than 2048 tokens."""
    from psft_megatron.loss.head_chunks import fused_chunk_size

    assert fused_chunk_size(128256, "cpu") == (256 << 20) // (4 * 128256) == 523
    assert fused_chunk_size(128256, "cuda") == 1046
    assert fused_chunk_size(16032, "cuda") == 2048  # 70B at TP = 8: the token cap, not 8372 tokens
    assert fused_chunk_size(10**9, "cpu") == 1


def test_input_errors_are_one_line():
    from psft_megatron.loss import fused_token_stats

    x, W = torch.randn(4, 2, 8), torch.randn(16, 8)
    with pytest.raises(ValueError, match=r"labels \(4, 3\) do not match the hidden states' tokens \(4, 2\)"):
        fused_token_stats(x, W, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"need \[..., h\] and \[V/TP, h\]"):
        fused_token_stats(x, torch.randn(16, 7), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size must be in"):
        fused_token_stats(x, W, torch.zeros(4, 2, dtype=torch.long), vocab_size=17)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        fused_token_stats(x, W, torch.zeros(4, 2, dtype=torch.long), chunk_size=0)


# ----------------------------------------------------------------------------- model level

SEQ, MBS, N_MICRO, V_TRUE, V_PAD, HIDDEN = 16, 2, 2, 1000, 1024, 32


def _build(tp: int, pp: int, sp: bool, tied: bool, dtype: torch.dtype):
    """A 2-layer Llama-style PSFTGPTModel in megatron DDP (fp32 grad buffers) on this rank's stage."""
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from psft_megatron.model.gpt import PSFTGPTModel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=2, hidden_size=HIDDEN, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=dtype,
        pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, sequence_parallel=sp, gradient_accumulation_fusion=False,
    )  # fmt: skip
    model = PSFTGPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=V_PAD,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        parallel_output=True,
    )
    ddp = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=False),
        module=model,
    )
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, model


def _batches(dp_rank: int):
    g = torch.Generator().manual_seed(77 + dp_rank)
    tokens = torch.randint(0, V_TRUE, (N_MICRO, MBS, SEQ), generator=g)
    labels = torch.randint(0, V_TRUE, (N_MICRO, MBS, SEQ), generator=g)
    mask = torch.rand(N_MICRO, MBS, SEQ, generator=g) < 0.8
    labels[~mask & (torch.rand(N_MICRO, MBS, SEQ, generator=g) < 0.5)] = -100
    # log(ratio) per token, away from PSFT's clip edges log(1.28) and log(0.8): clipped and kept tokens.
    noise = torch.tensor([-0.5, -0.1, 0.1, 0.5])[torch.randint(0, 4, (N_MICRO, SEQ, MBS), generator=g)]
    return tokens, labels, mask, noise


def _passes(ddp, model, fused: bool, dp: int, announce: bool = False) -> dict:
    """Snapshot pass, then one PSFT forward+backward over N_MICRO micro-batches; grads and outputs.

    ``announce``: pass the trainer's ``grad_scale`` (the fused head's weight gradient then goes into
    main_grad during the forward pass); else the fused head holds it in a buffer until backward."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from psft_megatron.loss import (
        LossStats,
        ObjectiveConfig,
        global_token_count,
        megatron_loss_grad,
        megatron_loss_scale,
        micro_batch_loss,
        reduce_stats,
        snapshot_logp,
    )
    from psft_megatron.model.gpt import loss_head

    model.fused_output_layer = fused
    tokens, labels, mask, noise = _batches(parallel_state.get_data_parallel_rank())
    count = global_token_count(mask, parallel_state.get_data_parallel_group())  # each DP rank has its own batch
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, SEQ)
    chunk = 5 if fused else None
    out: dict = {"snap": {}, "logp": {}, "loss": {}, "shape": None}
    stats = []

    def schedule(step, forward_only):
        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(range(N_MICRO)), model=[ddp], num_microbatches=N_MICRO,
            seq_length=SEQ, micro_batch_size=MBS, forward_only=forward_only,
        )  # fmt: skip

    def snap_step(it, chunk_module):
        i = next(it)
        output = chunk_module(tokens[i], positions, None, labels=labels[i])
        head = loss_head(chunk_module)
        assert (head is not None) == (fused and model.post_process)

        def loss_func(o):
            out["shape"] = tuple(o.shape)
            out["snap"][i] = snapshot_logp(o, labels[i].t(), head=head, chunk_size=chunk, vocab_size=V_TRUE)
            return o.new_zeros(()), {}

        return output, loss_func

    def train_step(it, chunk_module):
        i = next(it)
        output = chunk_module(tokens[i], positions, None, labels=labels[i])
        head = loss_head(chunk_module)

        def loss_func(o):
            res = micro_batch_loss(
                o, labels[i].t(), mask[i].t(), count, ObjectiveConfig(name="psft"),
                logp_old=out["snap"][i] - noise[i], head=head, chunk_size=chunk, vocab_size=V_TRUE,
                inplace=not fused, grad_scale=megatron_loss_grad(N_MICRO, dp) if announce else None,
            )  # fmt: skip
            stats.append(res.stats)
            out["logp"][i], out["loss"][i] = res.logp, res.loss.detach().clone()
            return res.loss * megatron_loss_scale(N_MICRO, dp), {}

        return output, loss_func

    ddp.zero_grad_buffer()
    with torch.no_grad():
        schedule(snap_step, True)
    schedule(train_step, False)
    if model.post_process:
        total = LossStats.empty()
        for st in stats:
            total = total.merge(st)
        out["stats"] = reduce_stats(total).summary()
    out["grads"] = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    return out


LAYOUTS = {  # name: (tp, pp, sp, tied, dtype)
    "tp1_dp2_tied": (1, 1, False, True, torch.float32),
    "tp2_untied": (2, 1, False, False, torch.float32),
    "tp2_sp_tied": (2, 1, True, True, torch.float32),
    "pp2_tied": (1, 2, False, True, torch.float32),
    "tp2_sp_bf16": (2, 1, True, False, torch.bfloat16),
}


def _compare(name: str, unf: dict, fus: dict, post: bool, dtype: torch.dtype) -> dict:
    """Fused equals unfused on this rank; returns the largest gradient difference relative to its tensor's max."""
    if post:
        # The model handed the loss hidden states (fused; SP: [s/TP, b, h]) or the logits shard.
        tp, sp = LAYOUTS[name][0], LAYOUTS[name][2]
        assert fus["shape"] == (SEQ // tp if sp else SEQ, MBS, HIDDEN), fus["shape"]
        assert unf["shape"] == (SEQ, MBS, V_PAD // tp), unf["shape"]
        for i in range(N_MICRO):
            torch.testing.assert_close(fus["snap"][i], unf["snap"][i], **FP32_TOL)
            torch.testing.assert_close(fus["logp"][i], unf["logp"][i], **FP32_TOL)
            torch.testing.assert_close(fus["loss"][i], unf["loss"][i], **FP32_TOL)
        for key, val in unf["stats"].items():
            assert abs(fus["stats"][key] - val) <= 1e-5 * max(1.0, abs(val)), (name, key, fus["stats"][key], val)
        assert 0 < unf["stats"]["clip_fraction"] < 1
    worst = 0.0
    assert fus["grads"].keys() == unf["grads"].keys()
    for pname, g_u in unf["grads"].items():
        g_f = fus["grads"][pname]
        scale = float(g_u.abs().max())
        assert scale > 0, f"{name}: {pname} got no gradient"
        worst = max(worst, float((g_f - g_u).abs().max()) / scale)
        if dtype == torch.float32:
            torch.testing.assert_close(g_f, g_u, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name} {pname}: {m}")
        else:  # bf16 activations and per-layer grads: half a bf16 ulp of the largest entry, plus rtol
            torch.testing.assert_close(
                g_f, g_u, rtol=2.0**-7, atol=2.0**-8 * scale, msg=lambda m: f"{name} {pname}: {m}"
            )
    return {"worst_rel": worst, "n_params": len(unf["grads"])}


def _model_worker(names: list[str] | None = None) -> dict:
    from megatron.core import parallel_state

    from psft_megatron.runtime import cpu_compat

    cpu_compat.apply()
    results = {}
    for name in names or list(LAYOUTS):
        tp, pp, sp, tied, dtype = LAYOUTS[name]
        ddp, model = _build(tp, pp, sp, tied, dtype)
        dp = parallel_state.get_data_parallel_world_size()
        unf = _passes(ddp, model, fused=False, dp=dp)
        fus = _passes(ddp, model, fused=True, dp=dp, announce=True)  # as the trainer calls it
        fus_buffer = _passes(ddp, model, fused=True, dp=dp)
        results[name] = _compare(name, unf, fus, model.post_process, dtype)
        results[name + "/buffer"] = _compare(name, unf, fus_buffer, model.post_process, dtype)
        results[name]["post"] = model.post_process
        results[name]["pre"] = model.pre_process
    return results


def _function_worker() -> dict:
    """TP = 2 with and without SP against megatron's ColumnParallelLinear + the unfused loss."""
    import torch.nn.functional as F  # noqa: F401
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer import TransformerConfig

    from psft_megatron.runtime import cpu_compat

    cpu_compat.apply()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    group, rank = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_tensor_model_parallel_rank()
    out = {}
    for sp in (False, True):
        layers = {}
        for dtype in (torch.float32, torch.bfloat16):
            cfg = TransformerConfig(
                num_layers=1, hidden_size=16, num_attention_heads=2, tensor_model_parallel_size=2,
                sequence_parallel=sp, params_dtype=dtype, use_cpu_initialization=True,
            )  # fmt: skip
            layers[dtype] = tensor_parallel.ColumnParallelLinear(
                16, 48, config=cfg, init_method=torch.nn.init.zeros_, bias=False, gather_output=False
            )
        out[f"sp={sp}"] = _check_function(group, rank, 2, sp, layers)
        out[f"loss sp={sp}"] = _check_head_loss(group, rank, 2, sp, layers)
    return out


def _two_rank_worker() -> dict:
    # One launch for both (each process start imports torch and megatron-core).
    return {"function": _function_worker(), "model": _model_worker()}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_in_processes(_two_rank_worker, 2, timeout=600)


@pytest.mark.slow
def test_fused_function_tp2_and_sequence_parallel(two_ranks):
    for r in two_ranks:
        n_stats, n_loss = 3 * (2 * 3 + 4), 3 * (2 * 3 * 4 + 1)
        assert r["function"] == {"sp=False": n_stats, "sp=True": n_stats, "loss sp=False": n_loss, "loss sp=True": n_loss}


@pytest.mark.slow
def test_fused_model_matches_unfused_at_every_layout(two_ranks):
    res = [r["model"] for r in two_ranks]
    for name in LAYOUTS:
        # The weight's gradient into main_grad during forward (grad_scale, as the trainer) and buffered.
        assert all(r[name]["n_params"] > 0 and r[name + "/buffer"]["n_params"] > 0 for r in res)
        assert sum(r[name]["post"] for r in res) >= 1
    # PP = 2: one first stage (embedding) and one last stage (head) were both compared.
    assert sorted((r["pp2_tied"]["pre"], r["pp2_tied"]["post"]) for r in res) == [(False, True), (True, False)]
