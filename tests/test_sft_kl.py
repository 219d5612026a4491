"""The sft_kl objective (SFT + beta x KL towards the frozen starting weights) through the trainer.

- At TP=1 and TP=2 (+SP) the trainer matches the independent float64 reference trainer
  (tests/reference_trainer.py: a frozen deepcopy of the starting model gives logp_ref) step by
  step and on the final weights, with the tolerances of test_trainer_reference.py.
- The reference model is never updated, never in the optimizer and needs no gradient, while the
  policy moves away from it (after the SFT warm-up the KL term is active: the loss exceeds the NLL).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from reference_runs import KL_BETA, SFT_KL_RUNS, VOCAB, reference_rows
from test_trainer_reference import METRIC_ATOL, METRIC_RTOL, reference_config

pytestmark = pytest.mark.slow

RUNS = SFT_KL_RUNS
COMPARED = ("loss", "entropy", "mean_logp", "grad_norm", "lr")


@pytest.fixture(scope="module")
def results(reference_runs) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from reference_trainer import train

    model = LlamaForCausalLM.from_pretrained(reference_runs["hf_init"], dtype=torch.float64, attn_implementation="eager")
    ref = train(model, reference_rows(reference_runs["recipes"]["sft_kl/tp1"]), VOCAB,
                reference_config("sft_kl", kl_beta=KL_BETA))
    final = {name: reference_runs["final"][f"sft_kl/{name}"] for name in RUNS}
    return {"ref": ref, "ref_weights": model.state_dict(), "trained": reference_runs["sft_kl"], "final": final}


@pytest.mark.parametrize("name", list(RUNS))
def test_sft_kl_matches_the_float64_reference(results, name):
    got, ref = results["trained"][name]["records"], results["ref"]
    assert [g["phase"] for g in got] == [r["phase"] for r in ref] == ["sft"] * 2 + ["sft_kl"] * 6
    worst = {}
    for g, r in zip(got, ref):
        for key in COMPARED:
            err = abs(g[key] - r[key]) / max(abs(r[key]), METRIC_ATOL / METRIC_RTOL)
            worst[key] = max(worst.get(key, 0.0), err)
    assert all(v <= METRIC_RTOL for v in worst.values()), f"{name}: {worst}"
    # The KL term is really acting: sft_kl's loss is above the response NLL once the policy moved.
    assert any(g["loss"] > -g["mean_logp"] + 1e-4 for g in got[2:])
    diffs = {k: float((results["final"][name][k] - v).abs().max()) for k, v in results["ref_weights"].items()}
    assert max(diffs.values()) <= 1e-4, max(diffs.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("name", list(RUNS))
def test_the_reference_model_is_frozen(results, name):
    t = results["trained"][name]
    assert t["policy_moved"]
    assert t["reference_unchanged"] and not t["reference_in_optimizer"] and not t["reference_requires_grad"]
