"""What the layout-comparison trainer tests share (tests/test_trainer.py, tests/test_context_parallel_trainer.py):
training recipes inside a launched rank, and comparing two runs' per-step records."""

from __future__ import annotations

import copy
from typing import Any

import pytest

# Everything a layout change must not change (compared at fp32 tolerances).
COMPARED = ("loss", "entropy", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "mean_logp", "grad_norm", "lr",
            "tokens")


def train_one(recipe_dict: dict) -> dict[str, Any]:
    """One run (in a launched rank): its train records, eval records and last step on this rank."""
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run

    result = run(recipe_from_dict(copy.deepcopy(recipe_dict)))
    return {"records": result.records, "eval": result.eval_records, "step": result.step}


def train_each(recipes: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Several runs, one after the other, in one launch (start-up and megatron's import cost more than they)."""
    return {name: train_one(recipe) for name, recipe in recipes.items()}


def assert_same_curve(got: list[dict], ref: list[dict], what: str) -> None:
    """The same steps, phases and COMPARED values (rel 2e-4, abs 2e-5) in two runs' train records."""
    assert [r["step"] for r in got] == [r["step"] for r in ref], what
    for g, r in zip(got, ref):
        assert g["phase"] == r["phase"], f"{what} step {r['step']}"
        for key in COMPARED:
            assert g[key] == pytest.approx(r[key], rel=2e-4, abs=2e-5), f"{what} step {r['step']} {key}: {g[key]} vs {r[key]}"
