"""The trainer end to end, in real processes on gloo, layouts compared with each other.

- The same tiny run gives the same metrics at TP=1, PP=2 x VP=2 (with the fused output layer +
  loss), TP=2 x PP=2 (+SP) and PP=4, every layout starting from one saved initial model. (TP=2+SP, PP=2 and DP=2 are
  compared with an independent float64 reference in ``test_trainer_reference.py``.)
- PSFT with one mini-batch per global batch is SFT, step by step; DFT runs through the loop.
- A run stopped (exit_after_steps) and relaunched equals an uninterrupted run; the
  checkpoint resumed at TP=2 gives the same next steps.
- Every field of metrics.jsonl is there; the snapshot pass makes ratios move off 1.
- The fused output layer + loss (``loss.fused_output_layer``) gives the same 16-step run at TP=1
  and TP=2+SP as megatron's output layer and the separate loss.

Each run is launched the first time a test asks for it and shared by the module's tests
after that; runs that one test compares share a launch (``SHARED_LAUNCHES``): ``-k pp4``
pays for the TP=1 reference and the four-process launch (TP=2 x PP=2 + SP, then PP=4) alone.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
from layout_compare import COMPARED, assert_same_curve, train_each, train_one

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe, with_sections

pytestmark = pytest.mark.slow

def _train_stopped_then_resumed(stopped: dict, resumed: dict) -> dict:
    """A launch that stops after 4 steps, then a second run of the same recipe in the same job."""
    return {"stopped": train_one(stopped), "resumed": train_one(resumed)}


def _save_initial_model(recipe_dict: dict, out: str) -> None:
    """The common starting point of every layout: a random model saved at TP=1."""
    from psft_megatron.checkpoint.model_checkpoint import save_model_checkpoint
    from psft_megatron.model.build import build_model
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    init_distributed()
    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    init_model_parallel(recipe.parallel)
    set_seed(123)
    built = build_model(recipe.model, recipe.parallel)
    save_model_checkpoint(built.chunks, out, {"model": recipe.model.resolve(), "step": 0})


# Runs trained in one launch: process start-up and megatron's import cost more than these runs.
SHARED_LAUNCHES = (("psft_k1", "sft_k1"), ("unfused_16", "fused_16"), ("tp2pp2_sp", "pp4"))


class Runs:
    """Launches each named run once, on first use; results from the logging (last) rank."""

    def __init__(self, tmp: Path, base: dict) -> None:
        self.tmp, self.base, self._done = tmp, base, {}
        self.ckpt = {"init_from": str(tmp / "init"), "allow_random_init": False, "save_at_end": False}
        self._init_saved = False

    def recipe(self, name: str, **sections: Any) -> dict:
        sections["checkpoint"] = {**self.ckpt, **sections.get("checkpoint", {})}
        r = with_sections(self.base, **sections)
        r["logging"]["run_dir"] = str(self.tmp / name)
        return r

    def get(self, name: str) -> Any:
        if name not in self._done:
            if not self._init_saved:
                run_in_processes(_save_initial_model, 1, kwargs={"recipe_dict": self.base, "out": str(self.tmp / "init")})
                self._init_saved = True
            group = next((g for g in SHARED_LAUNCHES if name in g), (name,))
            if len(group) == 1:
                nprocs, fn, kwargs = self._spec(name)
                self._done[name] = run_in_processes(fn, nprocs, kwargs=kwargs, timeout=400)[-1]
            else:  # runs that one test (or one parametrized test) compares: one launch, one start-up
                specs = {n: self._spec(n) for n in group}
                (nprocs,) = {n for n, _, _ in specs.values()}
                recipes = {n: kw["recipe_dict"] for n, (_, _, kw) in specs.items()}
                self._done.update(run_in_processes(train_each, nprocs, kwargs={"recipes": recipes}, timeout=400)[-1])
        return self._done[name]

    def _spec(self, name: str) -> tuple[int, Callable, dict]:
        one = {"global_batch_size": 4, "mini_batch_size": 4, "train_steps": 6, "sft_warmup_steps": 0}
        layouts = {
            "tp1": (1, {}),
            # The interleaved schedule with the fused output layer + loss (the last virtual stage's chunk
            # writes the output weight's main_grad in its forward): against TP=1's unfused run.
            "pp2_vp2_fused": (2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}),
            "tp2pp2_sp": (4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                              "sequence_parallel": True}),
            # More than 2 stages: the middle stages must keep the packed rows' attention boundaries.
            "pp4": (4, {"pipeline_model_parallel_size": 4}),
        }
        if name in layouts:
            nprocs, parallel = layouts[name]
            sections: dict[str, Any] = {"parallel": parallel}
            if name.endswith("_fused"):
                sections["loss"] = {"fused_output_layer": True}
            return nprocs, train_one, {"recipe_dict": self.recipe(name, **sections)}
        if name in ("unfused_16", "fused_16", "fused_tp2_sp_16"):  # the fused output layer + loss, 16 steps
            sixteen = {"train_steps": 16, "sft_warmup_steps": 4}
            fused = {"fused_output_layer": name != "unfused_16"}
            parallel = {"tensor_model_parallel_size": 2, "sequence_parallel": True} if "tp2" in name else {}
            return (2 if parallel else 1), train_one, {"recipe_dict": self.recipe(name, training=sixteen, loss=fused,
                                                                               parallel=parallel)}
        if name == "psft_k1":  # one mini-batch per global batch: PSFT must equal SFT
            return 1, train_one, {"recipe_dict": self.recipe(name, training=one)}
        if name == "sft_k1":
            return 1, train_one, {"recipe_dict": self.recipe(name, training=one, loss={"name": "sft"})}
        if name == "dft":
            return 1, train_one, {"recipe_dict": self.recipe(name, loss={"name": "dft"},
                                                          training={"train_steps": 4, "sft_warmup_steps": 0})}
        if name == "stop_resume":  # stopped after 4 steps (checkpoint), then resumed to 8: must equal tp1
            ckpt = dict(self.ckpt, save_dir=str(self.tmp / "resume_ckpt"))
            stopped = self.recipe("resume", checkpoint=ckpt, training={"exit_after_steps": 4})
            return 1, _train_stopped_then_resumed, {"stopped": stopped, "resumed": self.recipe("resume", checkpoint=ckpt)}
        if name == "resumed_tp2":  # the step-4 checkpoint of stop_resume, resumed at TP=2: same steps 5..8
            self.get("stop_resume")
            src, dst = self.tmp / "resume_ckpt", self.tmp / "resume_ckpt_tp2"
            if not dst.exists():
                dst.mkdir()
                shutil.copytree(src / "step_000004", dst / "step_000004")
                (dst / "latest").write_text("step_000004")
            parallel = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
            recipe = self.recipe("resume_tp2", checkpoint=dict(self.ckpt, save_dir=str(dst)), parallel=parallel)
            return 2, train_one, {"recipe_dict": recipe}
        raise KeyError(name)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Runs:
    tmp = tmp_path_factory.mktemp("trainer")
    base = tiny_recipe(tiny_data, tmp / "unused", training={"eval_interval": 4, "eval_rows": 6})
    return Runs(tmp, base)


def test_tp1_run_switches_phase_and_snapshot_moves_ratios(runs):
    recs = runs.get("tp1")["records"]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["phase"] for r in recs] == ["sft"] * 2 + ["psft"] * 6
    # The first mini-batch after a snapshot runs on the snapshot weights: ratio exactly 1.
    for r in recs[2::2]:
        assert r["ratio_min"] == pytest.approx(1.0, abs=1e-6) and r["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    # The second one ran after an optimizer step: the ratio has moved.
    assert any(abs(r["ratio_max"] - 1) > 1e-4 or abs(r["ratio_min"] - 1) > 1e-4 for r in recs[3::2])


@pytest.mark.parametrize("layout", ["pp2_vp2_fused", "tp2pp2_sp", "pp4"])
def test_layouts_match_tp1(runs, layout):
    ref = runs.get("tp1")
    got = runs.get(layout)
    assert_same_curve(got["records"], ref["records"], layout)
    assert [e["step"] for e in got["eval"]] == [e["step"] for e in ref["eval"]] == [4, 8]
    for g, r in zip(got["eval"], ref["eval"]):
        assert g["loss"] == pytest.approx(r["loss"], rel=2e-4)


@pytest.mark.parametrize("name", ["fused_16", "fused_tp2_sp_16"])
def test_fused_output_layer_gives_the_same_run(runs, name):
    """loss.fused_output_layer: no logits tensor, same 16 steps (SFT warm-up, PSFT, evaluation)."""
    ref, got = runs.get("unfused_16"), runs.get(name)
    assert_same_curve(got["records"], ref["records"], name)
    assert [e["step"] for e in got["eval"]] == [e["step"] for e in ref["eval"]]
    for g, r in zip(got["eval"], ref["eval"]):
        assert g["loss"] == pytest.approx(r["loss"], rel=2e-4) and g["entropy"] == pytest.approx(r["entropy"], rel=2e-4)


def test_psft_with_one_mini_batch_is_sft(runs):
    psft = runs.get("psft_k1")["records"]
    sft = runs.get("sft_k1")["records"]
    assert [r["phase"] for r in psft] == ["psft"] * 6
    for p, s in zip(psft, sft):
        # PSFT's loss is -ratio = -1 per token (SFT's is -logp), but the update is identical:
        assert p["ratio_min"] == p["ratio_max"] == 1.0
        assert p["clip_frac"] == 0.0
        for key in ("mean_logp", "entropy", "grad_norm", "lr"):
            assert p[key] == pytest.approx(s[key], rel=1e-6, abs=1e-7), key


def test_dft_runs_through_the_same_loop_without_snapshot(runs):
    recs = runs.get("dft")["records"]
    assert [r["phase"] for r in recs] == ["dft"] * 4
    for r in recs:
        assert r["ratio_min"] == r["ratio_max"] == 1.0 and r["clip_frac"] == 0.0  # no logp_old
        # -stopgrad(p) * logp per token: between 0 and 1/e per token, so the mean is too.
        assert 0.0 < r["loss"] <= 1 / 2.718281828 + 1e-9
    tp1_first = runs.get("tp1")["records"][0]
    assert recs[0]["mean_logp"] == pytest.approx(tp1_first["mean_logp"], abs=1e-6)  # same model, same first batch


def test_stop_and_resume_equals_uninterrupted(runs):
    both = runs.get("stop_resume")
    stopped, resumed = both["stopped"], both["resumed"]
    ref = runs.get("tp1")["records"]
    assert stopped["step"] == 4 and resumed["step"] == 8
    assert [r["step"] for r in resumed["records"]] == [5, 6, 7, 8]
    # Same layout: the continuation is bit-for-bit the uninterrupted run.
    for g, r in zip(stopped["records"] + resumed["records"], ref):
        for key in COMPARED:
            assert g[key] == r[key], f"step {r['step']} {key}"
    metrics = [json.loads(l) for l in (runs.tmp / "resume" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "split" not in m] == list(range(1, 9))


def test_checkpoint_resumed_at_other_layout_gives_same_next_steps(runs):
    got = runs.get("resumed_tp2")["records"]
    ref = runs.get("tp1")["records"][4:]
    assert_same_curve(got, ref, "resumed at TP=2")


def test_metrics_jsonl_has_every_field(runs):
    from psft_megatron.training.metrics import TRAIN_FIELDS

    runs.get("tp1")
    lines = (runs.tmp / "tp1" / "metrics.jsonl").read_text().splitlines()
    train = [json.loads(l) for l in lines if "split" not in json.loads(l)]
    evals = [json.loads(l) for l in lines if json.loads(l).get("split") == "eval"]
    assert len(train) == 8 and len(evals) == 2
    for rec in train:
        assert set(TRAIN_FIELDS) <= set(rec)
        assert rec["tokens_per_s"] > 0
    assert (runs.tmp / "tp1" / "config.yaml").is_file()
