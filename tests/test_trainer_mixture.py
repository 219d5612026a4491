"""A weighted mixture through the trainer, in real processes (DP=2 on gloo): each step's response
tokens per source (``tokens/NAME`` in metrics.jsonl) add up to the loss's own token count, a run
stopped and relaunched continues the same stream bit for bit, and the per-source totals the
checkpoint carries continue across the relaunch.

One launch trains all three runs (process start-up costs more than these runs)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from psft_megatron.data.synthetic import make_sample
from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe

pytestmark = pytest.mark.slow

NAMES = ("arith", "worded")
STEPS = 8


def _runs(recipes: dict[str, dict]) -> dict[str, dict]:
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run

    out = {}
    for name, r in recipes.items():
        result = run(recipe_from_dict(copy.deepcopy(r)))
        out[name] = {"records": result.records, "step": result.step}
    return out


def _second_source(path: Path, n: int = 160) -> Path:
    """Longer samples than the tiny set's (a worded answer), so the two sources pack differently."""
    rng = random.Random(5)
    with open(path, "w") as f:
        for _ in range(n):
            s = make_sample(rng)
            s["response"] = "Let us see. " + s["response"] + " Done."
            f.write(json.dumps(s) + "\n")
    return path


@pytest.fixture(scope="module")
def mixture(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixture")
    second = _second_source(tmp / "worded.jsonl")

    def recipe(run_dir: Path, **training) -> dict:
        r = tiny_recipe(tiny_data, run_dir, training={"train_steps": STEPS, **training},
                        parallel={}, checkpoint={"save_dir": str(run_dir / "ckpt")})
        first = r["data"]["train"][0]
        r["data"]["train"] = [
            {**first, "name": NAMES[0], "weight": 0.7},
            {"path": str(second), "adapter": "generic", "max_length": 64, "name": NAMES[1], "weight": 0.3},
        ]
        r["data"]["cache_dir"] = str(tmp / "cache")
        return r

    recipes = {
        "whole": recipe(tmp / "whole"),
        "stopped": recipe(tmp / "resumed", exit_after_steps=4),
        "resumed": recipe(tmp / "resumed"),
    }
    recipes["resumed"]["checkpoint"]["save_at_end"] = True
    out = run_in_processes(_runs, 2, kwargs={"recipes": recipes}, timeout=500)[-1]
    return {"tmp": tmp, **out}


def test_every_step_counts_its_response_tokens_per_source(mixture):
    recs = mixture["whole"]["records"]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    for r in recs:
        by_source = [r[f"tokens/{n}"] for n in NAMES]
        # The loader's per-source counts against the loss's own count of masked tokens.
        assert sum(by_source) == r["tokens"] and all(n >= 0 for n in by_source)
    totals = [sum(r[f"tokens/{n}"] for r in recs) for n in NAMES]
    assert all(t > 0 for t in totals)
    lines = [json.loads(x) for x in (mixture["tmp"] / "whole" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "split" not in x]
    assert [{k: x[k] for k in x if k.startswith("tokens/")} for x in train] == \
        [{k: r[k] for k in r if k.startswith("tokens/")} for r in recs]


def test_stopped_and_relaunched_mixture_continues_the_same_stream(mixture):
    whole = mixture["whole"]["records"]
    stopped, resumed = mixture["stopped"], mixture["resumed"]
    assert stopped["step"] == 4 and resumed["step"] == STEPS
    got = stopped["records"] + resumed["records"]
    assert [r["step"] for r in got] == [r["step"] for r in whole]
    for g, w in zip(got, whole):  # same layout: bit for bit
        for key in ("loss", "entropy", "mean_logp", "grad_norm", "tokens", *(f"tokens/{n}" for n in NAMES)):
            assert g[key] == w[key], (w["step"], key)
    # The per-source totals the checkpoint carries continued across the relaunch.
    ckpt = mixture["tmp"] / "resumed" / "ckpt"
    state = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "train_state.json").read_text())
    assert state["progress"]["source_tokens"] == {n: sum(r[f"tokens/{n}"] for r in whole) for n in NAMES}
    assert state["data"]["mixture"]["names"] == list(NAMES)
