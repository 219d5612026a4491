"""What the trainer owns besides the maths, each checked by an assertion that can fail.

One SFT run (1 process) over the tiny data, by epochs, with held-out scoring of a few
rows, frequent checkpoints with ``keep_last`` and weights-only ``keep_every``, TensorBoard and a ``log_interval``; then a
relaunch from its middle checkpoint with another objective, as after a crash whose later
records must disappear from metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe

pytestmark = pytest.mark.slow

EPOCHS = 0.5
EVAL_ROWS = 5
LOG_INTERVAL = 3
KEEP_EVERY = 4


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _launch(first: dict, relaunch: dict) -> dict[str, Any]:
    """The run, then a relaunch from its older kept checkpoint, as if it had crashed after it."""
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run

    lines = _Lines()
    logging.getLogger("psft").addHandler(lines)
    logging.getLogger("psft").setLevel(logging.INFO)
    a = run(recipe_from_dict(copy.deepcopy(first)))
    log_a = list(lines.lines)
    ckpts = Path(first["logging"]["run_dir"]) / "checkpoints"
    listed = sorted(p.name for p in ckpts.glob("step_*"))
    crash_at = a.step - 2
    # The crash: every checkpoint after crash_at is lost, its records stay in metrics.jsonl / TensorBoard.
    for p in ckpts.glob("step_*"):
        if int(p.name.split("_")[1]) > crash_at:
            shutil.rmtree(p)
    (ckpts / "latest").write_text(f"step_{crash_at:06d}")
    b = run(recipe_from_dict(copy.deepcopy(relaunch)))
    return {"a": {"records": a.records, "eval": a.eval_records, "step": a.step}, "log_a": log_a,
            "checkpoints": listed, "crash_at": crash_at,
            "b": {"records": b.records, "eval": b.eval_records, "step": b.step}}


def _eval_rows_tokens(recipe: dict, rows: int) -> int:
    """Response tokens of the first ``rows`` held-out packed rows, counted from the eval cache's rows."""
    from psft_megatron.data.loader import LoaderConfig, PackedLoader
    from psft_megatron.data.prepare import prepare_dataset
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.training.data_setup import HELD_OUT_SEED

    r = recipe_from_dict(copy.deepcopy(recipe))
    cached = prepare_dataset(Path(r.data.cache_dir) / "eval", r.data.eval, r.data.tokenizer, r.data.chat_template,
                             is_writer=True)
    loader = PackedLoader(cached, LoaderConfig(r.training.seq_length, 1, 1, 1, seed=HELD_OUT_SEED))
    order = loader.epoch_order(0)
    assert len(order) > rows, "the held-out split must hold more rows than eval_rows for this check"
    return int(np.asarray(loader.row_loss_tokens)[order[:rows]].sum())


def _train_rows(recipe: dict) -> int:
    from psft_megatron.data.loader import LoaderConfig, PackedLoader
    from psft_megatron.data.prepare import prepare_dataset
    from psft_megatron.recipe import recipe_from_dict

    r = recipe_from_dict(copy.deepcopy(recipe))
    cached = prepare_dataset(Path(r.data.cache_dir) / "train", r.data.train, r.data.tokenizer, r.data.chat_template,
                             is_writer=True)
    t = r.training
    return PackedLoader(cached, LoaderConfig(t.seq_length, t.global_batch_size, t.mini_batch_size,
                                             t.micro_batch_size, seed=t.seed)).num_rows


@pytest.fixture(scope="module")
def outcome(tiny_data, tmp_path_factory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("behaviour") / "run"
    first = tiny_recipe(
        tiny_data, run_dir,
        training={"train_steps": None, "epochs": EPOCHS, "sft_warmup_steps": 0, "eval_interval": 2,
                  "eval_rows": EVAL_ROWS, "eval_at_start": True},
        loss={"name": "sft"},
        checkpoint={"save_interval": 2, "keep_last": 2, "keep_every": KEEP_EVERY, "keep_every_weights_only": True,
                    "save_at_end": True},
        logging={"tensorboard": True, "log_interval": LOG_INTERVAL},
    )
    relaunch = copy.deepcopy(first)
    relaunch["loss"]["name"] = "dft"  # so the redone steps' records differ from the lost ones
    out = run_in_processes(_launch, 1, kwargs={"first": first, "relaunch": relaunch}, timeout=400)[0]
    out["recipe"], out["run_dir"] = first, run_dir
    return out


def test_epochs_give_the_step_count(outcome):
    r = outcome["recipe"]["training"]
    k = r["global_batch_size"] // r["mini_batch_size"]
    expected = math.floor(EPOCHS * (_train_rows(outcome["recipe"]) // r["global_batch_size"])) * k
    assert expected >= 8
    assert outcome["a"]["step"] == expected
    assert [rec["step"] for rec in outcome["a"]["records"]] == list(range(1, expected + 1))


def test_held_out_nll_falls_over_an_sft_run(outcome):
    ev = outcome["a"]["eval"]
    assert len(ev) >= 2
    assert ev[-1]["loss"] < ev[0]["loss"] - 0.05, [e["loss"] for e in ev]


def test_eval_runs_at_start_and_every_interval_and_not_again_on_resume(outcome):
    a, b = outcome["a"], outcome["b"]
    k = outcome["recipe"]["training"]["global_batch_size"] // outcome["recipe"]["training"]["mini_batch_size"]
    # Evaluated at global-batch boundaries that cross a multiple of eval_interval (2), plus step 0.
    assert [e["step"] for e in a["eval"]] == [0] + [s for s in range(k, a["step"] + 1, k)]
    assert [e["step"] for e in b["eval"]] == [s for s in range(outcome["crash_at"] + k, b["step"] + 1, k)]


def test_eval_rows_selects_exactly_that_many_rows(outcome):
    expected = _eval_rows_tokens(outcome["recipe"], EVAL_ROWS)
    assert {e["tokens"] for e in outcome["a"]["eval"]} == {expected}


def test_keep_last_prunes_older_checkpoints(outcome):
    steps = outcome["a"]["step"]
    kept = list(range(KEEP_EVERY, steps - 2, KEEP_EVERY))
    assert kept, "the run must be long enough to keep a checkpoint by keep_every"
    # saved every 2: the newest 2, and the older multiples of KEEP_EVERY
    assert outcome["checkpoints"] == [f"step_{s:06d}" for s in [*kept, steps - 2, steps]]


def test_keep_every_weights_only_keeps_a_model_checkpoint(outcome):
    """A kept checkpoint outside keep_last holds the model only, and resuming no longer offers it."""
    from psft_megatron.checkpoint.model_checkpoint import read_meta
    from psft_megatron.checkpoint.train_checkpoint import complete_checkpoints

    ckpts = outcome["run_dir"] / "checkpoints"
    kept = ckpts / f"step_{KEEP_EVERY:06d}"
    assert sorted(p.name for p in kept.iterdir()) == ["model", "psft_meta.json"]
    assert read_meta(kept)["step"] == KEEP_EVERY
    resumable = complete_checkpoints(ckpts)
    assert kept not in resumable
    assert {"optimizer", "rng", "train_state.json"} <= {p.name for p in resumable[0].iterdir()}


def test_log_interval_lines(outcome):
    steps = outcome["a"]["step"]
    logged = [int(line.split()[1].split("/")[0]) for line in outcome["log_a"] if line.startswith("step ")]
    expected = sorted({s for s in range(1, steps + 1) if s % LOG_INTERVAL == 0} | {steps})
    assert logged == expected


def test_resume_replaces_the_lost_records_in_metrics_and_tensorboard(outcome):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = outcome["run_dir"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    steps, crash_at = outcome["b"]["step"], outcome["crash_at"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))  # each step once
    # the relaunch's records after the checkpoint it resumed from, the first launch's before
    assert [r["phase"] for r in train] == ["sft"] * crash_at + ["dft"] * (steps - crash_at)
    evals = [r for r in records if r.get("split") == "eval"]
    kept = [e for e in outcome["a"]["eval"] if e["step"] <= crash_at] + outcome["b"]["eval"]
    assert [e["step"] for e in evals] == [e["step"] for e in kept] == list(range(0, steps + 1, 2))  # 0: eval_at_start
    assert [e["loss"] for e in evals] == pytest.approx([e["loss"] for e in kept], rel=1e-9)
    lost = {e["step"]: e["loss"] for e in outcome["a"]["eval"] if e["step"] > crash_at}
    assert any(abs(lost[e["step"]] - e["loss"]) > 1e-5 for e in outcome["b"]["eval"])  # the check can tell them apart

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    scalars = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(scalars) == list(range(1, steps + 1))
    for r in train:
        assert scalars[r["step"]] == pytest.approx(r["loss"], rel=1e-6), r["step"]
    tb_eval = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert tb_eval == pytest.approx({e["step"]: e["loss"] for e in kept}, rel=1e-6)
    # The accumulator above drops out-of-order steps on its own; readers that do not (TensorBoard's
    # data server) rely on the relaunch's events file telling them where the lost launch's points start.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    relaunch = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))[-1]
    purges = [e.step for e in EventFileLoader(str(relaunch)).Load()
              if e.HasField("session_log") and e.session_log.status == SessionLog.START]
    assert purges == [crash_at + 1]
