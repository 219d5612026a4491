"""The trainer against an independent float64 reference (``tests/reference_trainer.py``).

One random Llama (transformers, tied embeddings, a 300-token vocabulary that megatron
pads to 384) is converted with the project's converter and trained by the project's
trainer at TP=1 with micro-batch sizes 1, 2 and 4, and at TP=2+SP, PP=2, DP=2 and CP=2;
the sft_kl objective at TP=1 and TP=2+SP (tests/reference_runs.py: all in one launch per
process count). The
reference trains the same weights in float64 on the same rows (from the project's
loader): one global batch of SFT warm-up, then three of PSFT with k=2 mini-batches each,
with ``clip_grad`` small enough that clipping acts on most steps. Compared step by step:
loss, entropy, mean log-prob, clip fraction, ratio range, grad norm and lr; then every
final weight.

Tolerances come from fp32 round-off. The trainer computes in fp32 (unit round-off 6e-8);
reductions over ~10^3 tokens and a few layers make each step's metrics agree with float64
to a few 1e-7 relative (measured worst over all runs and steps: 7e-7, the ratio extrema),
and eight Adam steps turn that into final weights within 1.0e-5 (where a gradient is near
zero, Adam's update direction is sensitive to round-off). The tolerances are ten times the
measured worst: 1e-5 relative for metrics, 1e-4 absolute for weights. Every planted wiring
bug of issue #16 (tests/mutation_check.py) moves a compared value by far more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from reference_runs import (
    KL_BETA,
    MOE_AUX_COEFF,
    MOE_RUNS,
    OPTIMIZER,
    PSFT_RUNS,
    SFT_KL_RUNS,
    TRAINING,
    VARIANT_RUNS,
    VOCAB,
    eval_rows,
    reference_rows,
    train_all,
    variant_objective,
)

pytestmark = pytest.mark.slow

METRICS = ("loss", "entropy", "mean_logp", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "lr")
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-7
WEIGHT_ATOL = 1e-4
RUNS = PSFT_RUNS
KL_COMPARED = ("loss", "entropy", "mean_logp", "grad_norm", "lr")


def reference_config(objective: str, **extra: Any) -> Any:
    """The float64 trainer's settings: the recipes' optimizer, schedule and warm-up."""
    from reference_trainer import RefConfig

    o = OPTIMIZER
    t = dict(TRAINING, **extra.pop("training", {}))
    return RefConfig(lr=o["lr"], min_lr=o["min_lr"], warmup=o["lr_warmup_steps"], total_steps=t["train_steps"],
                     weight_decay=o["weight_decay"], betas=(o["adam_beta1"], o["adam_beta2"]), eps=o["adam_eps"],
                     clip_grad=o["clip_grad"], sft_warmup_steps=t["sft_warmup_steps"], objective=objective,
                     passes=t.get("passes_per_snapshot", 1), **extra)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict[str, Any]:
    """Every PSFT and sft_kl run of this module, trained together (tests/reference_runs.py)."""
    return train_all(tmp_path_factory.mktemp("reference_runs"))


def _float64_run(reference_runs: dict[str, Any], objective: str, run: str, group: str | None = None,
                 **extra: Any) -> dict[str, Any]:
    """The float64 reference trainer on the rows of ``group/run`` (group: the objective, ``variant``
    or ``moe``), from the same start model."""
    from transformers import AutoModelForCausalLM

    from reference_trainer import train

    group = group or objective
    start = reference_runs["moe_hf_init" if group == "moe" else "hf_init"]
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float64, attn_implementation="eager",
                                                 experts_implementation="eager")
    records = train(model, reference_rows(reference_runs["recipes"][f"{group}/{run}"]), VOCAB,
                    reference_config(objective, **extra))
    return {"ref": records, "ref_weights": model.state_dict(), "trained": reference_runs[group],
            "final": {name: w for key, w in reference_runs["final"].items()
                      for o, name in [key.split("/")] if o == group}}


@pytest.fixture(scope="module")
def results(reference_runs) -> dict[str, Any]:
    return _float64_run(reference_runs, "psft", "tp1_micro1")


@pytest.fixture(scope="module")
def sft_kl_results(reference_runs) -> dict[str, Any]:
    return _float64_run(reference_runs, "sft_kl", "tp1", kl_beta=KL_BETA)


def test_reference_run_exercises_what_it_should(results):
    ref = results["ref"]
    assert [r["phase"] for r in ref] == ["sft"] * 2 + ["psft"] * 6
    assert sum(r["clipped_grad"] for r in ref) >= 6, "clip_grad must act on most steps"
    assert max(r["clip_frac"] for r in ref) > 0, "some PSFT tokens must be clipped"
    # learning: the SFT objective falls over the run on the same held-out-free rows
    assert ref[-1]["mean_logp"] > ref[0]["mean_logp"]


@pytest.mark.parametrize("name", list(RUNS))
def test_trainer_matches_reference_step_by_step(results, name):
    got = results["trained"][name]["records"]
    ref = results["ref"]
    assert [g["step"] for g in got] == [r["step"] for r in ref]
    worst = {}
    for g, r in zip(got, ref):
        assert g["phase"] == r["phase"] and g["tokens"] == r["tokens"], f"step {r['step']}"
        for key in METRICS:
            err = abs(g[key] - r[key]) / max(abs(r[key]), METRIC_ATOL / METRIC_RTOL)
            worst[key] = max(worst.get(key, 0.0), err)
    bad = {k: v for k, v in worst.items() if v > METRIC_RTOL}
    assert not bad, f"{name}: relative error above {METRIC_RTOL}: {bad} (all: {worst})"


@pytest.mark.parametrize("name", list(RUNS))
def test_final_weights_match_reference(results, name):
    ref = results["ref_weights"]
    got = results["final"][name]
    assert set(got) == set(ref)
    diffs = {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= WEIGHT_ATOL, f"{name}: {worst} differs by {diffs[worst]:.2e} (> {WEIGHT_ATOL})"


# ----------------------------------------------------------------------------- sft_kl
# SFT + beta x KL towards the frozen starting weights, at TP=1 and TP=2+SP: the float64 trainer
# gives logp_ref from a frozen deepcopy of the starting model.


@pytest.mark.parametrize("name", list(SFT_KL_RUNS))
def test_sft_kl_matches_the_float64_reference(sft_kl_results, name):
    got, ref = sft_kl_results["trained"][name]["records"], sft_kl_results["ref"]
    assert [g["phase"] for g in got] == [r["phase"] for r in ref] == ["sft"] * 2 + ["sft_kl"] * 6
    worst = {}
    for g, r in zip(got, ref):
        for key in KL_COMPARED:
            err = abs(g[key] - r[key]) / max(abs(r[key]), METRIC_ATOL / METRIC_RTOL)
            worst[key] = max(worst.get(key, 0.0), err)
    assert all(v <= METRIC_RTOL for v in worst.values()), f"{name}: {worst}"
    # The KL term is really acting: sft_kl's loss is above the response NLL once the policy moved.
    assert any(g["loss"] > -g["mean_logp"] + 1e-4 for g in got[2:])
    final = sft_kl_results["final"][name]
    diffs = {k: float((final[k] - v).abs().max()) for k, v in sft_kl_results["ref_weights"].items()}
    assert max(diffs.values()) <= WEIGHT_ATOL, max(diffs.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("name", list(SFT_KL_RUNS))
def test_sft_kl_reference_model_is_frozen(sft_kl_results, name):
    """Never updated, never in the optimizer, no gradient, while the policy moves away from it."""
    t = sft_kl_results["trained"][name]
    assert t["policy_moved"]
    assert t["reference_unchanged"] and not t["reference_in_optimizer"] and not t["reference_requires_grad"]


# ----------------------------------------------------------------------------- variants
# Two passes per snapshot (the second pass's ratios come from the token's own first update; the
# snapshot pass then also scores mini-batch 1) at TP=1 and PP=2, and the diagnostic objective
# psft_unweighted (the clip's mask, no ratio weight), each against the float64 trainer.


@pytest.mark.parametrize("name", list(VARIANT_RUNS))
def test_variant_matches_the_float64_reference(reference_runs, name):
    _, _, _, _, training = VARIANT_RUNS[name]
    res = _float64_run(reference_runs, variant_objective(name), name, group="variant", training=training)
    got, ref = res["trained"][name]["records"], res["ref"]
    warmup = training.get("sft_warmup_steps", TRAINING["sft_warmup_steps"])
    assert [g["phase"] for g in got] == [r["phase"] for r in ref]
    assert [r["phase"] for r in ref].count("sft") == warmup and len(ref) > warmup
    assert max(r["clip_frac"] for r in ref) > 0, "the trust region must act for the comparison to mean something"
    worst = {}
    for g, r in zip(got, ref):
        assert g["tokens"] == r["tokens"], f"step {r['step']}"
        for key in METRICS:
            err = abs(g[key] - r[key]) / max(abs(r[key]), METRIC_ATOL / METRIC_RTOL)
            worst[key] = max(worst.get(key, 0.0), err)
    assert all(v <= METRIC_RTOL for v in worst.values()), f"{name}: {worst}"
    final = res["final"][name]
    diffs = {k: float((final[k] - v).abs().max()) for k, v in res["ref_weights"].items()}
    assert max(diffs.values()) <= WEIGHT_ATOL, max(diffs.items(), key=lambda kv: kv[1])
    if training.get("passes_per_snapshot", 1) > 1:
        # The second pass of mini-batch 1 no longer runs on the snapshot weights: its ratio moved.
        k = TRAINING["global_batch_size"] // TRAINING["mini_batch_size"]
        second_first = [r for r in ref[warmup:] if (r["step"] - warmup - 1) % (2 * k) == k]
        assert second_first and all(r["ratio_max"] != 1.0 for r in second_first)


# ----------------------------------------------------------------------------- LoRA
# LoRA (rank 4, alpha 8) on every projection at TP=1, TP=2+SP, PP=2 x VP=2, CP=2 and DP=2 (the
# distributed optimizer, the fused output layer), stopped and resumed, and under sft_kl with q, v and
# down only: the float64 trainer wraps the same HF model's linears in W x + s B A x (its own LoRA, from
# the definition) starting from the run's first adapters, and trains A and B alone.

_PARENT = {"linear_qkv": "self_attn", "linear_proj": "self_attn", "linear_fc1": "mlp", "linear_fc2": "mlp"}


def _hf_adapters(initial: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's first adapters (``decoder.layers.L.<parent>.<linear>.lora_A.<unit>``) by HF module name."""
    import re

    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in initial.items():
        layer, module, ab, unit = re.match(r"decoder\.layers\.(\d+)\.\w+\.(linear_\w+)\.lora_([AB])\.(\w+)$",
                                           name).groups()
        found.setdefault(f"model.layers.{layer}.{_PARENT[module]}.{unit}", {})[ab] = t.double()
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def _lora_reference(reference_runs, name: str) -> dict[str, Any]:
    """The float64 LoRA reference of lora/``name`` (a one-process run: its first adapters are the global
    tensors); lora/tp1_continue starts from lora/tp1's exported PEFT adapters."""
    from transformers import LlamaForCausalLM

    from reference_runs import LORA, LORA_OPTIMIZER, LORA_RUNS
    from reference_trainer import LoRALinear, add_lora, train

    objective = LORA_RUNS[name][0]
    model = LlamaForCausalLM.from_pretrained(reference_runs["hf_init"], dtype=torch.float64,
                                             attn_implementation="eager")
    chosen = _hf_adapters(reference_runs["lora"][name]["initial_adapters"])
    if name == "tp1_continue":  # it starts where lora/tp1 ended: that run's exported PEFT adapters
        peft = reference_runs["peft"]["lora/tp1"]
        chosen = {m: tuple(peft[f"base_model.model.{m}.lora_{ab}.weight"].double() for ab in "AB") for m in chosen}
    add_lora(model, chosen, LORA["alpha"] / LORA["rank"])
    cfg = reference_config(objective, kl_beta=KL_BETA)
    cfg.lr, cfg.min_lr = LORA_OPTIMIZER["lr"], LORA_OPTIMIZER["min_lr"]
    records = train(model, reference_rows(reference_runs["recipes"][f"lora/{name}"]), VOCAB, cfg)
    merged = {k: v for k, v in model.state_dict().items() if ".base." not in k and "lora_" not in k}
    adapters = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            merged[f"{mod_name}.weight"] = m.merged_weight().detach()
            adapters[mod_name] = (m.lora_A.detach(), m.lora_B.detach())
    return {"records": records, "merged": merged, "adapters": adapters, "targets": sorted(chosen)}


@pytest.fixture(scope="module")
def lora_references(reference_runs) -> Callable[[str], dict[str, Any]]:
    """``lora_references(name)``: the float64 reference of lora/``name`` (tp1, sft_kl_qv or tp1_continue),
    trained when a test first asks for it (so no one test's set-up trains all three)."""
    cache: dict[str, dict[str, Any]] = {}

    def get(name: str) -> dict[str, Any]:
        if name not in cache:
            cache[name] = _lora_reference(reference_runs, name)
        return cache[name]

    return get


def _assert_lora_matches(reference_runs, ref: dict[str, Any], name: str, compared: tuple[str, ...]) -> None:
    got = reference_runs["lora"][name]["records"]
    assert [g["phase"] for g in got] == [r["phase"] for r in ref["records"]]
    worst = {}
    for g, r in zip(got, ref["records"]):
        assert g["tokens"] == r["tokens"], f"step {r['step']}"
        for key in compared:
            err = abs(g[key] - r[key]) / max(abs(r[key]), METRIC_ATOL / METRIC_RTOL)
            worst[key] = max(worst.get(key, 0.0), err)
    assert all(v <= METRIC_RTOL for v in worst.values()), f"lora/{name}: {worst}"
    final = reference_runs["final"][f"lora/{name}"]  # the exported checkpoint, merged into its base
    assert set(final) == set(ref["merged"])
    diffs = {k: float((final[k] - v).abs().max()) for k, v in ref["merged"].items()}
    assert max(diffs.values()) <= WEIGHT_ATOL, max(diffs.items(), key=lambda kv: kv[1])
    peft = reference_runs["peft"][f"lora/{name}"]  # the same checkpoint as an HF PEFT adapter
    assert len(peft) == 2 * len(ref["adapters"])
    for module, (a, b) in ref["adapters"].items():
        for ab, want in (("A", a), ("B", b)):
            have = peft[f"base_model.model.{module}.lora_{ab}.weight"].double()
            assert have.shape == want.shape and float((have - want).abs().max()) <= WEIGHT_ATOL, f"{module} {ab}"


def test_lora_reference_learns(lora_references):
    ref = lora_references("tp1")["records"]
    assert [r["phase"] for r in ref] == ["sft"] * 2 + ["psft"] * 6
    assert max(r["clip_frac"] for r in ref) > 0, "the trust region must act for the comparison to mean something"
    assert ref[-1]["mean_logp"] > ref[0]["mean_logp"]
    assert all(float(b.abs().max()) > 0 for _, b in lora_references("tp1")["adapters"].values()), "every B moved"


@pytest.mark.parametrize("name", ["tp1", "tp2_sp", "pp2_vp2", "cp2", "dp2_distopt_fused", "tp1_resume"])
def test_lora_matches_the_float64_reference(reference_runs, lora_references, name):
    _assert_lora_matches(reference_runs, lora_references("tp1"), name, METRICS)


def test_lora_continues_from_a_lora_checkpoint(reference_runs, lora_references):
    """init_from lora/tp1's final checkpoint (the adapters alone, pointing at the base): the run starts
    from exactly those adapters on that base, with a fresh optimizer, matches the float64 trainer started
    there, and its own checkpoint points at the full base (pointers never chain)."""
    run = reference_runs["lora"]["tp1_continue"]
    assert run["init_from"] == reference_runs["lora"]["tp1"]["checkpoint"]
    peft = reference_runs["peft"]["lora/tp1"]
    for module, (a, b) in _hf_adapters(run["initial_adapters"]).items():
        for ab, got in (("A", a), ("B", b)):
            assert torch.equal(got.float(), peft[f"base_model.model.{module}.lora_{ab}.weight"].float()), module
    _assert_lora_matches(reference_runs, lora_references("tp1_continue"), "tp1_continue", METRICS)
    first = [r["loss"] for r in reference_runs["lora"]["tp1"]["records"]][0]
    assert run["records"][0]["loss"] < first, "the continued run starts from the trained adapters, not afresh"
    metas = [json.loads((Path(reference_runs["lora"][n]["checkpoint"]) / "psft_meta.json").read_text())
             for n in ("tp1", "tp1_continue")]
    assert metas[1]["lora_base"] == metas[0]["lora_base"] == str(Path(reference_runs["recipes"]["lora/tp1"]
                                                                     ["checkpoint"]["init_from"]).resolve())


def test_lora_resume_is_bit_exact(reference_runs):
    """Stopped after step 4 (a checkpoint of the adapters and their optimizer state, pointing at the base)
    and relaunched: the same eight steps as the uninterrupted run, bit for bit."""
    got, ref = reference_runs["lora"]["tp1_resume"], reference_runs["lora"]["tp1"]
    assert [g["step"] for g in got["records"]] == list(range(1, 9))
    for g, r in zip(got["records"], ref["records"]):
        for key in METRICS + ("tokens", "phase"):
            assert g[key] == r[key], f"step {r['step']} {key}"
    for k, v in reference_runs["final"]["lora/tp1"].items():
        assert torch.equal(reference_runs["final"]["lora/tp1_resume"][k], v), k


def test_lora_sft_kl_against_the_base_matches_the_float64_reference(reference_runs, lora_references):
    """sft_kl's reference is the base (the adapters switched off); only q, v and down carry adapters."""
    ref = lora_references("sft_kl_qv")
    assert ref["targets"] and {t.rsplit(".", 1)[1] for t in ref["targets"]} == {"q_proj", "v_proj", "down_proj"}
    _assert_lora_matches(reference_runs, ref, "sft_kl_qv", KL_COMPARED)
    got = reference_runs["lora"]["sft_kl_qv"]["records"]
    assert any(g["loss"] > -g["mean_logp"] + 1e-4 for g in got[2:]), "the KL term must act"


@pytest.mark.parametrize("name", ["tp1", "sft_kl_qv"])
def test_lora_base_is_frozen(reference_runs, name):
    """No base weight wants a gradient or sits in the optimizer; the optimizer holds the adapters alone."""
    from reference_runs import LORA

    t = reference_runs["lora"][name]
    assert not t["base_requires_grad"] and not t["base_in_optimizer"]
    r, h, kv, f, layers = LORA["rank"], 64, 32, 160, 4  # the reference model's sizes (4 heads of 16, 2 KV heads)
    per_unit = {"q_proj": r * (h + h), "k_proj": r * (h + kv), "v_proj": r * (h + kv), "o_proj": r * (h + h),
                "gate_proj": r * (h + f), "up_proj": r * (h + f), "down_proj": r * (f + h)}
    units = ["q_proj", "v_proj", "down_proj"] if name == "sft_kl_qv" else list(per_unit)
    assert t["optimizer_params"] == layers * sum(per_unit[u] for u in units)


# ----------------------------------------------------------------------------- eval KL to the start
# training.eval_kl_to_start: the evaluator's KL(model || start) on the held-out rows, at TP=1 and at
# TP=2+SP with the fused output layer, against the full-vocabulary KL of the exported start and final
# models (transformers, float64, each packed sample run alone).
EVAL_KL_RTOL = 1e-4


def _float64_kl(start: Any, final: Any, rows: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
    from reference_trainer import segments

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            for a, b in segments(row):
                mask = row["loss_mask"][a:b] > 0
                if not mask.any():
                    continue
                ids = row["tokens"][a:b].unsqueeze(0)
                logp = torch.log_softmax(final(input_ids=ids).logits[0, :, :VOCAB].double(), -1)[mask]
                logq = torch.log_softmax(start(input_ids=ids).logits[0, :, :VOCAB].double(), -1)[mask]
                total += float((logp.exp() * (logp - logq)).sum())
                count += int(mask.sum())
    return total, count


@pytest.mark.parametrize("name", [n for n in VARIANT_RUNS if n.startswith("evalkl")])
def test_eval_kl_to_start_matches_float64(reference_runs, name):
    from transformers import LlamaForCausalLM

    evals = reference_runs["variant"][name]["eval"]
    assert [e["step"] for e in evals] == [0, TRAINING["train_steps"]]
    assert evals[0]["kl"] == 0.0  # the start model against itself
    start = LlamaForCausalLM.from_pretrained(reference_runs["hf_init"], dtype=torch.float64,
                                             attn_implementation="eager").eval()
    final = LlamaForCausalLM.from_pretrained(reference_runs["hf_init"], dtype=torch.float64,
                                             attn_implementation="eager").eval()
    final.load_state_dict(reference_runs["final"][f"variant/{name}"])
    total, count = _float64_kl(start, final, eval_rows(reference_runs["recipes"][f"variant/{name}"]))
    assert evals[-1]["tokens"] == count
    assert total / count > 1e-3, "training must have moved the model for the comparison to mean something"
    assert evals[-1]["kl"] == pytest.approx(total / count, rel=EVAL_KL_RTOL)


def test_lora_eval_kl_to_start_is_to_the_base(reference_runs):
    """A LoRA run's evaluator measures KL to its start, the base (the adapters switched off, no copy):
    lora/tp2_sp (TP=2+SP) against the float64 KL of its merged export to the converted base."""
    from transformers import LlamaForCausalLM

    evals = reference_runs["lora"]["tp2_sp"]["eval"]
    assert [e["step"] for e in evals] == [0, TRAINING["train_steps"]]
    assert evals[0]["kl"] == 0.0  # B = 0: the model is its base
    start = LlamaForCausalLM.from_pretrained(reference_runs["hf_init"], dtype=torch.float64,
                                             attn_implementation="eager").eval()
    final = LlamaForCausalLM.from_pretrained(reference_runs["hf_init"], dtype=torch.float64,
                                             attn_implementation="eager").eval()
    final.load_state_dict(reference_runs["final"]["lora/tp2_sp"])
    total, count = _float64_kl(start, final, eval_rows(reference_runs["recipes"]["lora/tp2_sp"]))
    assert evals[-1]["tokens"] == count
    assert total / count > 1e-3, "training must have moved the model for the comparison to mean something"
    assert evals[-1]["kl"] == pytest.approx(total / count, rel=EVAL_KL_RTOL)


def test_lora_hf_copy_at_save_is_the_base_with_its_adapters_merged(reference_runs):
    """checkpoint.save_hf on a LoRA run (lora/tp2_sp, TP=2+SP): the background HF copy of the final
    checkpoint holds merged weights, equal to peft's own merge (``merge_and_unload``) of the same
    checkpoint's PEFT export onto the transformers base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = Path(reference_runs["lora"]["tp2_sp"]["checkpoint"])
    copy = ckpt.parent / f"{ckpt.name}_hf"
    assert (copy / "config.json").is_file(), f"no HF copy beside {ckpt}: {sorted(p.name for p in ckpt.parent.iterdir())}"
    got = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(reference_runs["hf_init"], dtype=torch.float32)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    peft_dir = Path(reference_runs["hf_init"]).parent / "final" / "lora" / "tp2_sp_peft"
    want = PeftModel.from_pretrained(base, peft_dir).merge_and_unload().state_dict()
    assert got.keys() == want.keys()
    moved = [k for k in want if not torch.equal(want[k], base_weights[k])]
    assert moved and all(".self_attn." in k or ".mlp." in k for k in moved), moved  # the adapted linears only
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------- mixture of experts
# The tiny Qwen3-MoE (megatron's MoE layer, SequentialMLP, the allgather dispatcher on gloo) against
# the float64 trainer on transformers' Qwen3MoeForCausalLM with the load-balancing loss written out
# (reference_trainer.load_balancing), at EP=1, EP=2 and TP=2+SP x EP=2, and with two passes per
# snapshot at EP=2; and the EP=2 runs against the EP=1 run. The tolerances are the dense runs'
# (measured against float64: metrics within 1.9e-6 relative, the ratio extrema; final weights within
# 3.3e-5; EP=2 and TP=2+SP x EP=2 against EP=1: metrics within 1.5e-6, weights within 2.1e-5).

MOE_METRICS = METRICS + ("moe_aux_loss",)
MOE_WEIGHT_ATOL = WEIGHT_ATOL


@pytest.fixture(scope="module")
def moe_results(reference_runs) -> Callable[[str], dict[str, Any]]:
    """The float64 run of an MoE run's schedule, trained when a test first asks for it and shared by
    the runs with the same training section (EP=1, EP=2 and TP=2+SP x EP=2 share one), so no
    single test's setup trains both (each is a few minutes of float64 MoE on a busy machine)."""
    cache: dict[tuple, dict[str, Any]] = {}

    def result(name: str) -> dict[str, Any]:
        training = tuple(sorted(MOE_RUNS[name][3].items()))
        if training not in cache:  # the rows of the first run with this schedule (the layouts' rows are the same)
            run = next(n for n, spec in MOE_RUNS.items() if tuple(sorted(spec[3].items())) == training)
            cache[training] = _float64_run(reference_runs, "psft", run, group="moe", aux_coeff=MOE_AUX_COEFF,
                                           micro_batch_size=1, training=dict(training))
        return cache[training]

    return result


def _relative_errors(got: list[dict], ref: list[dict], keys: tuple[str, ...]) -> dict[str, float]:
    worst: dict[str, float] = {}
    for g, r in zip(got, ref):
        for key in keys:
            err = abs(g[key] - r[key]) / max(abs(r[key]), METRIC_ATOL / METRIC_RTOL)
            worst[key] = max(worst.get(key, 0.0), err)
    return worst


@pytest.mark.parametrize("name", list(MOE_RUNS))
def test_moe_matches_the_float64_reference(moe_results, name):
    res = moe_results(name)
    got, ref = res["trained"][name]["records"], res["ref"]
    assert [g["step"] for g in got] == [r["step"] for r in ref]
    assert [g["phase"] for g in got] == [r["phase"] for r in ref]
    assert all(g["tokens"] == r["tokens"] for g, r in zip(got, ref))
    assert max(r["clip_frac"] for r in ref) > 0, "the trust region must act"
    # The load-balancing term is really in the objective: it is a visible part of it.
    assert all(r["moe_aux_loss"] > 0.02 for r in ref)
    worst = _relative_errors(got, ref, MOE_METRICS)
    assert all(v <= METRIC_RTOL for v in worst.values()), f"{name}: {worst}"
    final = res["final"][name]
    diffs = {k: float((final[k] - v).abs().max()) for k, v in res["ref_weights"].items()}
    assert set(final) == set(res["ref_weights"])
    assert max(diffs.values()) <= MOE_WEIGHT_ATOL, max(diffs.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("name", list(MOE_RUNS))
def test_moe_expert_load_is_the_reference_routing(moe_results, name):
    """metrics.jsonl's per-layer expert load is the share of the mini-batch's routed positions
    each expert got, as the float64 model routes them (a near-tie may flip one token's choice)."""
    res = moe_results(name)
    got, ref = res["trained"][name]["records"], res["ref"]
    for g, r in zip(got, ref):
        counts = r["expert_counts"]  # [expert layers, E], the layers in order
        assert sorted(g["expert_load"], key=int) == ["0", "2", "3"]
        for row, layer in zip(counts, sorted(g["expert_load"], key=int)):
            want = (row / row.sum()).tolist()
            slack = 1.5 / float(row.sum())  # one assignment moving between two experts
            assert all(abs(a - b) <= slack for a, b in zip(g["expert_load"][layer], want)), (g["step"], layer)
            assert g["expert_load_max_over_mean"][layer] == pytest.approx(max(g["expert_load"][layer]) * 4, rel=1e-5)
        assert g["expert_load_worst"] == max(g["expert_load_max_over_mean"].values())


@pytest.mark.parametrize("name", ["ep2", "tp2_sp_ep2"])
def test_moe_expert_parallel_run_equals_ep1(reference_runs, name):
    """EP=2 (and TP=2+SP x EP=2) trains the same model as EP=1: every step's metrics within the
    reference tolerance, the same expert load (one assignment may flip on a near-tie), and final
    weights within the dense runs' weight tolerance (the experts' outputs, and at TP=2 the attention,
    are summed in another order; eight Adam steps amplify that round-off)."""
    got, want = reference_runs["moe"][name]["records"], reference_runs["moe"]["ep1"]["records"]
    assert [g["step"] for g in got] == [w["step"] for w in want]
    worst = _relative_errors(got, want, MOE_METRICS + ("expert_load_worst",))
    assert all(v <= METRIC_RTOL for v in worst.values()), f"{name}: {worst}"
    rows = TRAINING["mini_batch_size"] * TRAINING["seq_length"] * 2  # routed assignments per layer and step (top 2)
    load = max(abs(a - b) for g, w in zip(got, want) for layer in w["expert_load"]
               for a, b in zip(g["expert_load"][layer], w["expert_load"][layer]))
    assert load <= 1.5 / rows, f"{name}: expert load differs by {load}"
    final, ep1 = reference_runs["final"][f"moe/{name}"], reference_runs["final"]["moe/ep1"]
    diff = max(float((final[k] - v).abs().max()) for k, v in ep1.items())
    assert diff <= WEIGHT_ATOL, f"{name}: final weights differ by {diff:.2e}"


def test_moe_snapshot_routes_as_the_training_pass(reference_runs):
    """With two passes per snapshot the snapshot pass also scores mini-batch 1, and the first step
    of each PSFT global batch trains on exactly the weights the snapshot saw: its ratio is exactly 1
    on every token, so the snapshot (no gradient) and the training pass routed every token alike."""
    records = reference_runs["moe"]["passes2_ep2"]["records"]
    k = TRAINING["global_batch_size"] // TRAINING["mini_batch_size"]
    warmup = MOE_RUNS["passes2_ep2"][3]["sft_warmup_steps"]
    firsts = [r for r in records if r["phase"] == "psft" and (r["step"] - warmup - 1) % (2 * k) == 0]
    assert firsts and all(r["ratio_min"] == r["ratio_max"] == 1.0 for r in firsts)
    later = [r for r in records if r["phase"] == "psft" and r not in firsts]
    assert later and all(r["ratio_max"] != 1.0 for r in later)
