#!/usr/bin/env python
"""The headline table of the SFT / PSFT / DFT / SFT-KL comparison, with paired bootstrap intervals.

    python experiments/psft_vs_sft/summarize.py runs/psft_vs_sft --out docs/experiments/results.md

Reads what ``tools/evaluate.py`` wrote for the start model (``OUT/start``) and each run's
checkpoints (``OUT/<run>/eval/step_N``, plus ``hh_harmless/`` inside each): lm-eval's per-item
samples and the per-sample held-out rows. Every checkpoint is scored on the same items, so the
differences to SFT are paired: items (samples) are resampled with replacement, the same draw for
both columns, and the 2.5 / 97.5 percentiles of the difference make the 95% interval. An interval
that contains 0 reads "no difference".
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

RUNS = ("sft", "psft", "dft", "sft_kl")
BOOTSTRAP = 2000
# (column, where it comes from, higher is better). Task names are the evaluate tool's, "psft_" prefixed.
METRICS = (
    ("GSM8K acc", "task:psft_gsm8k", True),
    ("held-out NLL", "heldout:nll", False),
    ("held-out entropy", "heldout:entropy", None),
    ("KL to start", "heldout:kl", False),
    ("SVAMP acc", "task:psft_svamp", True),
    ("ASDiv acc", "task:psft_asdiv", True),
    ("SVAMP mean@8", "task:psft_svamp_n8", True),
    ("SVAMP pass@8", "task:psft_svamp_n8:pass_at_n", True),
    ("SVAMP distinct answers of 8", "task:psft_svamp_n8:distinct_answers", None),
    ("MMLU acc", "task:psft_mmlu", True),
    ("TruthfulQA MC1", "task:psft_truthfulqa_mc1", True),
    ("HH harmless NLL", "hh:nll", False),
    ("HH harmless entropy", "hh:entropy", None),
)

Items = dict[object, tuple[float, float]]  # item id -> (value x weight, weight)


def _task_items(folder: Path) -> dict[str, Items]:
    """Per task, each item's accuracy (weight 1), from this folder and the ones below it (each group
    of tasks is its own evaluate.py call). MMLU's subjects join one ``psft_mmlu`` task. A sampled
    task's other per-item metrics come as ``TASK:pass_at_n`` and ``TASK:distinct_answers``."""
    out: dict[str, Items] = {}
    for path in sorted(folder.glob("**/lm_eval/**/samples_*.jsonl")):
        task = re.sub(r"_\d{4}-\d{2}-\d{2}T.*$", "", path.stem.removeprefix("samples_"))
        group = "psft_mmlu" if task.startswith("psft_mmlu") else task
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(group, {})[(task, row["doc_id"])] = (float(row["acc"]), 1.0)
            for extra in ("pass_at_n", "distinct_answers"):
                if extra in row and task.endswith(tuple(f"_n{n}" for n in range(2, 65))):
                    out.setdefault(f"{group}:{extra}", {})[(task, row["doc_id"])] = (float(row[extra]), 1.0)
    return out


def _heldout_items(path: Path) -> dict[str, Items]:
    """Token-weighted per-sample means (a sample's mean x its token count, and the count)."""
    out: dict[str, Items] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line)
        n = row["num_tokens"]
        if not n:
            continue
        for key in ("nll", "entropy", "kl"):
            if row.get(key) is not None:
                out.setdefault(key, {})[row["index"]] = (row[key] * n, n)
    return out


def read_evaluation(folder: Path) -> dict[str, Items]:
    """Every metric of METRICS that this evaluation folder holds, item by item."""
    items: dict[str, Items] = {}
    for task, rows in _task_items(folder).items():
        items[f"task:{task}"] = rows
    for key, rows in _heldout_items(folder / "heldout.jsonl").items():
        items[f"heldout:{key}"] = rows
    for key, rows in _heldout_items(folder / "hh_harmless" / "heldout.jsonl").items():
        items[f"hh:{key}"] = rows
    return items


def _mean(rows: Items, ids: list) -> float:
    num = sum(rows[i][0] for i in ids)
    den = sum(rows[i][1] for i in ids)
    return num / den


def paired_interval(a: Items, b: Items, rng: random.Random) -> tuple[float, float, float]:
    """mean(a) - mean(b) over their common items, and its bootstrap 95% interval."""
    ids = sorted(set(a) & set(b), key=str)
    diffs = []
    for _ in range(BOOTSTRAP):
        draw = [ids[rng.randrange(len(ids))] for _ in ids]
        diffs.append(_mean(a, draw) - _mean(b, draw))
    diffs.sort()
    return _mean(a, ids) - _mean(b, ids), diffs[int(0.025 * BOOTSTRAP)], diffs[int(0.975 * BOOTSTRAP) - 1]


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _verdict(lo: float, hi: float, higher_is_better: bool | None) -> str:
    if lo <= 0.0 <= hi:
        return "no difference"
    if higher_is_better is None:
        return "higher" if lo > 0 else "lower"
    return "better" if (lo > 0) == higher_is_better else "worse"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path, help="the experiment's run folder (runs/psft_vs_sft)")
    p.add_argument("--out", type=Path, required=True, help="markdown file to write")
    p.add_argument("--runs", nargs="+", default=list(RUNS), help=f"run folders to compare (default: {' '.join(RUNS)})")
    p.add_argument("--baseline", default="sft", help="the run the others are compared with (default: sft)")
    p.add_argument("--step", default=None, help="checkpoint to compare (default: each run's last evaluated one)")
    p.add_argument("--start", type=Path, default=None,
                   help="the start model's evaluation folder (default: OUT_DIR/start)")
    args = p.parse_args()
    rng = random.Random(0)

    start = args.start or args.out_dir / "start"
    columns: dict[str, tuple[str, dict[str, Items]]] = {"start": ("step 0", read_evaluation(start))}
    for run in args.runs:
        evals = sorted((args.out_dir / run / "eval").glob("step_*"))
        chosen = [e for e in evals if args.step is None or e.name == args.step]
        if chosen:
            columns[run] = (chosen[-1].name, read_evaluation(chosen[-1]))
    present = [(name, key, hib) for name, key, hib in METRICS if any(key in c[1] for c in columns.values())]

    lines = ["| model | checkpoint | " + " | ".join(n for n, _, _ in present) + " |",
             "| --- | --- | " + " | ".join("---" for _ in present) + " |"]
    for run, (step, items) in columns.items():
        cells = [_fmt(_mean(items[k], list(items[k]))) if k in items else "" for _, k, _ in present]
        lines.append(f"| {run} | {step} | " + " | ".join(cells) + " |")
    counts = {n: len(next(c[1][k] for c in columns.values() if k in c[1])) for n, k, _ in present}
    lines += ["", "Items per metric: " + ", ".join(f"{n} {c}" for n, c in counts.items()) + ".", ""]

    lines += [f"Differences to {args.baseline} (paired bootstrap, 95% interval, "
              f"{BOOTSTRAP} resamples of the items):", "",
              "| model | metric | difference | 95% interval | reading |", "| --- | --- | --- | --- | --- |"]
    if args.baseline in columns:
        sft = columns[args.baseline][1]
        for run, (_, items) in columns.items():
            if run == args.baseline:
                continue
            for name, key, hib in present:
                if key in items and key in sft:
                    d, lo, hi = paired_interval(items[key], sft[key], rng)
                    lines.append(f"| {run} | {name} | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {_verdict(lo, hi, hib)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
