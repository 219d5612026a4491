"""Mixture of experts beyond the float64 reference (tests/test_trainer_reference.py covers training).

Up front, no processes: the layout rules between DP, EP, expert TP, TP and CP, and the MoE fields,
refused by the recipe check with the file, line and field and what to change.

One 1-process launch (the tiny Qwen3-MoE, local spec, fp32, EP=1):

- the activations a forward keeps for backward, measured by torch's profiler, against the plan's
  count (``psft_megatron.plan.moe``) within 20%, as tests/test_recompute.py checks the dense ones;
- activation recompute (full, uniform, one layer) re-runs every router inside backward: the
  expert load and load-balancing loss logged per step equal the run without recompute (no
  double count), and so do the gradients' effect (the metrics).

One 2-process launch: ``recipes/tiny_moe_cpu.yaml`` itself (EP=2, the allgather dispatcher on gloo)
for a few PSFT steps with TensorBoard on, and the same recipe at EP=1 (DP=2): the two runs log the
same metrics; metrics.jsonl and TensorBoard carry each expert layer's load; and with the
distributed optimizer at EP=2 the plan's weights, gradients and optimizer state equal what megatron
allocated on each rank (the experts' state unsharded: expert DP is 1; the dense state over DP=2).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from activation_memory import nll_step, packed_micro_batch, profiled_memory

from psft_megatron.config.load import ConfigError
from psft_megatron.recipe import load_recipe
from psft_megatron.testing.multiproc import run_in_processes

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_moe_cpu.yaml"

# ----------------------------------------------------------------------------- up-front checks

CONSTRAINTS = {  # override(s) -> (world size, the message's field and text)
    ("parallel.expert_model_parallel_size=3",): (
        6, r"parallel.expert_model_parallel_size \(3\) must divide model.num_experts \(8\).*use one of \[1, 2, 4, 8\]"),
    ("parallel.expert_model_parallel_size=4",): (
        2, r"parallel.expert_model_parallel_size \(4\) x expert_tensor_parallel_size \(1\) must divide the 2 ranks of a "
           r"pipeline stage"),
    # Expert TP counts too: EP 2 divides the 2 ranks, EP x expert TP (2 x 2) does not.
    ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "parallel.expert_tensor_parallel_size=2"): (
        2, r"parallel.expert_model_parallel_size \(2\) x expert_tensor_parallel_size \(2\) must divide the 2 ranks"),
    ("parallel.tensor_model_parallel_size=2",): (
        4, r"parallel.sequence_parallel must be true with a mixture-of-experts model at tensor_model_parallel_size 2"),
    ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "parallel.expert_tensor_parallel_size=3"): (
        4, r"parallel.expert_tensor_parallel_size \(3\) must divide model.moe_ffn_hidden_size \(64\)"),
    ("model.moe_router_topk=9",): (2, r"model.moe_router_topk \(9\) must be between 1 and model.num_experts \(8\)"),
    ("model.moe_dense_layers=[1,4]",): (2, r"model.moe_dense_layers \(\[1, 4\]\) must list distinct layer indices in "
                                          r"0..3; \[4\] are outside"),
    ("model.moe_dense_layers=[0,1,2,3]",): (2, r"model.moe_dense_layers lists every layer: no layer would have experts"),
    ("model.num_experts=null", "model.moe_ffn_hidden_size=null", "model.moe_dense_layers=[]"): (
        2, r"parallel.expert_model_parallel_size \(EP 2, expert TP 1\) needs a mixture-of-experts model"),
    ("model.moe_router_topk=1",): (2, r"model.moe_norm_topk_prob with moe_router_topk 1 would give every token weight 1"),
}


@pytest.mark.parametrize("overrides", list(CONSTRAINTS), ids=lambda o: " ".join(o))
def test_moe_layout_rules_are_checked_up_front(overrides):
    world, message = CONSTRAINTS[overrides]
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(RECIPE, list(overrides), world_size=world)
    # One line, starting where the field is set: the override, or the recipe's line of its section.
    assert re.match(rf"(command-line override|{re.escape(str(RECIPE))}:\d+): ", str(e.value)) and "\n" not in str(e.value)


def test_the_tiny_moe_recipe_is_valid_at_ep2_and_ep1():
    r = load_recipe(RECIPE, world_size=2)
    assert r.resolved_model.is_moe and r.parallel.expert_model_parallel_size == 2
    load_recipe(RECIPE, ["parallel.expert_model_parallel_size=1"], world_size=2)
    load_recipe(RECIPE, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                         "parallel.expert_tensor_parallel_size=1"], world_size=2)  # TP=2+SP, EP=2 over the TP ranks


def test_alltoall_dispatcher_needs_cuda():
    r = load_recipe(RECIPE, ["parallel.moe_token_dispatcher=alltoall"], world_size=2)
    r.validate_for_device(has_cuda=True)
    with pytest.raises(ConfigError, match=r"parallel.moe_token_dispatcher: alltoall needs CUDA.*use allgather on CPU"):
        r.validate_for_device(has_cuda=False)


# ----------------------------------------------------------------------------- one process

SEQ, ROWS = 256, 2


def _model_fields(dense: bool = False) -> dict[str, Any]:
    """The recipe's model at SEQ; ``dense``: its twin with a dense MLP in every layer."""
    model = dict(yaml.safe_load(RECIPE.read_text())["model"], max_position_embeddings=SEQ, transformer_impl="local")
    if dense:
        model.update(num_experts=None, moe_ffn_hidden_size=None, moe_dense_layers=[], moe_aux_loss_coeff=None)
    return model


def _measure_activations(dense: bool = False) -> float:
    from psft_megatron.model.build import build_model
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.model.init import init_layout_independent
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    init_distributed()
    init_model_parallel(ParallelConfig())
    set_seed(3)
    built = build_model(ModelConfig(**_model_fields(dense)), ParallelConfig())
    init_layout_independent(built.chunks, 3)
    chunk = built.chunks[0]
    mb = packed_micro_batch(SEQ)

    step = nll_step(chunk, mb)
    step()  # warm-up: gradients exist before the measured step
    for p in chunk.parameters():
        p.grad = None
    return profiled_memory(step)[0]

def _train(recipes: dict[str, dict]) -> dict[str, Any]:
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
        out[name] = {"records": train(trainer).records, "static": _static_bytes(trainer.bundle)}
        teardown(destroy_process_group=False)
    return out


def _static_bytes(bundle: Any) -> dict[str, int]:
    """This rank's weights, unpadded fp32 gradient buffers and Adam moments."""
    opts = getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer])
    buffers = [b for chunk in bundle.model for b in chunk.buffers + chunk.expert_parallel_buffers]
    return {
        "weights": sum(p.numel() * p.element_size() for c in bundle.model for p in c.parameters()),
        "tensors": sum(1 for c in bundle.model for _ in c.parameters()),
        "grads": sum(b.numel_unpadded * b.grad_data.element_size() for b in buffers),
        "optimizer": sum(t.numel() * t.element_size() for o in opts for st in o.optimizer.state.values()
                         for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")),
    }


def _one_process(recipes: dict[str, dict]) -> dict[str, Any]:
    out = _train(recipes)
    out["kept"] = {"moe": _measure_activations(), "dense": _measure_activations(dense=True)}
    return out


def _recipe_dict(tiny_data: Path, run_dir: Path, *overrides: str) -> dict:
    """recipes/tiny_moe_cpu.yaml on the tests' tiny data, 12 steps (4 of SFT, 8 of PSFT), as a dict."""
    data = {"data.train[0].path": tiny_data / "train.jsonl", "data.eval[0].path": tiny_data / "eval.jsonl",
            "data.tokenizer": tiny_data / "tokenizer", "data.cache_dir": tiny_data / "cache",
            "logging.run_dir": run_dir, "training.train_steps": 12, "training.sft_warmup_steps": 4,
            "training.eval_interval": 0, "checkpoint.save_interval": 0, "logging.progress_bar": "false"}
    r = load_recipe(RECIPE, [f"{k}={v}" for k, v in data.items()] + list(overrides))
    return r.to_dict()


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("moe1")
    single = ("parallel.expert_model_parallel_size=1",)
    recipes = {
        "plain": _recipe_dict(tiny_data, tmp / "plain", *single, "logging.tensorboard=false"),
        "recompute": _recipe_dict(tiny_data, tmp / "recompute", *single, "logging.tensorboard=false",
                                  "model.recompute_granularity=full", "model.recompute_method=uniform",
                                  "model.recompute_num_layers=1"),
    }
    return run_in_processes(_one_process, 1, kwargs={"recipes": recipes}, timeout=600)[0]


def _planned_kept(dense: bool) -> float:
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.plan import Shape, kernels_for, stage_activations

    m = ModelConfig(**_model_fields(dense))
    sh = Shape(seq=SEQ, micro=ROWS, act_bytes=4)
    return stage_activations(m, kernels_for("local", 4), sh, m.num_layers, first=True, last=True,
                             expert_layers=len(m.moe_layers))["kept"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["moe", "dense"])
def test_activations_as_planned(one_process, model):
    """The plan's chunk activations (the MoE model: dense layer 0, expert layers 1-3; its dense twin)
    plus this test's own head (the logits and their log-softmax: 2 x tokens x vocab x fp32)."""
    want = _planned_kept(model == "dense") + 2 * SEQ * ROWS * _model_fields()["vocab_size"] * 4
    got = one_process["kept"][model]
    assert got == pytest.approx(want, rel=0.2), f"{model}: {got / 1e6:.3f} MB kept, the plan says {want / 1e6:.3f} MB"


@pytest.mark.slow
def test_expert_layers_change_activations_as_planned(one_process):
    """Experts in place of the dense MLP in three layers (routed rows, expert intermediates, router)
    change the activations by what the plan's expert terms say, within 20%."""
    want = _planned_kept(False) - _planned_kept(True)
    got = one_process["kept"]["moe"] - one_process["kept"]["dense"]
    assert got == pytest.approx(want, rel=0.2), f"{got / 1e6:.3f} MB measured, the plan says {want / 1e6:.3f} MB"


@pytest.mark.slow
def test_recompute_counts_each_routed_token_once(one_process):
    plain, recompute = one_process["plain"]["records"], one_process["recompute"]["records"]
    assert [r["step"] for r in recompute] == [r["step"] for r in plain] and len(plain) == 12
    for a, b in zip(plain, recompute):
        assert a["expert_load"] == b["expert_load"], a["step"]
        assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], rel=1e-6), a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


# ----------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def two_processes(tiny_data, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("moe2")
    recipes = {
        "ep2": _recipe_dict(tiny_data, tmp / "ep2", "logging.tensorboard=true"),
        "ep1": _recipe_dict(tiny_data, tmp / "ep1", "parallel.expert_model_parallel_size=1",
                            "logging.tensorboard=false"),
        "ep2_distributed": _recipe_dict(tiny_data, tmp / "ep2_distributed", "logging.tensorboard=false",
                                        "optimizer.use_distributed_optimizer=true", "training.train_steps=4",
                                        "training.sft_warmup_steps=4"),
    }
    ranks = run_in_processes(_train, 2, kwargs={"recipes": recipes}, timeout=600)
    return {"ranks": ranks, "recipes": recipes, "run_dir": tmp}


@pytest.mark.slow
def test_tiny_moe_recipe_trains_psft_at_ep2_as_at_ep1(two_processes):
    got, want = two_processes["ranks"][-1]["ep2"]["records"], two_processes["ranks"][-1]["ep1"]["records"]
    assert [r["phase"] for r in got] == ["sft"] * 4 + ["psft"] * 8
    assert max(r["clip_frac"] for r in got) > 0 and got[-1]["mean_logp"] > got[0]["mean_logp"]
    for g, w in zip(got, want):
        for key in ("loss", "entropy", "mean_logp", "clip_frac", "ratio_min", "ratio_max", "grad_norm", "moe_aux_loss",
                    "expert_load_worst"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), (g["step"], key)


@pytest.mark.slow
def test_expert_load_in_metrics_and_tensorboard(two_processes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = two_processes["run_dir"] / "ep2"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 12
    layers = ["1", "2", "3"]  # layer 0 keeps its dense MLP
    for r in records:
        assert sorted(r["expert_load"]) == layers and sorted(r["expert_load_max_over_mean"]) == layers
        for layer in layers:
            shares = r["expert_load"][layer]
            assert len(shares) == 8 and abs(sum(shares) - 1) < 1e-4 and min(shares) >= 0
            assert r["expert_load_max_over_mean"][layer] == pytest.approx(8 * max(shares), rel=1e-5)
        assert r["expert_load_worst"] == max(r["expert_load_max_over_mean"].values())
        assert r["moe_aux_loss"] > 0
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for layer in layers:
        scalars = acc.Scalars(f"train/expert_load_max_over_mean/layer_{int(layer):03d}")
        assert [e.step for e in scalars] == list(range(1, 13))
        assert [e.value for e in scalars] == pytest.approx([r["expert_load_max_over_mean"][layer] for r in records],
                                                           rel=1e-6)
        assert f"train/expert_load/layer_{int(layer):03d}" in tags["histograms"]
    assert "train/moe_aux_loss" in tags["scalars"] and "train/expert_load_worst" in tags["scalars"]


@pytest.mark.slow
def test_plan_counts_expert_parallel_weights_grads_and_optimizer_exactly(two_processes):
    """EP=2 with the distributed optimizer: each rank holds the dense parameters and 4 of the 8
    experts of each expert layer; the dense Adam state is split over DP=2, the experts' is not
    (expert DP = 2 / EP 2 = 1). The plan's figures (fp32: 4-byte weights and gradients, 8 bytes of
    Adam per parameter) equal megatron's allocation on each rank; the gradient buffers also align
    each parameter's start to 64 elements for the distributed optimizer (here the 32-element q/k
    norms: 256 elements in all), which the plan leaves out."""
    from psft_megatron.plan import GPUS, plan_recipe
    from psft_megatron.recipe import recipe_from_dict

    recipe = recipe_from_dict(copy.deepcopy(two_processes["recipes"]["ep2_distributed"]))
    plan = plan_recipe(recipe, 2, GPUS["h100-80gb"], device="cpu")
    weights, grads, optimizer = (t.bytes for t in plan.stages[0].static)
    assert plan.edp == 1 and plan.ep == 2
    totals = 0
    for rank in two_processes["ranks"]:
        got = rank["ep2_distributed"]["static"]
        assert got["weights"] == weights
        assert 0 <= got["grads"] - grads < 64 * 4 * got["tensors"], (got["grads"], grads)
        totals += got["optimizer"]
    # The DP ranks together hold the dense state once and each its own experts' state in full.
    assert totals == 2 * optimizer
