"""The loss layer against float64 references, at TP = 1, 2, 4 and DP = 1, 2, on real gloo processes.

Every check compares with a reference computed here from the full (unsharded) logits in
float64 with plain torch (log_softmax, gather, autograd). Tolerances:
  * fp32 logits: values and gradients within atol = rtol = 1e-5;
  * bf16 logits: values within the same 1e-5 (the layer computes in fp32 from the exact
    bf16 inputs, and the reference uses those same bf16 values); gradients come back in
    bf16, so within bf16 rounding: rtol = 2**-8 (twice the half-ulp 2**-9), atol = 1e-5.

Launches (start-up ~5 s per process, so checks are batched):
  * in process: TP = 1 token statistics (also with a padded vocabulary); micro-batch splits at DP = 1;
  * 2 processes: TP = 2 token statistics (also padded); micro-batches at TP=2 x DP=1 and TP=1 x DP=2;
  * 4 processes: TP = 4 token statistics (also padded); micro-batches at TP=2 x DP=2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from psft_megatron.testing.multiproc import run_in_processes

EPS_LOW, EPS_HIGH = 0.2, 0.28
DTYPES = (torch.float32, torch.bfloat16)
OBJECTIVES = ("sft", "dft", "psft", "sft_kl")
KL_BETA = 0.3
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_GRAD_TOL = dict(atol=1e-5, rtol=2.0**-8)


# ----------------------------------------------------------------------------- references


def _chunks(n: int) -> tuple[int | None, ...]:
    """Token chunkings checked: automatic, one chunk, uneven chunks, one token at a time."""
    return (None, n, 4, 1)


def _ref_token_stats(full: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-prob of each label and entropy from full logits (differentiable)."""
    logq = torch.log_softmax(full, dim=-1)
    lp = logq.gather(-1, labels.clamp(0, full.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    return lp, ent


def _ref_objective(name: str, lp: torch.Tensor, lp_old: torch.Tensor) -> torch.Tensor:
    """float64 per-token losses, written from the papers' formulas (``lp_old`` is the reference's
    log-prob for sft_kl: SFT + beta x Schulman's k3 = exp(d) - d - 1, d = lp_ref - lp, in [-10, 10])."""
    if name == "sft":
        return -lp
    if name == "sft_kl":
        d = lp_old - lp
        return -lp + KL_BETA * torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
    if name == "dft":
        return -lp.detach().exp() * lp
    if name == "psft":
        r = torch.exp(torch.clamp(lp - lp_old, -20.0, 20.0))
        return -torch.minimum(r, torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH))
    raise AssertionError(name)


def _away_from_clip_edges(lp_old: torch.Tensor, lp_ref: torch.Tensor) -> torch.Tensor:
    """Nudge logp_old so no ratio sits within 1e-3 of a clip edge (fp32 vs fp64 could pick sides)."""
    lr = lp_ref - lp_old
    for edge in (math.log(1 + EPS_HIGH), math.log(1 - EPS_LOW)):
        lp_old = torch.where((lr - edge).abs() < 1e-3, lp_old - 3e-3, lp_old)
    return lp_old


def _shard(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    v = t.shape[-1] // tp
    return t[..., rank * v : (rank + 1) * v]


# ----------------------------------------------------------------------------- token statistics


def _check_token_stats(tp_group, rank: int, tp: int) -> dict:
    """Values, gradients, masks, chunking, caller's logits and PSFT's clip at one TP layout."""
    from psft_megatron.loss import ObjectiveConfig, snapshot_logp, token_losses, vocab_parallel_token_stats

    s, b, V = 6, 3, 48
    g = torch.Generator().manual_seed(1234)  # same data on every rank
    full32 = torch.randn(s, b, V, generator=g) * 4.0
    labels = torch.randint(0, V, (s, b), generator=g)
    mask = torch.rand(s, b, generator=g) < 0.7
    labels[~mask & (torch.rand(s, b, generator=g) < 0.5)] = -100  # masked tokens may carry any label
    w = torch.randn(s, b, generator=g)  # upstream weights on the per-token losses
    u = torch.randn(s, b, generator=g)  # upstream weights on the entropies
    noise = (torch.rand(s, b, generator=g) - 0.5) * 1.2  # log-ratios in [-0.6, 0.6]
    n = s * b
    checked: set[tuple] = set()

    for dtype in DTYPES:
        full = full32.to(dtype)
        z64 = full.double()
        lp_ref0, ent_ref0 = _ref_token_stats(z64, labels)
        lp_old = _away_from_clip_edges(lp_ref0 + noise.double(), lp_ref0).float()
        grad_tol = FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL

        for name in OBJECTIVES:
            cfg = ObjectiveConfig(name=name, eps_low=EPS_LOW, eps_high=EPS_HIGH, kl_beta=KL_BETA)
            for chunk in _chunks(n):
                for entropy_grad in (False, True):
                    shard = _shard(full, rank, tp).clone().requires_grad_()
                    before = shard.detach().clone()
                    ts = vocab_parallel_token_stats(shard, labels, tp_group=tp_group, chunk_size=chunk)
                    tl = token_losses(cfg, ts.logp, mask, lp_old, logp_ref=lp_old)
                    total = (tl.loss * w).sum()
                    if entropy_grad:
                        total = total + torch.where(mask, ts.entropy * u, 0.0).sum()
                    total.backward()

                    zr = z64.clone().requires_grad_()
                    lp_ref, ent_ref = _ref_token_stats(zr, labels)
                    loss_ref = torch.where(mask, _ref_objective(name, lp_ref, lp_old.double()), 0.0)
                    total_ref = (loss_ref * w.double()).sum()
                    if entropy_grad:
                        total_ref = total_ref + torch.where(mask, ent_ref * u.double(), 0.0).sum()
                    (grad_ref,) = torch.autograd.grad(total_ref, zr)

                    assert ts.logp.dtype == torch.float32 and ts.entropy.dtype == torch.float32
                    torch.testing.assert_close(ts.logp[mask].double(), lp_ref[mask].detach(), **FP32_TOL)
                    torch.testing.assert_close(ts.entropy.double(), ent_ref.detach(), **FP32_TOL)
                    torch.testing.assert_close(tl.loss.double(), loss_ref.detach(), **FP32_TOL)
                    assert torch.equal(tl.loss[~mask], torch.zeros_like(tl.loss[~mask]))
                    assert shard.grad.dtype == dtype
                    torch.testing.assert_close(shard.grad.double(), _shard(grad_ref, rank, tp), **grad_tol)
                    if not entropy_grad:  # masked tokens contribute no gradient at all
                        assert torch.equal(shard.grad[~mask], torch.zeros_like(shard.grad[~mask]))
                    assert torch.equal(shard.detach(), before), "the caller's logits were modified"
                    if name == "psft":
                        clipped_ref = (torch.exp(lp_ref.detach() - lp_old.double()) > 1 + EPS_HIGH) & mask
                        assert torch.equal(tl.clipped, clipped_ref)
                    checked.add((dtype, name, chunk, entropy_grad))

            # Chunked equals unchunked, tightly (rows are independent; only reduction shapes differ).
            outs = []
            for chunk in (n, 4, 1):
                shard = _shard(full, rank, tp).clone().requires_grad_()
                ts = vocab_parallel_token_stats(shard, labels, tp_group=tp_group, chunk_size=chunk)
                (ts.logp * w + ts.entropy * u).sum().backward()
                outs.append((ts.logp.detach(), ts.entropy.detach(), shard.grad))
            for other in outs[1:]:
                for a, c in zip(outs[0], other):
                    torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-6)

        # The snapshot path (no entropy, no graph) gives the same logp; no tp_group given:
        # megatron's TP group by default (a single rank in process).
        shard = _shard(full, rank, tp).clone()
        snap = snapshot_logp(shard, labels, chunk_size=5)
        torch.testing.assert_close(snap[mask].double(), lp_ref0[mask], **FP32_TOL)
        assert not snap.requires_grad

        # inplace=True: forward leaves the logits alone; the gradient lands in their storage.
        shard = _shard(full, rank, tp).clone().requires_grad_()
        before = shard.detach().clone()
        ts = vocab_parallel_token_stats(shard, labels, tp_group=tp_group, chunk_size=4, inplace=True)
        assert torch.equal(shard.detach(), before)
        zr = z64.clone().requires_grad_()
        lp_ref, ent_ref = _ref_token_stats(zr, labels)
        (grad_ref,) = torch.autograd.grad((torch.where(mask, lp_ref, 0.0) * w.double() + ent_ref * u.double()).sum(), zr)
        torch.testing.assert_close(
            torch.autograd.grad((torch.where(mask, ts.logp, 0.0) * w + ts.entropy * u).sum(), shard)[0].double(),
            _shard(grad_ref, rank, tp),
            **grad_tol,
        )

    _check_psft_clip(tp_group, rank, tp)
    return {"checked": len(checked), "expected": len(DTYPES) * len(OBJECTIVES) * len(_chunks(n)) * 2}


def _check_psft_clip(tp_group, rank: int, tp: int) -> None:
    """PSFT at ratio 1 is SFT exactly; above 1+eps_high no gradient; below 1-eps_low gradient stays."""
    from psft_megatron.loss import ObjectiveConfig, token_losses, vocab_parallel_token_stats

    s, b, V = 4, 2, 48
    g = torch.Generator().manual_seed(99)
    full = torch.randn(s, b, V, generator=g) * 3.0
    labels = torch.randint(0, V, (s, b), generator=g)
    mask = torch.ones(s, b, dtype=torch.bool)

    def grads(name: str, ratio: torch.Tensor | None):
        shard = _shard(full, rank, tp).clone().requires_grad_()
        ts = vocab_parallel_token_stats(shard, labels, tp_group=tp_group)
        lp_old = ts.logp.detach() if ratio is None else ts.logp.detach() - ratio.log()
        tl = token_losses(ObjectiveConfig(name=name), ts.logp, mask, lp_old)
        tl.loss.sum().backward()
        return shard.grad, tl

    g_sft, _ = grads("sft", None)
    g_psft, tl = grads("psft", None)
    assert torch.equal(g_psft, g_sft), "PSFT with logp_old == logp must have exactly SFT's gradient"
    assert torch.equal(tl.ratio, torch.ones_like(tl.ratio)) and not tl.clipped.any()

    ratio = torch.tensor([1.5, 0.5, 1.1, 1.35, 0.3, 0.95, 2.0, 0.79]).view(s, b)
    g_clip, tl = grads("psft", ratio)
    above, below = ratio > 1 + EPS_HIGH, ratio < 1 - EPS_LOW
    assert torch.equal(tl.clipped, above)
    assert torch.equal(g_clip[above], torch.zeros_like(g_clip[above])), "clipped tokens must get no gradient"
    # Unclipped tokens (including those below 1-eps_low): gradient of -r*logp, i.e. r times SFT's.
    kept = ~above
    assert below.any() and (g_clip[below].abs().amax(-1) > 0).all()
    torch.testing.assert_close(g_clip[kept], g_sft[kept] * ratio[kept].unsqueeze(-1), **FP32_TOL)


# ----------------------------------------------------------------------------- padded vocabulary

# True vocabulary sizes V inside a padded V_pad = 48. With shards of 48/TP columns:
# TP=2 (24 each): 37 and 30 split shard 1; 24 makes shard 1 padding only (boundary on the
# shard edge); 13 splits shard 0 and leaves shard 1 padding only. TP=4 (12 each): 37 splits
# shard 3; 30 splits shard 2 and leaves shard 3 padding only; 24 makes shards 2-3 padding;
# 13 splits shard 1 and leaves shards 2-3 padding only. TP=1: all split the one shard.
PADDED_VOCAB_SIZES = (37, 30, 24, 13)


def _check_padded_vocab(tp_group, rank: int, tp: int) -> dict:
    """vocab_size=V on logits padded to V_pad: logp, entropy and gradients are the float64
    reference on the first V columns alone, the padded columns get exactly zero gradient,
    chunked equals unchunked, inplace or not, fp32 and bf16; vocab_size=V_pad is None bit-for-bit."""
    from psft_megatron.loss import ObjectiveConfig, micro_batch_loss, snapshot_logp, vocab_parallel_token_stats

    s, b, V_pad = 5, 3, 48
    n, v_local = s * b, V_pad // tp
    g = torch.Generator().manual_seed(777)  # same data on every rank
    real = torch.randn(s, b, V_pad, generator=g) * 3.0
    # Padded columns far above the real ones: any leak into the softmax would dominate it.
    pad = 40.0 + torch.randn(s, b, V_pad, generator=g) * 4.0
    mask = torch.rand(s, b, generator=g) < 0.75
    w = torch.randn(s, b, generator=g)
    u = torch.randn(s, b, generator=g)
    checked: set[tuple] = set()

    for V in PADDED_VOCAB_SIZES:
        labels = torch.randint(0, V, (s, b), generator=g)
        # Masked tokens may carry -100 or even a padded column's id: finite, no gradient.
        labels[~mask] = torch.where(torch.rand(s, b, generator=g) < 0.5, -100, V_pad - 1)[~mask]
        cols = torch.arange(V_pad)
        full32 = torch.where(cols < V, real, pad)
        start = rank * v_local
        valid_local = min(max(V - start, 0), v_local)  # valid leading columns of this shard
        for dtype in DTYPES:
            full = full32.to(dtype)
            zr = full[..., :V].double().requires_grad_()
            lp_ref, ent_ref = _ref_token_stats(zr, labels)
            (g_ref,) = torch.autograd.grad((torch.where(mask, lp_ref, 0.0) * w.double() + ent_ref * u.double()).sum(), zr)
            g_ref = torch.cat([g_ref, g_ref.new_zeros(s, b, V_pad - V)], dim=-1)
            grad_tol = FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL

            outs = []
            for inplace in (False, True):
                for chunk in _chunks(n):
                    shard = _shard(full, rank, tp).clone().requires_grad_()
                    before = shard.detach().clone()
                    ts = vocab_parallel_token_stats(
                        shard, labels, tp_group=tp_group, chunk_size=chunk, inplace=inplace, vocab_size=V
                    )
                    assert torch.equal(shard.detach(), before), "forward modified the caller's logits"
                    (grad,) = torch.autograd.grad((torch.where(mask, ts.logp, 0.0) * w + ts.entropy * u).sum(), shard)
                    if not inplace:
                        assert torch.equal(shard.detach(), before), "the caller's logits were modified"
                    assert torch.isfinite(ts.logp).all() and torch.isfinite(ts.entropy).all()
                    torch.testing.assert_close(ts.logp[mask].double(), lp_ref[mask].detach(), **FP32_TOL)
                    torch.testing.assert_close(ts.entropy.double(), ent_ref.detach(), **FP32_TOL)
                    assert grad.dtype == dtype
                    torch.testing.assert_close(grad.double(), _shard(g_ref, rank, tp), **grad_tol)
                    padded = grad[..., valid_local:]
                    assert torch.equal(padded, torch.zeros_like(padded)), "padded columns must get exactly 0"
                    if chunk is not None:
                        outs.append((ts.logp.detach(), ts.entropy.detach(), grad))
                    checked.add((V, dtype, inplace, chunk))
            # Chunked equals unchunked (and inplace equals not), tightly.
            for other in outs[1:]:
                for a, c in zip(outs[0], other):
                    torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-6)

            # No entropy, no graph (the snapshot pass); megatron's TP group by default.
            snap = snapshot_logp(_shard(full, rank, tp).clone(), labels, chunk_size=4, vocab_size=V)
            torch.testing.assert_close(snap[mask].double(), lp_ref[mask].detach(), **FP32_TOL)

            # The micro-batch loss hands vocab_size through: its logp and SFT gradient are the reference's.
            shard = _shard(full, rank, tp).clone().requires_grad_()
            count = torch.tensor(int(mask.sum()))
            out = micro_batch_loss(
                shard, labels, mask, count, ObjectiveConfig(name="sft"), tp_group=tp_group, chunk_size=4, vocab_size=V
            )
            out.loss.backward()
            torch.testing.assert_close(out.logp[mask].double(), lp_ref[mask].detach(), **FP32_TOL)
            zr = full[..., :V].double().requires_grad_()
            lp_sft, _ = _ref_token_stats(zr, labels)
            (g_sft,) = torch.autograd.grad(-torch.where(mask, lp_sft, 0.0).sum() / int(mask.sum()), zr)
            g_sft = torch.cat([g_sft, g_sft.new_zeros(s, b, V_pad - V)], dim=-1)
            torch.testing.assert_close(shard.grad.double(), _shard(g_sft, rank, tp), **grad_tol)

    # vocab_size=None and vocab_size=V_pad: the old behaviour, bit for bit (padded columns count).
    for dtype in DTYPES:
        full = torch.where(torch.arange(V_pad) < 37, real, pad).to(dtype)
        labels = torch.randint(0, V_pad, (s, b), generator=g)
        res = []
        for vocab_size in (None, V_pad):
            for inplace in (False, True):
                shard = _shard(full, rank, tp).clone().requires_grad_()
                ts = vocab_parallel_token_stats(
                    shard, labels, tp_group=tp_group, chunk_size=4, inplace=inplace, vocab_size=vocab_size
                )
                (grad,) = torch.autograd.grad((ts.logp * w + ts.entropy * u).sum(), shard)
                res.append((ts.logp.detach(), ts.entropy.detach(), grad.clone()))
        lp_ref, ent_ref = _ref_token_stats(full.double(), labels)
        torch.testing.assert_close(res[0][0].double(), lp_ref, **FP32_TOL)  # the padding is in the softmax
        for other in res[1:]:
            for a, c in zip(res[0], other):
                assert torch.equal(c, a)
        checked.add(("unpadded", dtype))
    expected = len(PADDED_VOCAB_SIZES) * len(DTYPES) * 2 * len(_chunks(n)) + len(DTYPES)
    return {"checked": len(checked), "expected": expected}


# ----------------------------------------------------------------------------- micro-batches x DP


def _megatron_schedule_loss(loss: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """Run megatron's own forward_step_calc_loss on a 2-tuple loss_func, as its schedule does."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    assert not config.calculate_per_token_loss
    out, _ = forward_step_calc_loss(
        model=None,
        output_tensor=loss,
        loss_func=lambda t: (t, {}),
        config=config,
        vp_stage=None,
        collect_non_loss_data=False,
        num_microbatches=num_microbatches,
        forward_data_store=[],
        cp_group_size=1,
        is_last_stage=True,
    )
    return out


def _check_micro_batches(tp_group, dp_group, tp_rank: int, tp: int, dp_rank: int, dp: int) -> dict:
    """A global batch in 1, 2 or 4 micro-batches per rank, on `dp` DP ranks: same loss, grads, stats."""
    from psft_megatron.loss import (
        LossStats,
        ObjectiveConfig,
        global_token_count,
        megatron_loss_scale,
        micro_batch_loss,
        reduce_stats,
    )

    s, G, h, V = 5, 8, 16, 48
    g = torch.Generator().manual_seed(4321)
    x = torch.randn(s, G, h, generator=g)
    W = torch.randn(V, h, generator=g) * 0.7
    labels = torch.randint(0, V, (s, G), generator=g)
    # Very uneven response lengths per sequence: per-micro-batch means would differ a lot.
    lengths = torch.tensor([5, 1, 4, 0, 2, 5, 1, 3])
    mask = torch.arange(s).unsqueeze(1) >= (s - lengths).unsqueeze(0)
    labels[~mask] = -100
    x64, W64 = x.double(), W.double()
    lp_ref0, _ = _ref_token_stats(torch.einsum("sgh,vh->sgv", x64, W64), labels)
    lp_old = _away_from_clip_edges(lp_ref0 + (torch.rand(s, G, generator=g).double() - 0.5), lp_ref0).float()

    per_rank = G // dp
    mine = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    results = {}
    for name in ("sft", "dft", "psft"):
        cfg = ObjectiveConfig(name=name, eps_low=EPS_LOW, eps_high=EPS_HIGH)

        # float64 reference on the whole global batch and the full weight.
        Wr = W64.clone().requires_grad_()
        lp_r, ent_r = _ref_token_stats(torch.einsum("sgh,vh->sgv", x64, Wr), labels)
        loss_tok = _ref_objective(name, lp_r, lp_old.double())
        n_ref = mask.sum()
        loss_ref = torch.where(mask, loss_tok, 0.0).sum() / n_ref
        (gW_ref,) = torch.autograd.grad(loss_ref, Wr)
        loss_ref = loss_ref.detach()
        ratio_ref = torch.exp(lp_r.detach() - lp_old.double())[mask]

        for n_micro in (1, 2, 4):
            Wp = _shard(W.t(), tp_rank, tp).t().clone().requires_grad_()  # rows of this TP rank's vocab
            mbs = per_rank // n_micro
            seqs = [slice(mine.start + i * mbs, mine.start + (i + 1) * mbs) for i in range(n_micro)]
            count = global_token_count([mask[:, sl] for sl in seqs], dp_group)
            scale = megatron_loss_scale(n_micro, dp)
            reported = torch.zeros(())
            stats = LossStats.empty()
            naive = torch.zeros(())
            for sl in seqs:
                logits = torch.einsum("sgh,vh->sgv", x[:, sl], Wp)
                out = micro_batch_loss(logits, labels[:, sl], mask[:, sl], count, cfg, lp_old[:, sl], tp_group=tp_group, chunk_size=3)
                _megatron_schedule_loss(out.loss * scale, n_micro).backward()
                reported += out.loss.detach()
                stats = stats.merge(out.stats)
                naive += out.loss.detach() * count / max(1, int(mask[:, sl].sum())) / n_micro
            # megatron DDP without calculate_per_token_loss: grad *= 1/dp_cp_size, then SUM over DP x CP.
            grad = Wp.grad / dp
            if dp > 1:
                dist.all_reduce(grad, group=dp_group)
                dist.all_reduce(reported, group=dp_group)
                dist.all_reduce(naive, group=dp_group)
                naive /= dp
            stats = reduce_stats(stats)  # default group: megatron's DP x CP (none in process)

            assert int(count) == int(n_ref)
            torch.testing.assert_close(reported.double(), loss_ref, **FP32_TOL)
            torch.testing.assert_close(grad.double(), _shard(gW_ref.t(), tp_rank, tp).t(), **FP32_TOL)
            if n_micro == 4:  # the per-micro-batch mean (megatron's default) would fail the check above
                assert abs(float(naive) - float(loss_ref)) > 10 * FP32_TOL["atol"]
            summ = stats.summary()
            assert summ["token_count"] == float(n_ref)
            expected = {
                "loss": float(loss_ref),
                "mean_logp": float(lp_r.detach()[mask].mean()),
                "mean_entropy": float(ent_r.detach()[mask].mean()),
                "ratio_mean": float(ratio_ref.mean()),
                "ratio_min": float(ratio_ref.min()),
                "ratio_max": float(ratio_ref.max()),
                "clip_fraction": float((ratio_ref > 1 + EPS_HIGH).double().mean()) if name == "psft" else 0.0,
            }
            for key, val in expected.items():
                assert math.isclose(summ[key], val, rel_tol=1e-5, abs_tol=1e-5), (name, n_micro, key, summ[key], val)
            if name == "psft":
                assert 0.0 < summ["clip_fraction"] < 1.0 and summ["ratio_min"] < 1 - EPS_LOW
            results[(name, n_micro)] = float(reported)
    return results


# ----------------------------------------------------------------------------- launches


def _init(tp: int):
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return (
        parallel_state.get_tensor_model_parallel_group(),
        parallel_state.get_data_parallel_group(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(),
        dist.get_world_size() // tp,
    )


def _two_ranks() -> dict:
    out = {}
    tp_group, dp_group, tp_rank, dp_rank, dp = _init(2)
    out["tokens_tp2"] = _check_token_stats(tp_group, tp_rank, 2)
    out["padded_tp2"] = _check_padded_vocab(tp_group, tp_rank, 2)
    out["mb_tp2_dp1"] = _check_micro_batches(tp_group, dp_group, tp_rank, 2, dp_rank, dp)
    tp_group, dp_group, tp_rank, dp_rank, dp = _init(1)
    out["mb_tp1_dp2"] = _check_micro_batches(tp_group, dp_group, tp_rank, 1, dp_rank, dp)
    return out


def _four_ranks() -> dict:
    out = {}
    tp_group, dp_group, tp_rank, dp_rank, dp = _init(4)
    out["tokens_tp4"] = _check_token_stats(tp_group, tp_rank, 4)
    out["padded_tp4"] = _check_padded_vocab(tp_group, tp_rank, 4)
    tp_group, dp_group, tp_rank, dp_rank, dp = _init(2)
    out["mb_tp2_dp2"] = _check_micro_batches(tp_group, dp_group, tp_rank, 2, dp_rank, dp)
    return out


def _same_loss_everywhere(per_rank: list[dict], key: str, reference: dict) -> None:
    for r in per_rank:
        for k, v in r[key].items():
            assert math.isclose(v, reference[k], rel_tol=1e-5, abs_tol=1e-6), (key, k, v, reference[k])


def _all_ran(result: dict) -> bool:
    """Every combination the check loops over was checked (each is counted once, by its parameters)."""
    return result["checked"] == result["expected"] > 0



def test_tp1_dp1_in_process():
    assert _all_ran(_check_token_stats(None, 0, 1))
    assert _all_ran(_check_padded_vocab(None, 0, 1))
    _check_micro_batches(None, None, 0, 1, 0, 1)


@pytest.mark.slow
def test_two_processes_tp2_and_dp2():
    res = run_in_processes(_two_ranks, 2, timeout=120)
    assert all(_all_ran(r["padded_tp2"]) for r in res)
    base = res[0]["mb_tp2_dp1"]
    _same_loss_everywhere(res, "mb_tp2_dp1", base)
    _same_loss_everywhere(res, "mb_tp1_dp2", base)


@pytest.mark.slow
def test_four_processes_tp4_and_tp2_dp2():
    res = run_in_processes(_four_ranks, 4, timeout=180)
    assert all(_all_ran(r["tokens_tp4"]) for r in res)
    assert all(_all_ran(r["padded_tp4"]) for r in res)
    _same_loss_everywhere(res, "mb_tp2_dp2", res[0]["mb_tp2_dp2"])
