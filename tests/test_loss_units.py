"""Single-process checks of the loss layer's small pieces: config, registry, scaling contract, stats."""

from __future__ import annotations

import math

import pytest
import torch

from psft_megatron.loss import (
    LossStats,
    ObjectiveConfig,
    global_token_count,
    megatron_loss_scale,
    normalized_loss,
    objective_names,
    reduce_stats,
    register_objective,
    token_losses,
    vocab_parallel_token_stats,
)


def test_config_defaults_and_validation():
    cfg = ObjectiveConfig()
    assert (cfg.name, cfg.eps_low, cfg.eps_high, cfg.log_ratio_clamp) == ("psft", 0.2, 0.28, 20.0)
    assert {"sft", "dft", "psft"} <= set(objective_names())
    with pytest.raises(ValueError, match="unknown objective"):
        ObjectiveConfig(name="pfst")
    with pytest.raises(ValueError, match="eps_low"):
        ObjectiveConfig(eps_low=1.0)
    with pytest.raises(ValueError, match="psft needs logp_old"):
        token_losses(ObjectiveConfig(), torch.zeros(2), torch.ones(2))


def test_adding_an_objective_is_one_function():
    @register_objective("unit_test_half_sft")
    def half_sft(logp, aux, cfg):
        return -0.5 * logp, None

    logp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    tl = token_losses(ObjectiveConfig(name="unit_test_half_sft"), logp, torch.tensor([1, 0, 1]))
    assert tl.loss.tolist() == [0.5, 0.0, 1.5]
    tl.loss.sum().backward()
    assert logp.grad.tolist() == [-0.5, 0.0, -0.5]


def test_objectives_declare_their_passes():
    assert [ObjectiveConfig(name=n).needs_snapshot for n in ("sft", "dft", "psft", "sft_kl")] == [False, False, True, False]
    assert [ObjectiveConfig(name=n).needs_reference for n in ("sft", "dft", "psft", "sft_kl")] == [False, False, False, True]
    with pytest.raises(ValueError, match="declares unknown inputs"):
        register_objective("unit_test_bad", needs=("oracle",))
    with pytest.raises(ValueError, match="sft_kl needs logp_ref"):
        token_losses(ObjectiveConfig(name="sft_kl"), torch.zeros(2), torch.ones(2))


def test_sft_kl_has_sfts_gradient_where_policy_equals_reference():
    """At the reference (the start of a run) the KL term is 0 with zero gradient: SFT exactly."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(16, generator=g) * 3).requires_grad_()
    mask = torch.rand(16, generator=g) < 0.7
    kl = token_losses(ObjectiveConfig(name="sft_kl", kl_beta=0.5), logp, mask, logp_ref=logp.detach().clone())
    (g_kl,) = torch.autograd.grad(kl.loss.sum(), logp)
    sft = token_losses(ObjectiveConfig(name="sft"), logp, mask)
    (g_sft,) = torch.autograd.grad(sft.loss.sum(), logp)
    assert torch.equal(kl.loss, sft.loss) and torch.equal(g_kl, g_sft)
    # Away from the reference the penalty is positive and pulls logp back towards it.
    ref = logp.detach() + 0.5
    kl = token_losses(ObjectiveConfig(name="sft_kl", kl_beta=0.5), logp, mask, logp_ref=ref)
    assert (kl.loss[mask] > sft.loss[mask]).all()
    (g_kl,) = torch.autograd.grad(kl.loss.sum(), logp)
    assert (g_kl[mask] < g_sft[mask]).all()  # d/dlogp of exp(d)-d-1 = 1 - exp(d) < 0 for d > 0


def test_sft_kl_away_from_the_reference_matches_the_k3_formula():
    """Values and gradients on both sides of the reference, in float64 from the formula: with
    d = logp_ref - logp, loss = -logp + beta (e^d - d - 1) and d loss/d logp = -1 + beta (1 - e^d).
    (k3 with d's sign flipped is also positive and pulls the same way: only values tell them apart.)"""
    beta = 0.5
    d = torch.tensor([-2.0, -0.5, -0.01, 0.3, 1.0, 2.5], dtype=torch.float64)
    logp = torch.full_like(d, -1.5).requires_grad_()
    out = token_losses(ObjectiveConfig(name="sft_kl", kl_beta=beta), logp, torch.ones_like(d),
                       logp_ref=logp.detach() + d)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    x = d.tolist()
    assert out.loss.tolist() == pytest.approx([1.5 + beta * (math.exp(v) - v - 1) for v in x], rel=1e-12)
    assert grad.tolist() == pytest.approx([-1 + beta * (1 - math.exp(v)) for v in x], rel=1e-12)


def test_log_ratio_clamp_keeps_ratio_finite():
    logp = torch.tensor([-1.0, -200.0], requires_grad=True)
    tl = token_losses(ObjectiveConfig(name="psft"), logp, torch.ones(2), logp_old=torch.tensor([-300.0, -1.0]))
    assert torch.allclose(tl.ratio, torch.tensor([math.exp(20.0), math.exp(-20.0)]))
    assert tl.clipped.tolist() == [True, False]
    tl.loss.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0] == 0.0


def _schedule(loss: torch.Tensor, num_microbatches: int, cp: int) -> torch.Tensor:
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.transformer.transformer_config import TransformerConfig

    out, _ = forward_step_calc_loss(
        None, loss, lambda t: (t, {}), TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1),
        None, False, num_microbatches, [], cp_group_size=cp, is_last_stage=True,
    )
    return out


@pytest.mark.parametrize("num_microbatches,dp,cp", [(1, 1, 1), (4, 2, 1), (3, 2, 2), (8, 1, 4)])
def test_megatron_loss_scale_undoes_schedule_and_ddp(num_microbatches, dp, cp):
    """megatron's own schedule step, then DDP's 1/(dp*cp): a term of 1 must stay 1 (so the
    terms' sum over micro-batches and DP x CP ranks is the global token mean)."""
    term = torch.tensor(1.0)
    after_schedule = _schedule(term * megatron_loss_scale(num_microbatches, dp, cp), num_microbatches, cp)
    assert float(after_schedule) / (dp * cp) == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="calculate_per_token_loss"):
        megatron_loss_scale(num_microbatches, dp, cp, calculate_per_token_loss=True)


def test_normalized_loss_and_count_single_process():
    masks = [torch.tensor([[1, 0], [1, 1]]), torch.tensor([[0, 0], [0, 1]])]
    count = global_token_count(masks)
    assert count.dtype == torch.int64 and int(count) == 4
    loss = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])  # masked NaN must not leak
    assert float(normalized_loss(loss, masks[0], count)) == 1.5
    assert float(normalized_loss(loss, torch.zeros(2, 2), torch.tensor(0))) == 0.0


def test_stats_merge_is_exact_and_empty_is_identity():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -4.0]])
    ent = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    old = torch.tensor([[-1.5, -2.0], [-0.5, -3.0]])
    mask = torch.tensor([[1, 1], [0, 1]])
    cfg = ObjectiveConfig()
    whole = LossStats.from_tokens(token_losses(cfg, logp, mask, old), logp, ent, mask)
    parts = LossStats.empty()
    for i in range(2):
        tl = token_losses(cfg, logp[i : i + 1], mask[i : i + 1], old[i : i + 1])
        parts = parts.merge(LossStats.from_tokens(tl, logp[i : i + 1], ent[i : i + 1], mask[i : i + 1]))
    assert torch.equal(parts.sums, whole.sums)
    s = reduce_stats(parts).summary()  # single process: no-op reduction
    assert s["token_count"] == 3.0
    assert s["mean_entropy"] == pytest.approx((1 + 2 + 4) / 3)
    assert s["ratio_min"] == pytest.approx(math.exp(-1.0)) and s["ratio_max"] == pytest.approx(math.exp(0.5))
    assert s["clip_fraction"] == pytest.approx(1 / 3)  # only exp(0.5) = 1.65 > 1.28
    empty = LossStats.empty().summary()
    assert empty["token_count"] == 0.0 and math.isnan(empty["mean_entropy"])


def test_token_stats_rejects_bad_shapes_and_handles_no_tokens():
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_token_stats(torch.zeros(2, 3, 8), torch.zeros(2, 2, dtype=torch.long))
    z = torch.zeros(0, 2, 8, requires_grad=True)
    ts = vocab_parallel_token_stats(z, torch.zeros(0, 2, dtype=torch.long))
    assert ts.logp.shape == (0, 2) and ts.entropy.shape == (0, 2)
    (ts.logp.sum() + ts.entropy.sum()).backward()
    assert z.grad.shape == z.shape


def test_own_logp_is_ratio_one_and_sft_gradient():
    """OWN_LOGP (first mini-batch after a snapshot): PSFT's gradient is exactly SFT's."""
    from psft_megatron.loss.compute import OWN_LOGP, micro_batch_loss

    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 2, 32, generator=g) * 3
    labels = torch.randint(0, 32, (4, 2), generator=g)
    mask = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1]])
    count = global_token_count(mask)
    grads = {}
    for name, old in (("sft", None), ("psft", OWN_LOGP)):
        z = base.clone().requires_grad_()
        out = micro_batch_loss(z, labels, mask, count, ObjectiveConfig(name=name), old, chunk_size=3)
        out.loss.backward()
        grads[name] = z.grad
        if name == "psft":
            s = out.stats.summary()
            assert s["ratio_min"] == s["ratio_max"] == 1.0 and s["clip_fraction"] == 0.0
    assert torch.equal(grads["psft"], grads["sft"])


def test_token_stats_vocab_size_never_reads_padding():
    """vocab_size=V: the padded columns are never read (NaN there changes nothing), results equal
    those of the logits trimmed to V, their gradient is exactly 0; out-of-range sizes are refused."""
    from psft_megatron.loss import snapshot_logp
    from psft_megatron.loss.compute import micro_batch_loss

    g = torch.Generator().manual_seed(11)
    V, V_pad = 29, 32
    real = torch.randn(5, 2, V, generator=g) * 3
    labels = torch.randint(0, V, (5, 2), generator=g)
    mask = torch.ones(5, 2, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16):
        trimmed = real.to(dtype).requires_grad_()
        padded = torch.cat([real, torch.full((5, 2, V_pad - V), float("nan"))], -1).to(dtype).requires_grad_()
        ref = vocab_parallel_token_stats(trimmed, labels, chunk_size=3)
        for inplace in (False, True):
            z = padded.detach().clone().requires_grad_()
            ts = vocab_parallel_token_stats(z, labels, chunk_size=3, inplace=inplace, vocab_size=V)
            torch.testing.assert_close(ts.logp, ref.logp, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(ts.entropy, ref.entropy, atol=1e-6, rtol=1e-6)
            (grad,) = torch.autograd.grad(ts.logp.sum() + ts.entropy.sum(), z)
            (grad_ref,) = torch.autograd.grad(ref.logp.sum() + ref.entropy.sum(), trimmed, retain_graph=True)
            torch.testing.assert_close(grad[..., :V], grad_ref, atol=1e-6, rtol=1e-6)
            assert torch.equal(grad[..., V:], torch.zeros_like(grad[..., V:]))
        snap = snapshot_logp(padded.detach(), labels, vocab_size=V)
        torch.testing.assert_close(snap, ref.logp.detach(), atol=1e-6, rtol=1e-6)
        count = global_token_count(mask)
        out = micro_batch_loss(padded.detach(), labels, mask, count, ObjectiveConfig(name="sft"), vocab_size=V)
        torch.testing.assert_close(out.logp, ref.logp.detach(), atol=1e-6, rtol=1e-6)
    for bad in (0, V_pad + 1):
        with pytest.raises(ValueError, match="vocab_size"):
            vocab_parallel_token_stats(torch.zeros(2, V_pad), torch.zeros(2, dtype=torch.long), vocab_size=bad)


def test_psft_trust_region_edges_match_the_formula():
    """Per token, in float64: loss = -min(r, clip(r, 1-eps_low, 1+eps_high)) with r = exp(logp - logp_old);
    the gradient w.r.t. logp is -r where r <= 1+eps_high (below 1-eps_low too: the min keeps r there)
    and 0 above it, and only those tokens count as clipped."""
    eps_low, eps_high = 0.2, 0.28
    r = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.21, 1.25, 1.279, 1.281, 2.0, 40.0], dtype=torch.float64)
    logp_old = torch.full_like(r, -2.0)
    logp = (logp_old + r.log()).requires_grad_()
    mask = torch.ones_like(r)
    out = token_losses(ObjectiveConfig(name="psft", eps_low=eps_low, eps_high=eps_high), logp, mask, logp_old=logp_old)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    expected = [-min(x, min(max(x, 1 - eps_low), 1 + eps_high)) for x in r.tolist()]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-12)
    inside = r <= 1 + eps_high
    assert grad.tolist() == pytest.approx(torch.where(inside, -r, torch.zeros_like(r)).tolist(), rel=1e-12)
    assert out.clipped.tolist() == (~inside).tolist()


def test_psft_unweighted_keeps_the_clip_and_drops_the_ratio_weight():
    """The diagnostic objective, per token in float64: loss -logp and gradient -1 where
    r <= 1+eps_high, loss and gradient 0 above; the same tokens as PSFT count as clipped."""
    eps_high = 0.28
    r = torch.tensor([0.3, 0.79, 1.0, 1.2, 1.279, 1.281, 3.0], dtype=torch.float64)
    logp_old = torch.full_like(r, -1.0)
    logp = (logp_old + r.log()).requires_grad_()
    cfg = ObjectiveConfig(name="psft_unweighted", eps_high=eps_high)
    assert cfg.needs_snapshot and not cfg.needs_reference
    out = token_losses(cfg, logp, torch.ones_like(r), logp_old=logp_old)
    (grad,) = torch.autograd.grad(out.loss.sum(), logp)
    inside = [x <= 1 + eps_high for x in r.tolist()]
    assert out.loss.tolist() == pytest.approx([-lp if i else 0.0 for lp, i in zip(logp.tolist(), inside)], rel=1e-12)
    assert grad.tolist() == [-1.0 if i else 0.0 for i in inside]
    assert out.clipped.tolist() == [not i for i in inside]
    assert out.ratio.tolist() == pytest.approx(r.tolist(), rel=1e-12)
    with pytest.raises(ValueError, match="psft_unweighted needs logp_old"):
        token_losses(cfg, logp, torch.ones_like(r))
