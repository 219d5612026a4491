"""``tools/compare_runs.py``: curves from metrics.jsonl, the last training step and evaluation summaries
side by side, and one-line errors."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path, steps: int, scale: float, with_eval: bool) -> list[dict]:
    folder.mkdir(parents=True)
    rows = []
    for s in range(1, steps + 1):
        rows.append({"step": s, "phase": "sft" if s <= 2 else "psft", "loss": scale / s, "entropy": 1.0 + s / 10,
                     "clip_frac": 0.0 if s <= 2 else 0.01 * s, "ratio_mean": 1.0, "ratio_min": 1 - 0.01 * s,
                     "ratio_max": 1 + 0.02 * s, "grad_norm": 5.0 / s, "lr": 1e-5})
    rows.insert(2, {"step": 3, "phase": "psft", "loss": float("nan"), "skipped": True})  # a skipped step: not drawn
    if with_eval:
        rows.append({"step": steps, "split": "eval", "loss": 1.25, "entropy": 0.75, "tokens": 100})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_compare_runs_writes_plots_and_tables(tmp_path, capsys):
    import matplotlib.image

    from psft_megatron.evaluation.compare import _series, read_run

    compare = runpy.run_path(str(ROOT / "tools" / "compare_runs.py"))["main"]
    _run(tmp_path / "psft", 6, 2.0, True)
    _run(tmp_path / "sft", 4, 3.0, False)
    (tmp_path / "psft" / "eval" / "step_000006").mkdir(parents=True)
    (tmp_path / "psft" / "eval" / "step_000006" / "summary.json").write_text(
        json.dumps({"gsm8k/acc": 0.25, "heldout/nll": 1.5}))
    # Generation tasks of the same checkpoint in a sub-folder: they join its column; a clash keeps both.
    (tmp_path / "psft" / "eval" / "step_000006" / "gen").mkdir()
    (tmp_path / "psft" / "eval" / "step_000006" / "gen" / "summary.json").write_text(
        json.dumps({"svamp/acc": 0.0625, "gsm8k/acc": 0.375}))
    # An evaluation of the run's folder itself beside the checkpoints': the checkpoint keeps its own column.
    (tmp_path / "psft" / "eval" / "summary.json").write_text(json.dumps({"gsm8k/acc": 0.5}))
    (tmp_path / "base_eval").mkdir()  # an evaluate --out folder on its own
    (tmp_path / "base_eval" / "summary.json").write_text(json.dumps({"gsm8k/acc": 0.125, "mmlu/acc": 0.5}))
    out = tmp_path / "cmp"
    assert compare([str(tmp_path / n) for n in ("psft", "sft", "base_eval")] + ["--out", str(out)]) == 0

    for stem in ("loss", "entropy", "clip_frac", "ratio", "grad_norm", "eval_loss", "eval_entropy"):
        img = matplotlib.image.imread(out / f"{stem}.png")
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0, stem
    xs, ys = _series(read_run(tmp_path / "psft").train, "loss")
    assert xs == [1, 2, 3, 4, 5, 6] and ys == [2.0 / s for s in xs]  # the skipped NaN step is left out

    md = (out / "compare.md").read_text()
    assert "| psft | 6 | psft | 0.3333 | 1.6 | 0.06 | 0.94 | 1.12 | 0.8333 | 1.25 | 0.75 |" in md
    assert "| sft | 4 | psft | 0.75 | 1.4 | 0.04 | 0.96 | 1.08 | 1.25 |  |  |" in md
    assert "| task/metric | psft/eval | psft/eval/step_000006 | base_eval |" in md
    assert "| gsm8k/acc | 0.5000 | 0.2500 | 0.1250 |" in md and "| mmlu/acc |  |  | 0.5000 |" in md
    assert "| heldout/nll |  | 1.5000 |  |" in md
    assert "| svamp/acc |  | 0.0625 |  |" in md and "| gen/gsm8k/acc |  | 0.3750 |  |" in md

    capsys.readouterr()
    assert compare([str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    (tmp_path / "empty").mkdir()
    assert compare([str(tmp_path / "empty"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "nowhere: run folder not found" in err[0] and "neither metrics.jsonl" in err[1]
