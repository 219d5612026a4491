"""The sft_kl objective (SFT + beta x KL towards the frozen starting weights) through the trainer.

- At TP=1 and TP=2 (+SP) the trainer matches the independent float64 reference trainer
  (tests/reference_trainer.py: a frozen deepcopy of the starting model gives logp_ref) step by
  step and on the final weights, with the tolerances of test_trainer_reference.py.
- The reference model is never updated, never in the optimizer and needs no gradient, while the
  policy moves away from it (after the SFT warm-up the KL term is active: the loss exceeds the NLL).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes

from test_trainer_reference import (
    METRIC_ATOL,
    METRIC_RTOL,
    OPTIMIZER,
    TRAINING,
    VOCAB,
    _convert,
    _export,
    _hf_model,
    _recipe,
    _reference_rows,
)

pytestmark = pytest.mark.slow

KL_BETA = 0.5
RUNS = {"tp1": (1, 2, {}), "tp2_sp": (2, 2, {"tensor_model_parallel_size": 2, "sequence_parallel": True})}
COMPARED = ("loss", "entropy", "mean_logp", "grad_norm", "lr")


def _train_and_watch_reference(recipes: dict[str, dict]) -> dict[str, Any]:
    """Train each recipe; record whether the reference model changed and whether the optimizer holds it."""
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import build_trainer
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed, teardown
    from psft_megatron.training.loop import train

    out = {}
    for name, recipe_dict in recipes.items():
        env = init_distributed()
        recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
        init_model_parallel(recipe.parallel)
        set_seed(recipe.training.seed)
        trainer = build_trainer(recipe, env)
        ref_before = [p.detach().clone() for c in trainer.reference for p in c.parameters()]
        opt_params = {id(p) for g in trainer.bundle.optimizer.param_groups for p in g["params"]}
        result = train(trainer)
        ref_after = [p.detach().clone() for c in trainer.reference for p in c.parameters()]
        out[name] = {
            "records": result.records,
            "checkpoint": str(result.last_checkpoint),
            "reference_unchanged": all(torch.equal(a, b) for a, b in zip(ref_before, ref_after)),
            "reference_in_optimizer": any(id(p) in opt_params for c in trainer.reference for p in c.parameters()),
            "reference_requires_grad": any(p.requires_grad for c in trainer.reference for p in c.parameters()),
            "policy_moved": not all(
                torch.equal(a, b.detach()) for a, b in zip(ref_before, (p for c in trainer.bundle.model for p in c.parameters()))
            ),
        }
        teardown(destroy_process_group=False)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from psft_megatron.data.synthetic import write_tiny_dataset

    from reference_trainer import RefConfig, train

    tmp = tmp_path_factory.mktemp("sft_kl")
    data = write_tiny_dataset(tmp / "data", train=480, eval=8, vocab_size=VOCAB)
    _hf_model(tmp / "hf_init")
    run_in_processes(_convert, 1, kwargs={"hf_dir": str(tmp / "hf_init"), "out": str(tmp / "init")},
                     init_process_group=False)
    recipes = {}
    for name, (_, micro, par) in RUNS.items():
        r = _recipe(data, tmp, name, micro, par)
        r["loss"] = {"name": "sft_kl", "kl_beta": KL_BETA}
        recipes[name] = r
    trained: dict[str, Any] = {}
    for nprocs in sorted({n for n, _, _ in RUNS.values()}):
        group = {name: recipes[name] for name, (n, _, _) in RUNS.items() if n == nprocs}
        trained.update(run_in_processes(_train_and_watch_reference, nprocs, kwargs={"recipes": group},
                                        timeout=600)[-1])
    run_in_processes(_export, 1, kwargs={"ckpts": {n: t["checkpoint"] for n, t in trained.items()},
                                         "root": str(tmp / "final")}, init_process_group=False)
    model = LlamaForCausalLM.from_pretrained(tmp / "hf_init", torch_dtype=torch.float64, attn_implementation="eager")
    o = OPTIMIZER
    cfg = RefConfig(lr=o["lr"], min_lr=o["min_lr"], warmup=o["lr_warmup_steps"], total_steps=TRAINING["train_steps"],
                    weight_decay=o["weight_decay"], betas=(o["adam_beta1"], o["adam_beta2"]), eps=o["adam_eps"],
                    clip_grad=o["clip_grad"], sft_warmup_steps=TRAINING["sft_warmup_steps"], objective="sft_kl",
                    kl_beta=KL_BETA)
    ref = train(model, _reference_rows(recipes["tp1"]), VOCAB, cfg)
    final = {n: LlamaForCausalLM.from_pretrained(tmp / "final" / n, torch_dtype=torch.float64).state_dict()
             for n in RUNS}
    return {"ref": ref, "ref_weights": model.state_dict(), "trained": trained, "final": final}


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
