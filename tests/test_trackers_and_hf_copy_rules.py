"""The rules of the experiment trackers and the HF copies, without starting a run (issue #25 parts 1, 2).

The runs themselves (offline W&B, an MLflow file store, real exports that fail and succeed) are in
tests/test_trackers_and_hf_copy.py. Here: a tracker that is not installed is refused up front in
one line; the new fields are checked; which checkpoints get an HF copy; what pruning removes; and
that the metrics writer hands the trackers exactly what it writes to metrics.jsonl, dropping a
tracker that fails without stopping the run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from psft_megatron.checkpoint.hf_copy import HfCopy
from psft_megatron.config.load import ConfigError
from psft_megatron.preflight import preflight
from psft_megatron.recipe import load_recipe
from psft_megatron.testing.recipes import tiny_recipe
from psft_megatron.training.metrics import MetricsWriter


def _recipe_file(tmp_path: Path, tiny_data: Path, **sections: Any) -> Path:
    base = tiny_recipe(tiny_data, tmp_path / "run", **sections)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


@pytest.mark.parametrize("tracker, section", [
    ("wandb", {"project": "p", "mode": "offline"}),
    ("mlflow", {"tracking_uri": "file:./mlruns", "experiment": "e"}),
])
def test_a_tracker_that_is_not_installed_is_refused_up_front_in_one_line(tracker, section, tmp_path, tiny_data,
                                                                         monkeypatch):
    path = _recipe_file(tmp_path, tiny_data, logging={tracker: section})
    recipe = load_recipe(path)
    # None in sys.modules is Python's own "this module cannot be imported" (import raises ImportError).
    monkeypatch.setitem(sys.modules, tracker, None)
    with pytest.raises(ConfigError) as e:
        preflight(recipe)
    message = str(e.value)
    assert "\n" not in message
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(f"{tracker}:"))
    assert message.startswith(f"{path}:{line}: logging.{tracker} is set but {tracker} is not installed")
    assert f'pip install -e ".[{tracker}]"' in message
    # The same recipe without the tracker passes that check (nothing else stops it here).
    recipe.logging.wandb = recipe.logging.mlflow = None
    preflight(recipe)


@pytest.mark.parametrize("override, field", [
    ("checkpoint.save_hf=-1", "checkpoint.save_hf"),
    ("logging.wandb.mode=sometimes", "logging.wandb.mode"),
    ("logging.wandb.project=", "logging.wandb.project"),
    ("logging.mlflow.experiment=", "logging.mlflow.experiment"),
    ("checkpoint.save_hf_dtype=int8", "checkpoint.save_hf_dtype"),
])
def test_bad_tracker_and_hf_copy_fields_are_refused(override, field, tmp_path, tiny_data):
    path = _recipe_file(tmp_path, tiny_data, logging={"wandb": {"project": "p"}, "mlflow": {"experiment": "e"}},
                        checkpoint={"save_interval": 4, "save_hf": 1})
    load_recipe(path)  # valid as written
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_recipe(path, [override])


def test_save_hf_without_any_save_is_refused(tmp_path, tiny_data):
    path = _recipe_file(tmp_path, tiny_data, checkpoint={"save_interval": 0, "save_at_end": False, "save_hf": 1})
    with pytest.raises(ConfigError, match=r"checkpoint\.save_hf is set but no checkpoint is saved"):
        load_recipe(path)


def test_which_checkpoints_get_an_hf_copy():
    """Every ``save_hf``-th interval checkpoint (multiples of save_hf x save_interval) and the final one."""
    every_second = HfCopy(every=2, save_interval=4, folder=None)
    steps = range(4, 41, 4)
    assert [s for s in steps if every_second.wanted(s, final=False)] == [8, 16, 24, 32, 40]
    assert every_second.wanted(38, final=True)  # the run's last step, whatever its number
    every = HfCopy(every=1, save_interval=4, folder=None)
    assert [s for s in steps if every.wanted(s, final=False)] == list(steps)
    assert not HfCopy(every=0, save_interval=4, folder=None).wanted(40, final=True)
    # Only save_at_end: the final checkpoint is the only one.
    assert not HfCopy(every=1, save_interval=0, folder=None).wanted(8, final=False)
    assert HfCopy(every=1, save_interval=0, folder=None).wanted(8, final=True)


@pytest.mark.parametrize("own_folder", [False, True])
def test_pruning_removes_the_hf_copies_whose_checkpoint_is_gone(tmp_path, own_folder):
    save_dir = tmp_path / "checkpoints"
    hf_dir = tmp_path / "hf" if own_folder else save_dir
    for name in ("step_000008", "step_000012"):  # what keep_last left
        (save_dir / name).mkdir(parents=True)
    for name in ("step_000004_hf", "step_000008_hf", "step_000012_hf", "step_000012_hf.partial"):
        (hf_dir / name).mkdir(parents=True)
        (hf_dir / name / "config.json").write_text("{}")
    copies = HfCopy(every=1, save_interval=4, folder=hf_dir if own_folder else None)
    assert copies.out_dir(save_dir / "step_000012") == hf_dir / "step_000012_hf"
    copies.prune(save_dir)
    assert sorted(p.name for p in hf_dir.iterdir() if p.name.endswith(("_hf", ".partial"))) == [
        "step_000008_hf", "step_000012_hf"]
    assert sorted(p.name for p in save_dir.iterdir() if not p.name.endswith("_hf")) == ["step_000008", "step_000012"]


class _Recorder:
    """A tracker that keeps what it is given (the protocol of training/trackers/base.py)."""

    def __init__(self) -> None:
        self.records: list[tuple[dict, str]] = []
        self.plans: list[tuple[dict, str]] = []
        self.finished: list[tuple[str, dict]] = []

    def log(self, record: dict[str, Any], split: str) -> None:
        self.records.append((dict(record), split))

    def log_plan(self, summary: dict[str, Any], text: str) -> None:
        self.plans.append((summary, text))

    def finish(self, status: str, fields: dict[str, Any]) -> None:
        self.finished.append((status, fields))


class _Broken(_Recorder):
    def log(self, record: dict[str, Any], split: str) -> None:
        raise ConnectionError("tracking server unreachable\nsecond line")


def test_trackers_get_what_metrics_jsonl_gets_and_a_failing_one_is_dropped(tmp_path, caplog):
    good, broken = _Recorder(), _Broken()
    writer = MetricsWriter(tmp_path, enabled=True, total_steps=3, tensorboard=False, progress_bar=False,
                           trackers=[broken, good])
    writer.log_plan({"world_size": 2}, "plan: ...")
    rows = [{"step": 1, "loss": 1.5, "phase": "sft", "skipped": False},
            {"step": 2, "loss": math.inf, "phase": "psft", "skipped": True},
            {"step": 2, "loss": 0.75, "tokens": 12}]
    writer.write(rows[0])
    writer.write(rows[1])
    writer.write(rows[2], prefix="eval")
    writer.close()
    writer.finish("stopped", step=2, reason=None)
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == [
        {"step": 1, "loss": 1.5, "phase": "sft", "skipped": False},
        {"step": 2, "loss": None, "phase": "psft", "skipped": True},
        {"step": 2, "loss": 0.75, "tokens": 12, "split": "eval"},
    ]
    # The tracker got each line of metrics.jsonl, with its split.
    assert good.records == [(w, w.get("split", "train")) for w in written]
    assert good.plans == [({"world_size": 2}, "plan: ...")]
    assert good.finished == [("stopped", {"step": 2, "reason": None})]
    # The broken one was dropped after its first failure, with one warning line; the run went on.
    warnings = [r.getMessage() for r in caplog.records if "_Broken failed" in r.getMessage()]
    assert len(warnings) == 1 and "(ConnectionError: tracking server unreachable)" in warnings[0]
    assert broken.finished == [] and writer.trackers == []


def test_trackers_are_fed_on_the_logging_rank_only(tmp_path):
    good = _Recorder()
    writer = MetricsWriter(tmp_path, enabled=False, total_steps=1, trackers=[good])
    writer.log_plan({}, "")
    writer.write({"step": 1, "loss": 1.0})
    writer.finish("finished")
    assert good.records == good.plans == good.finished == []
    assert not (tmp_path / "metrics.jsonl").exists()


def test_per_layer_values_reach_trackers_one_metric_per_layer():
    """A MoE step record: per-layer numbers become KEY/layer_NNN; per-expert lists stay out (metrics.jsonl
    and TensorBoard keep them); eval rows get the eval/ prefix."""
    from psft_megatron.training.trackers.base import metric_items

    record = {"step": 3, "phase": "psft", "loss": 1.5, "expert_load_worst": 1.25,
              "expert_load": {"1": [0.5, 0.5], "3": [0.75, 0.25]},
              "expert_load_max_over_mean": {"1": 1.0, "3": 1.5}}
    assert metric_items(record, "train") == {
        "phase": "psft", "loss": 1.5, "expert_load_worst": 1.25,
        "expert_load_max_over_mean/layer_001": 1.0, "expert_load_max_over_mean/layer_003": 1.5}
    assert metric_items({"step": 4, "loss": 2.0, "kl": None}, "eval")["eval/loss"] == 2.0
