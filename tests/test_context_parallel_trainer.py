"""The trainer under context parallelism, in real gloo processes, against CP=1 on the same packed data.

The tiny run (SFT warm-up, then PSFT with a snapshot pass, held-out evaluation) on packed
rows whose samples mostly have lengths that are not multiples of 2 x CP:

- CP=2 gives the same metrics step by step as CP=1 (loss, entropy, clip fraction, ratio
  range, mean log-prob, gradient norm, lr, token count) and the same held-out scores;
- so do CP=2 x TP=2 with sequence parallelism, the same with the fused output layer + loss, and
  CP=2 x PP=2 x VP=2 (one 4-process launch);
- the model itself at CP=2 gives CP=1's logits, loss and every parameter gradient (summed over the
  CP ranks) on a packed micro-batch of lengths that are not multiples of 2 x CP;
- a CP=2 run stopped after its first step, inside a global batch (the checkpoint holds each
  CP rank's share of the snapshot log-probs of the mini-batch still to run), and relaunched
  equals the uninterrupted CP=2 run bit for bit; the same checkpoint resumed at CP=1
  continues as the CP=1 run does.

PSFT from the first step (no SFT warm-up), so that first step already has a snapshot; the
warm-up phase under CP is in ``test_trainer_reference.py``.

Layouts are compared with each other here; ``test_trainer_reference.py`` compares CP=2 with an
independent float64 trainer. Each launch runs once, on first use, shared by the module's tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from layout_compare import COMPARED, assert_same_curve, train_each
from test_context_parallel import S, _cp2_and_cp1

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe, with_sections

pytestmark = pytest.mark.slow

CP2 = {"context_parallel_size": 2}
FOUR_PROC = {  # run together in one 4-process launch
    "cp2_tp2_sp": {"context_parallel_size": 2, "tensor_model_parallel_size": 2, "sequence_parallel": True},
    "cp2_pp2_vp2": {"context_parallel_size": 2, "pipeline_model_parallel_size": 2,
                    "virtual_pipeline_model_parallel_size": 2},
    "cp2_tp2_sp_fused": {"context_parallel_size": 2, "tensor_model_parallel_size": 2, "sequence_parallel": True},
}
# Runs of FOUR_PROC with a loss section of their own: the fused output layer + loss (loss/fused_head_loss.py)
# on each CP rank's share, against CP=1's unfused run.
FOUR_PROC_LOSS = {"cp2_tp2_sp_fused": {"fused_output_layer": True}}


def _model_then_train(recipes: dict[str, dict]) -> dict[str, Any]:
    """The model at CP=2 and CP=1 on one packed micro-batch (test_context_parallel.py), then the runs."""
    return {"model": _cp2_and_cp1(), **train_each(recipes)}


class Runs:
    """Launches each named group of runs once, on first use."""

    def __init__(self, tmp: Path, base: dict) -> None:
        self.tmp, self.base, self._done = tmp, base, {}

    def recipe(self, name: str, **sections: Any) -> dict:
        r = with_sections(self.base, **sections)
        r["logging"]["run_dir"] = str(self.tmp / name)
        return r

    def get(self, name: str) -> Any:
        """The last rank's results of launch ``name``."""
        return self.ranks(name)[-1]

    def ranks(self, name: str) -> list[Any]:
        if name not in self._done:
            nprocs, fn, kwargs = self._spec(name)
            self._done[name] = run_in_processes(fn, nprocs, kwargs=kwargs, timeout=600)
        return self._done[name]

    def _spec(self, name: str) -> tuple[int, Callable, dict]:
        ckpt = {"save_dir": str(self.tmp / "cp2_ckpt")}
        if name == "cp2":  # uninterrupted; then stopped after step 1 (a time budget) and relaunched
            budget = {"exit_duration_minutes": 1e-9}  # spent at once: stop after the first step
            return 2, _model_then_train, {"recipes": {
                "cp2": self.recipe("cp2", parallel=CP2),
                "stopped": self.recipe("cp2_resume", parallel=CP2, checkpoint=ckpt, training=budget),
                "resumed": self.recipe("cp2_resume", parallel=CP2, checkpoint=ckpt),
            }}
        if name == "cp1":  # the reference; then the step-1 checkpoint of the CP=2 run resumed at CP=1
            self.get("cp2")
            src, dst = self.tmp / "cp2_ckpt", self.tmp / "cp1_ckpt"
            if not dst.exists():
                dst.mkdir()
                shutil.copytree(src / "step_000001", dst / "step_000001")
                (dst / "latest").write_text("step_000001")
            return 1, train_each, {"recipes": {
                "cp1": self.recipe("cp1"),
                "cp1_from_cp2": self.recipe("cp1_from_cp2", checkpoint={"save_dir": str(dst)}),
            }}
        if name == "four":
            return 4, train_each, {"recipes": {n: self.recipe(n, parallel=p, loss=FOUR_PROC_LOSS.get(n, {}))
                                               for n, p in FOUR_PROC.items()}}
        raise KeyError(name)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Runs:
    tmp = tmp_path_factory.mktemp("cp_trainer")
    # 2 steps: one PSFT global batch (k=2: a snapshot pass, then a step on its log-probs); eval after it.
    training = {"train_steps": 2, "sft_warmup_steps": 0, "eval_interval": 2, "eval_rows": 6}
    base = tiny_recipe(tiny_data, tmp / "unused", training=training)
    return Runs(tmp, base)


def _assert_same_eval(got: list[dict], ref: list[dict], what: str) -> None:
    assert [e["step"] for e in got] == [e["step"] for e in ref] == [2], what
    for g, r in zip(got, ref):
        assert g["tokens"] == r["tokens"], what
        for key in ("loss", "entropy", "mean_logp"):
            assert g[key] == pytest.approx(r[key], rel=2e-4), f"{what} eval step {r['step']} {key}"


def test_cp2_matches_cp1_step_by_step(runs):
    ref = runs.get("cp1")["cp1"]
    got = runs.get("cp2")["cp2"]
    assert [r["phase"] for r in ref["records"]] == ["psft"] * 2
    # The snapshot pass moved the ratios (so logp_old of the CP shares was used and lined up).
    assert all(abs(r["ratio_max"] - 1) > 1e-4 for r in ref["records"][1::2])
    assert_same_curve(got["records"], ref["records"], "CP=2")
    _assert_same_eval(got["eval"], ref["eval"], "CP=2")


@pytest.mark.parametrize("name", list(FOUR_PROC))
def test_cp2_with_tp_sp_or_pp_vp_matches_cp1(runs, name):
    ref = runs.get("cp1")["cp1"]
    got = runs.get("four")[name]
    assert_same_curve(got["records"], ref["records"], name)
    _assert_same_eval(got["eval"], ref["eval"], name)


def test_cp2_stopped_inside_a_global_batch_resumes_exactly(runs):
    res = runs.get("cp2")
    stopped, resumed, ref = res["stopped"], res["resumed"], res["cp2"]["records"]
    assert stopped["step"] == 1 and resumed["step"] == 2  # step 1 is the first half of a global batch
    assert [r["step"] for r in resumed["records"]] == [2]
    for g, r in zip(stopped["records"] + resumed["records"], ref):
        for key in COMPARED:
            assert g[key] == r[key], f"step {r['step']} {key}"


def test_cp2_checkpoint_inside_a_global_batch_resumes_at_cp1(runs):
    got = runs.get("cp1")["cp1_from_cp2"]["records"]
    ref = runs.get("cp1")["cp1"]["records"][1:]
    # Step 2 runs on logp_old that CP=2's ranks saved as shares, merged back into rows here.
    assert got[0]["ratio_max"] != 1.0
    assert_same_curve(got, ref, "resumed at CP=1")


def test_model_at_cp2_equals_cp1_logits_loss_and_gradients(runs):
    """Samples of lengths 5, 7, 3, 13, 11, 8, 1, 2, 29 (not multiples of 2 x CP = 4) in rows of 32."""
    ranks = [r["model"] for r in runs.ranks("cp2")]
    ref = ranks[0]["cp1"]  # CP=1 (DP=2): both ranks run the whole micro-batch
    assert ranks[0]["cp2"]["attention"] == "ContextParallelDotProductAttention"
    assert ref["attention"] == "DotProductAttention"
    b = int(ref["row"].max()) + 1
    want = torch.zeros(b, S, ref["logits"].shape[-1])
    want[ref["row"], ref["index"]] = ref["logits"]
    got = torch.full_like(want, float("nan"))
    for r in ranks:
        got[r["cp2"]["row"], r["cp2"]["index"]] = r["cp2"]["logits"]
    assert not got.isnan().any()  # every real token came back from one CP rank
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sum(r["cp2"]["loss"] for r in ranks) == pytest.approx(ref["loss"], rel=1e-5)
    # Each CP rank holds the gradient of its own tokens' loss; DDP sums them over DP x CP.
    for name, g in ref["grads"].items():
        summed = ranks[0]["cp2"]["grads"][name] + ranks[1]["cp2"]["grads"][name]
        torch.testing.assert_close(summed, g, rtol=1e-4, atol=1e-6, msg=name)
