"""megatron's distributed optimizer on gloo, against megatron's plain optimizer and across layouts.

The tiny recipe, in real processes (``run_in_processes``):

- DP=2 with ``optimizer.use_distributed_optimizer`` gives the plain DP=2 run's metrics at
  every step and its final weights, both DP replicas holding the same weights;
- its optimizer state really is sharded: each DP rank holds main params and Adam moments
  for part of the model, the two parts together cover every element once;
- a DP=2 run stopped after 4 steps (the checkpoint) and built again holds exactly the state
  the stopped one saved: every main param, exp_avg, exp_avg_sq and step, bit for bit; and it
  continues exactly as the uninterrupted run;
- that DP=2 checkpoint resumed at DP=1 holds the same state, reassembled from the two DP
  shards, bit for bit; resumed at DP=1 and at TP=2 (+SP) it continues as the uninterrupted
  DP=2 run within the layout tolerance of tests/test_trainer.py.

The optimizer state is saved in megatron's fully reshardable format (one tensor per
parameter per state, see psft_megatron/checkpoint/train_checkpoint.py), so it loads at any
layout.

Tolerances. Both optimizers apply the same elementwise AdamW to the same DP-averaged
gradients (two ranks' fp32 gradients summed, by reduce-scatter or by all-reduce: a + b either
way), so they differ only through the gradient norm: the plain optimizer sums squares over
whole tensors, the distributed one over each rank's shard and then across ranks. That is fp32
round-off in the norm, and with ``clip_grad`` acting it scales each update by a clip
coefficient off by as much. Measured over the 8 steps: metrics within 4.9e-7 relative (the
ratio extrema; grad_norm 2.0e-7), final weights within 1.2e-7 absolute; the tolerances are ten
times that. A resume at another layout also reorders every matmul's reduction, so it gets
tests/test_trainer.py's layout tolerance (rel 2e-4); measured: 4.8e-7 at DP=1 and TP=2.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe, with_sections

pytestmark = pytest.mark.slow

COMPARED = (
    "loss",
    "entropy",
    "clip_frac",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "mean_logp",
    "grad_norm",
    "lr",
    "tokens",
)
SAME_LAYOUT_RTOL, SAME_LAYOUT_ATOL = 5e-6, 1e-7  # metrics, distributed vs plain optimizer at DP=2
WEIGHT_ATOL = 1.2e-6  # final weights, distributed vs plain optimizer at DP=2
LAYOUT_RTOL, LAYOUT_ATOL = 2e-4, 2e-5  # a resume at another layout (as tests/test_trainer.py)
STOP_AT = 4


# ----------------------------------------------------------------------------- run in the launched ranks


def _built_trainer(recipe_dict: dict) -> Any:
    """What psft_megatron.run.run does before train(): groups, seed, build (and resume)."""
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import build_trainer
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    env = init_distributed()
    init_model_parallel(recipe.parallel)
    set_seed(recipe.training.seed)
    return build_trainer(recipe, env)


def _weights(bundle: Any) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(bundle.model) for n, p in c.named_parameters()}


def _opt_state(bundle: Any) -> dict[str, dict[str, Any]]:
    """Per parameter this rank holds optimizer state for: its main param and Adam state, and
    where that shard starts and ends in the flattened parameter.

    The distributed optimizer maps a model parameter to its shard with megatron's own
    ``_get_model_param_range_map`` and ``_get_main_param_and_optimizer_states``."""
    out: dict[str, dict[str, Any]] = {}
    opts = getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer])
    for i, chunk in enumerate(bundle.model):
        for name, p in chunk.named_parameters():
            for opt in opts:
                if p not in getattr(opt, "model_param_group_index_map", {}):
                    continue
                rng = opt._get_model_param_range_map(p)["param"]
                state = opt._get_main_param_and_optimizer_states(p)
                out[f"{i}.{name}"] = {
                    "range": (rng.start, rng.end),
                    "numel": p.numel(),
                    "tensors": {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)},
                }
    return out


def _static_bytes(bundle: Any) -> dict[str, int]:
    """What this rank holds of weights, gradient buffers (megatron DDP's fp32 main_grad buffers,
    with and without the padding the distributed optimizer's reduce-scatter adds) and Adam's moments."""
    opts = getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer])
    buffers = [b for chunk in bundle.model for b in chunk.buffers]
    return {
        "weights": sum(p.numel() * p.element_size() for c in bundle.model for p in c.parameters()),
        "grads": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
        "grads_unpadded": sum(b.numel_unpadded * b.grad_data.element_size() for b in buffers),
        "optimizer": sum(t.numel() * t.element_size() for o in opts for st in o.optimizer.state.values()
                         for k, t in st.items() if k in ("exp_avg", "exp_avg_sq")),
    }


def _finish(trainer: Any) -> dict:
    from psft_megatron.runtime.distributed import teardown
    from psft_megatron.training.loop import train

    result = train(trainer)
    out = {
        "static": _static_bytes(trainer.bundle),
        "records": result.records,
        "step": result.step,
        "weights": _weights(trainer.bundle),
        "optimizers": sorted(
            {
                type(o).__name__
                for o in getattr(trainer.bundle.optimizer, "chained_optimizers", [trainer.bundle.optimizer])
            }
        ),
    }
    teardown(destroy_process_group=False)  # the next run of this job builds megatron's groups again
    return out


def two_rank_runs(plain: dict, distributed: dict, stopped: dict, resumed: dict, tp2: dict) -> dict:
    """At DP=2: the plain and the distributed optimizer uninterrupted; then the distributed one
    stopped after STOP_AT steps with its state as saved, and built again with its state as
    loaded; then that checkpoint resumed at TP=2 (the same two processes)."""
    out = {"plain": _finish(_built_trainer(plain))}
    trainer = _built_trainer(distributed)
    out["initial_state"] = _opt_state(trainer.bundle)
    out["distributed"] = _finish(trainer)
    trainer = _built_trainer(stopped)
    stop = _finish(trainer)
    stop["saved_state"] = _opt_state(trainer.bundle)  # the checkpoint was written from exactly this state
    out["stopped"] = stop
    trainer = _built_trainer(resumed)
    loaded = _opt_state(trainer.bundle)
    out["resumed"] = _finish(trainer) | {"loaded_state": loaded}
    out["tp2"] = resume_elsewhere(tp2)
    return out


def resume_elsewhere(recipe: dict) -> dict:
    """The DP=2 checkpoint resumed at another layout: the state as loaded, then the continuation."""
    trainer = _built_trainer(recipe)
    loaded = _opt_state(trainer.bundle)
    return _finish(trainer) | {"loaded_state": loaded}


# ----------------------------------------------------------------------------- the test process


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("distopt")
    base = tiny_recipe(tiny_data, tmp / "unused", training={"train_steps": 8})

    def recipe(name: str, distributed: bool = True, save: str | None = None, **sections: Any) -> dict:
        ckpt = {"save_dir": str(tmp / save)} if save else {}
        r = with_sections(base, optimizer={"use_distributed_optimizer": distributed}, checkpoint=ckpt, **sections)
        r["logging"]["run_dir"] = str(tmp / name)
        return r

    # Every resume reads the step-4 checkpoint in "ckpt": no run saves (save_at_end is off).
    tp2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    two = run_in_processes(
        two_rank_runs,
        2,
        timeout=500,
        kwargs={
            "plain": recipe("plain", distributed=False),
            "distributed": recipe("distributed"),
            "stopped": recipe("resume", save="ckpt", training={"exit_after_steps": STOP_AT}),
            "resumed": recipe("resume_dp2", save="ckpt"),
            "tp2": recipe("resume_tp2", save="ckpt", parallel=tp2),
        },
    )
    dp1 = run_in_processes(resume_elsewhere, 1, timeout=300, kwargs={"recipe": recipe("resume_dp1", save="ckpt")})
    assert sorted(p.name for p in (tmp / "ckpt").iterdir()) == ["latest", f"step_{STOP_AT:06d}"]
    return {"dp2": two, "tp2": [r["tp2"] for r in two], "dp1": dp1}


def test_plan_counts_weights_grads_and_optimizer_state_exactly(runs, tiny_data, tmp_path):
    """The plan's weights, gradients and optimizer state against what megatron allocated on each rank:
    plain optimizer (8 bytes of Adam per parameter) and distributed (8/DP, the DP ranks together hold
    every parameter's state once), at DP=2 and TP=2 (+SP)."""
    from psft_megatron.plan import GPUS, plan_recipe
    from psft_megatron.recipe import recipe_from_dict

    def planned(distributed: bool, **parallel: Any) -> dict[str, float]:
        r = with_sections(tiny_recipe(tiny_data, tmp_path, training={"train_steps": 8}),
                          optimizer={"use_distributed_optimizer": distributed}, parallel=parallel)
        stage = plan_recipe(recipe_from_dict(r), 2, GPUS["h100-80gb"], device="cpu").stages[0]
        weights, grads, optimizer = (t.bytes for t in stage.static)
        return {"weights": weights, "grads": grads, "optimizer": optimizer}

    plain, dist = planned(False), planned(True)
    for rank in runs["dp2"]:
        got = rank["plain"]["static"]
        assert (got["weights"], got["grads"], got["optimizer"]) == (plain["weights"], plain["grads"],
                                                                    plain["optimizer"])
        got = rank["distributed"]["static"]
        assert got["weights"] == dist["weights"] and got["grads_unpadded"] == dist["grads"]
        assert dist["grads"] <= got["grads"] <= dist["grads"] * 1.01  # reduce-scatter padding only
    total = sum(r["distributed"]["static"]["optimizer"] for r in runs["dp2"])
    assert total == 2 * dist["optimizer"] == plain["optimizer"]  # 8 bytes per parameter over 2 ranks
    assert all(0 < r["distributed"]["static"]["optimizer"] < plain["optimizer"] for r in runs["dp2"])
    tp2 = planned(True, tensor_model_parallel_size=2, sequence_parallel=True)
    for rank in runs["tp2"]:
        got = rank["static"]
        assert got["weights"] == tp2["weights"] and got["grads_unpadded"] == tp2["grads"]
        assert got["optimizer"] == tp2["optimizer"]  # TP=2 x DP=1: one rank holds its TP shard's state


def _assert_same_curve(got: list[dict], ref: list[dict], rtol: float, atol: float, what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref], what
    for g, r in zip(got, ref):
        for key in COMPARED:
            assert g[key] == pytest.approx(r[key], rel=rtol, abs=atol), (
                f"{what} step {r['step']} {key}: {g[key]} vs {r[key]}"
            )


def _assert_states_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for name, w in want.items():
        g = got[name]
        assert g["range"] == w["range"], f"{what} {name}"
        assert sorted(g["tensors"]) == sorted(w["tensors"]) == ["exp_avg", "exp_avg_sq", "param", "step"], name
        for key, t in w["tensors"].items():
            assert torch.equal(g["tensors"][key], t), (
                f"{what} {name} {key}: max diff {(g['tensors'][key] - t).abs().max()}"
            )


def _full_state(shards: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Each parameter's flattened optimizer state put together from the DP ranks' shards;
    every element must come from exactly one rank."""
    full: dict[str, dict[str, torch.Tensor]] = {}
    filled: dict[str, torch.Tensor] = {}
    for rank_state in shards:
        for name, s in rank_state.items():
            start, end = s["range"]
            if name not in full:
                full[name] = {k: torch.full((s["numel"],), float("nan")) for k in ("param", "exp_avg", "exp_avg_sq")}
                filled[name] = torch.zeros(s["numel"], dtype=torch.int)
            for k in full[name]:
                full[name][k][start:end] = s["tensors"][k]
            filled[name][start:end] += 1
    for name, f in filled.items():
        assert torch.all(f == 1), f"{name}: DP shards cover elements {f.tolist()} times, not once"
    return full


def test_distributed_optimizer_equals_plain_optimizer_at_dp2(runs):
    plain, dist = runs["dp2"][-1]["plain"], runs["dp2"][-1]["distributed"]
    assert dist["optimizers"] == ["DistributedOptimizer"] and plain["optimizers"] == ["FP32Optimizer"]
    assert [r["step"] for r in dist["records"]] == list(range(1, 9))
    _assert_same_curve(dist["records"], plain["records"], SAME_LAYOUT_RTOL, SAME_LAYOUT_ATOL, "distributed vs plain")
    for rank in runs["dp2"]:  # both replicas: the distributed optimizer all-gathers the updated shards
        for name, w in rank["plain"]["weights"].items():
            d = rank["distributed"]["weights"][name]
            assert torch.allclose(d, w, rtol=0, atol=WEIGHT_ATOL), f"{name}: max diff {(d - w).abs().max()}"
    w0, w1 = runs["dp2"][0]["distributed"]["weights"], runs["dp2"][1]["distributed"]["weights"]
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    # The weights moved: equal final weights are not two untouched copies of the init.
    initial = _full_state([r["initial_state"] for r in runs["dp2"]])
    assert all(not torch.equal(initial[n]["param"], w0[n].reshape(-1)) for n in w0)
    # Before the first step: torch AdamW's own fresh state (step 0, zero moments), on every rank.
    for r in runs["dp2"]:
        for s in r["initial_state"].values():
            t = s["tensors"]
            assert float(t["step"]) == 0 and not t["exp_avg"].any() and not t["exp_avg_sq"].any()


def test_optimizer_state_is_sharded_over_dp(runs):
    states = [r["stopped"]["saved_state"] for r in runs["dp2"]]
    numel = {n: s["numel"] for st in states for n, s in st.items()}
    held = [sum(s["range"][1] - s["range"][0] for s in st.values()) for st in states]
    total = sum(numel.values())
    assert len(numel) == len(runs["dp2"][0]["distributed"]["weights"])  # every parameter has state somewhere
    assert sum(held) == total and all(0 < h < total for h in held), (held, total)
    full = _full_state(states)  # each element on exactly one rank
    # The fp32 main params are the weights themselves (no separate master copy in fp32).
    weights = runs["dp2"][0]["stopped"]["weights"]
    assert all(torch.equal(full[n]["param"], weights[n].reshape(-1)) for n in weights)


def test_sharded_state_round_trips_at_the_same_layout(runs):
    for rank in runs["dp2"]:
        saved, loaded = rank["stopped"]["saved_state"], rank["resumed"]["loaded_state"]
        _assert_states_equal(loaded, saved, "DP=2 rank state loaded vs saved")
        assert all(float(s["tensors"]["step"]) == STOP_AT for s in loaded.values())
        assert all(s["tensors"]["exp_avg_sq"].any() for s in loaded.values())  # trained state, not a fresh one


def test_stop_and_resume_at_dp2_equals_uninterrupted(runs):
    out = runs["dp2"][-1]
    assert out["stopped"]["step"] == STOP_AT and out["resumed"]["step"] == 8
    for g, r in zip(out["stopped"]["records"] + out["resumed"]["records"], out["distributed"]["records"]):
        for key in COMPARED:
            assert g[key] == r[key], f"step {r['step']} {key}"


def test_dp2_checkpoint_loads_at_dp1_as_the_shards_put_together(runs):
    saved = _full_state([r["stopped"]["saved_state"] for r in runs["dp2"]])
    loaded = runs["dp1"][0]["loaded_state"]
    assert sorted(loaded) == sorted(saved)
    for name, s in loaded.items():
        assert s["range"] == (0, s["numel"]), name  # DP=1: one rank holds all of it
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s["tensors"][key].reshape(-1), saved[name][key]), f"{name} {key}"
        assert float(s["tensors"]["step"]) == STOP_AT


@pytest.mark.parametrize("layout", ["dp1", "tp2"])
def test_dp2_checkpoint_resumed_at_other_layout_continues_the_run(runs, layout):
    got = runs[layout][-1]
    assert got["optimizers"] == ["DistributedOptimizer"]
    ref = runs["dp2"][-1]["distributed"]["records"][STOP_AT:]
    _assert_same_curve(got["records"], ref, LAYOUT_RTOL, LAYOUT_ATOL, f"resumed at {layout}")
