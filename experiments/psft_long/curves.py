#!/usr/bin/env python
"""Training curves of the long-regime runs: windowed tables (markdown) and smoothed plots (PNG).

    python experiments/psft_long/curves.py runs/psft_long/long --runs sft psft sft_lowlr \\
        --window 40 --out docs/experiments/long --title "GSM8K, k=8"

Each run folder holds the trainer's ``metrics.jsonl``: one row per optimizer step (train) and
rows with ``"split": "eval"`` (held-out NLL ``loss``, ``entropy`` and, when logged, ``kl`` to the
start model). Written into ``--out``:

- ``curves.md``: per run, the token-weighted mean of each training metric over consecutive
  windows of ``--window`` steps (entropy, response NLL, clip fraction; max ratio), and the
  held-out metrics at every evaluation step, and each run's largest gap to the first run over
  those steps (for a second seed of the first run: how far chance alone moves the curves);
- ``train_entropy.png``, ``train_nll.png``, ``clip_frac.png`` (running means over ``--window``
  steps, every run on each) and ``eval_nll.png``, ``eval_entropy.png``, ``eval_kl.png`` (every
  evaluation point).

Means over steps are weighted by each step's response-token count (``tokens``), so a window's
mean is the mean over its tokens, as the trainer's own per-step means are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TRAIN = (("entropy", "train entropy"), ("nll", "train NLL"), ("clip_frac", "clip fraction"))
EVAL = (("loss", "eval_nll", "held-out NLL"), ("entropy", "eval_entropy", "held-out entropy"),
        ("kl", "eval_kl", "held-out KL to the start model"))


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, eval rows) of a run's metrics.jsonl; a resumed run's repeated steps keep the last row."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist")
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{n}: not JSON ({e.msg})") from None
        if row.get("skipped"):
            continue
        (evals if row.get("split") == "eval" else train)[int(row["step"])] = row
    rows = [dict(r, nll=-r["mean_logp"]) for _, r in sorted(train.items())]
    return rows, [r for _, r in sorted(evals.items())]


def best_kept_step(run_dir: Path) -> str:
    """``step_NNNNNN`` of the kept checkpoint with the lowest held-out NLL (the early-stopping point).

    Only steps with both an evaluation and a checkpoint on disk are candidates (checkpoint.keep_every
    keeps every N-th), so the answer is always a checkpoint that can be evaluated; step 0 is the start
    model, not a checkpoint. Ties go to the earlier step.
    """
    evals = {int(r["step"]): float(r["loss"]) for r in read_metrics(run_dir)[1]}
    kept = {int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()}
    candidates = sorted(s for s in kept & set(evals) if s > 0)
    if not candidates:
        raise SystemExit(f"error: {run_dir}: no checkpoint on disk has a held-out evaluation in "
                         f"{run_dir / 'metrics.jsonl'}")
    best = min(candidates, key=lambda s: (evals[s], s))
    return f"step_{best:06d}"


def window_means(rows: list[dict[str, Any]], key: str, window: int) -> list[tuple[int, float]]:
    """``(last step, token-weighted mean of key)`` over consecutive windows of ``window`` steps
    (steps 1..w, w+1..2w, ...; a last partial window is kept)."""
    out: list[tuple[int, float]] = []
    for start in range(0, len(rows), window):
        part = [r for r in rows[start:start + window] if r.get(key) is not None]
        weight = sum(r["tokens"] for r in part)
        if weight:
            out.append((part[-1]["step"], sum(r[key] * r["tokens"] for r in part) / weight))
    return out


def running_mean(rows: list[dict[str, Any]], key: str, window: int) -> tuple[list[int], list[float]]:
    """Token-weighted running mean of ``key`` over the last ``window`` steps, at every step."""
    steps, values = [], []
    for i, r in enumerate(rows):
        part = [p for p in rows[max(0, i - window + 1):i + 1] if p.get(key) is not None]
        weight = sum(p["tokens"] for p in part)
        if weight:
            steps.append(r["step"])
            values.append(sum(p[key] * p["tokens"] for p in part) / weight)
    return steps, values


def eval_gaps(ref: list[dict[str, Any]], run: list[dict[str, Any]], key: str) -> tuple[float, int, float] | None:
    """Over the evaluation steps both runs scored ``key`` at: (the signed difference ``run - ref``
    largest in size, its step, the mean difference); None when they share no step."""
    a = {e["step"]: e[key] for e in ref if e.get(key) is not None}
    b = {e["step"]: e[key] for e in run if e.get(key) is not None}
    steps = sorted(a.keys() & b.keys())
    if not steps:
        return None
    diffs = [(b[s] - a[s], s) for s in steps]
    largest, at = max(diffs, key=lambda d: abs(d[0]))
    return largest, at, sum(d for d, _ in diffs) / len(diffs)


def markdown(runs: dict[str, tuple[list, list]], window: int, title: str) -> str:
    lines = [f"# {title}", ""]
    for key, label in TRAIN:
        lines += [f"## {label}: token-weighted mean over each {window} steps", ""]
        ends = sorted({s for rows, _ in runs.values() for s, _ in window_means(rows, key, window)})
        lines += ["| run | " + " | ".join(str(s) for s in ends) + " |",
                  "| --- |" + " --- |" * len(ends)]
        for name, (rows, _) in runs.items():
            got = dict(window_means(rows, key, window))
            lines.append(f"| {name} | " + " | ".join(f"{got[s]:.3f}" if s in got else "" for s in ends) + " |")
        lines.append("")
    lines += ["## max ratio over the run, and over its last window", "", "| run | run | last window |",
              "| --- | --- | --- |"]
    for name, (rows, _) in runs.items():
        ratios = [r.get("ratio_max", 1.0) for r in rows]
        lines.append(f"| {name} | {max(ratios):.3g} | {max(ratios[-window:]):.3g} |")
    lines.append("")
    for key, _, label in EVAL:
        steps = sorted({e["step"] for _, ev in runs.values() for e in ev if e.get(key) is not None})
        if not steps:
            continue
        lines += [f"## {label} (held-out rows scored during training)", "",
                  "| run | " + " | ".join(str(s) for s in steps) + " |", "| --- |" + " --- |" * len(steps)]
        for name, (_, ev) in runs.items():
            got = {e["step"]: e[key] for e in ev if e.get(key) is not None}
            lines.append(f"| {name} | " + " | ".join(f"{got[s]:.3f}" if s in got else "" for s in steps) + " |")
        lines.append("")
    first, *others = runs
    if others:
        lines += [f"## held-out gaps to {first}: the largest difference (at step) and the mean, over the shared "
                  "evaluation steps", "", "| run | " + " | ".join(label for _, _, label in EVAL) + " |",
                  "| --- |" + " --- |" * len(EVAL)]
        for name in others:
            cells = []
            for key, _, _ in EVAL:
                gap = eval_gaps(runs[first][1], runs[name][1], key)
                cells.append("" if gap is None else f"{gap[0]:+.3f} ({gap[1]}), mean {gap[2]:+.3f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: dict[str, tuple[list, list]], window: int, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, label in TRAIN:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (rows, _) in runs.items():
            ax.plot(*running_mean(rows, key, window), label=name, lw=1.2)
        ax.set(xlabel="optimizer step", ylabel=label, title=f"{title}: {label} (running mean, {window} steps)")
        ax.legend(fontsize=8)
        path = out / f"{'train_' if key != 'clip_frac' else ''}{key}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for key, stem, label in EVAL:
        if not any(e.get(key) is not None for _, ev in runs.values() for e in ev):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (_, ev) in runs.items():
            pts = [(e["step"], e[key]) for e in ev if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name, lw=1.2)
        ax.set(xlabel="optimizer step", ylabel=label, title=f"{title}: {label}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
        plt.close(fig)
        written.append(out / f"{stem}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="folder holding the run folders")
    p.add_argument("--runs", nargs="+", required=True, help="run folder names under ROOT, in table order")
    p.add_argument("--window", type=int, default=40)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="long-regime runs")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.window < 1:
        raise SystemExit("error: --window must be >= 1")
    runs = {name: read_metrics(args.root / name) for name in args.runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.md").write_text(markdown(runs, args.window, args.title))
    plots = [] if args.no_plots else plot(runs, args.window, args.out, args.title)
    print(f"wrote {args.out / 'curves.md'} and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
