"""Several runs side by side: training curves from ``metrics.jsonl`` and evaluation summaries.

A run folder is what the trainer writes (``logging.run_dir``: ``metrics.jsonl``) and/or what
``tools/evaluate.py --out`` writes (``summary.json``); evaluations of a run are found as
``summary.json`` in the folder itself or in its sub-folders (up to three levels down, e.g.
``RUN/eval/step_000048/summary.json``), each becoming one column named ``run/sub-folder``.
A summary inside a folder that has one of its own (``RUN/eval/step_000048/gen/summary.json``:
the generation tasks of that checkpoint) joins that folder's column; a metric both name is
kept under ``sub-folder/metric``. A checkpoint's folder (``step_*``) always has a column of its
own, even below another evaluation (``RUN/eval/summary.json`` beside ``RUN/eval/step_N/``).

Curves (one PNG per metric, every run on it): the training loss, mean token entropy, clip
fraction, the ratio range (min..max band around the mean), the gradient norm, and the held-out
loss / entropy when the run logged ``"split": "eval"`` rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psft_megatron.errors import UserError
from psft_megatron.evaluation.report import side_by_side

__all__ = ["CURVES", "Run", "compare_runs", "final_metrics_table", "read_run"]

# (file stem, title, key in metrics.jsonl); "ratio" draws ratio_min..ratio_max around ratio_mean.
CURVES = [
    ("loss", "training loss", "loss"),
    ("entropy", "mean token entropy (nats)", "entropy"),
    ("clip_frac", "clip fraction", "clip_frac"),
    ("ratio", "ratio range (min, mean, max)", "ratio_mean"),
    ("grad_norm", "gradient norm", "grad_norm"),
    ("eval_loss", "held-out loss", "eval:loss"),
    ("eval_entropy", "held-out entropy (nats)", "eval:entropy"),
]


class CompareError(UserError, ValueError):
    """A run folder that cannot be read; one line naming it."""


@dataclass
class Run:
    name: str
    folder: Path
    train: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows without "split"
    eval: list[dict[str, Any]] = field(default_factory=list)  # rows with "split": "eval"
    summaries: dict[str, dict[str, float]] = field(default_factory=dict)  # column name -> flat evaluation summary


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                if n > 1 and not line.endswith("\n"):  # the last line of a run still writing
                    break
                raise CompareError(f"{path}:{n}: not a JSON line") from None
    return rows


def read_run(folder: str | Path, name: str | None = None) -> Run:
    """A run's metrics and evaluation summaries; raises :class:`CompareError` if it has neither."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder}: run folder not found")
    run = Run(name or folder.name, folder)
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():
        for row in _read_jsonl(metrics):
            (run.eval if row.get("split") == "eval" else run.train).append(row)
    patterns = ("summary.json", "*/summary.json", "*/*/summary.json", "*/*/*/summary.json")
    found = sorted((p for pat in patterns for p in folder.glob(pat)), key=lambda p: (len(p.parts), p))
    columns: dict[Path, dict[str, Any]] = {}  # evaluation folder -> its merged summary
    for path in found:  # parents before their sub-folders
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            raise CompareError(f"{path}: not a JSON file") from None
        home = _home_column(path.parent, columns)
        if home is None:
            columns[path.parent] = dict(summary)
            continue
        sub = path.parent.relative_to(home).as_posix()
        for key, value in summary.items():
            columns[home][key if key not in columns[home] else f"{sub}/{key}"] = value
    for col, summary in columns.items():
        rel = col.relative_to(folder).as_posix()
        run.summaries[run.name if rel == "." else f"{run.name}/{rel}"] = summary
    if not run.train and not run.eval and not run.summaries:
        raise CompareError(f"{folder}: neither metrics.jsonl nor an evaluation summary.json (from tools/evaluate.py)")
    return run


def _home_column(folder: Path, columns: dict[Path, Any]) -> Path | None:
    """The evaluation folder whose column a summary in ``folder`` joins: the nearest enclosing folder
    with a summary, not crossing a checkpoint's folder (``step_*``); None: a column of its own."""
    for a in (folder, *folder.parents):
        if a != folder and a in columns:
            return a
        if a.name.startswith("step_"):
            return None
    return None


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and not r.get("skipped"):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _plot(runs: list[Run], stem: str, title: str, key: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    split, _, metric = key.rpartition(":")
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        rows = run.eval if split == "eval" else run.train
        xs, ys = _series(rows, metric)
        if not xs:
            continue
        (line,) = ax.plot(xs, ys, label=run.name, marker="." if len(xs) < 50 else None)
        if stem == "ratio":
            lo, hi = _series(rows, "ratio_min"), _series(rows, "ratio_max")
            if lo[0] == xs and hi[0] == xs:
                ax.fill_between(xs, lo[1], hi[1], color=line.get_color(), alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title=title, xlabel="optimizer step")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def final_metrics_table(runs: list[Run]) -> str:
    """Markdown: each run's last logged training step and its metrics, and its last held-out scores."""
    cols = ["step", "phase", "loss", "entropy", "clip_frac", "ratio_min", "ratio_max", "grad_norm"]
    lines = ["| run | " + " | ".join(cols) + " | eval loss | eval entropy |",
             "| --- |" + " ---: |" * (len(cols) + 2)]
    for run in runs:
        if not run.train and not run.eval:
            continue
        last = run.train[-1] if run.train else {}
        ev = run.eval[-1] if run.eval else {}
        cells = [_cell(last.get(c)) for c in cols] + [_cell(ev.get("loss")), _cell(ev.get("entropy"))]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def compare_runs(folders: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Write ``OUT/<metric>.png`` curves and ``OUT/compare.md``; returns what was written."""
    names = [Path(f).resolve().name for f in folders]
    dup = {n for n in names if names.count(n) > 1}  # same folder names: tell them apart by their parent
    runs = [read_run(f, f"{Path(f).resolve().parent.name}/{n}" if n in dup else n) for f, n in zip(folders, names)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [p for stem, title, key in CURVES if (p := _plot(runs, stem, title, key, out)) is not None]
    summaries: dict[str, dict[str, float]] = {}
    for run in runs:
        summaries.update(run.summaries)
    parts = ["# Runs compared\n", "## Training (last logged step)\n", final_metrics_table(runs)]
    if summaries:
        parts += ["\n## Evaluation\n", side_by_side(summaries)]
    if plots:
        parts += ["\n## Curves\n", *[f"![{p.stem}]({p.name})\n" for p in plots]]
    (out / "compare.md").write_text("\n".join(parts))
    return {"plots": plots, "summaries": summaries, "markdown": out / "compare.md"}
