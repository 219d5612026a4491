"""Result tables: one evaluation's summary (markdown + a flat JSON), and several runs side by side.

The summary is flat, ``{"<task>/<metric>": value}`` (``gsm8k/acc``, ``mmlu/acc``,
``heldout/nll``, ``drift/kl``), so runs compare by key; ``tools/compare_runs.py`` reads the
``summary.json`` each evaluation writes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["markdown_table", "side_by_side", "summarize_lm_eval"]

_PREFIX = "psft_"
# lm-eval metric keys are "<metric>,<filter>"; "none" is the unfiltered (greedy) one.
_SKIP = ("alias", "samples", "name", "sample_len", "sample_count")


def _display(name: str) -> str:
    return name.removeprefix(_PREFIX)


def summarize_lm_eval(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, float]:
    """``{"<task>/<metric>[@filter]": value}`` for the requested tasks/groups (lm-eval names), stderr left out."""
    out: dict[str, float] = {}
    table = dict(results.get("results", {}))
    table.update(results.get("groups", {}))
    for name in tasks:
        row = table.get(name, {})
        for key, value in row.items():
            if key in _SKIP or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            label = metric if filt in ("none", "") else f"{metric}@{filt}"
            out[f"{_display(name)}/{label}"] = float(value)
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def markdown_table(summary: dict[str, float], counts: dict[str, Any] | None = None) -> str:
    """``| task | metric | value | n |`` rows of a flat summary (``counts``: task -> items scored)."""
    lines = ["| task | metric | value | n |", "| --- | --- | ---: | ---: |"]
    for key, value in summary.items():
        task, _, metric = key.partition("/")
        n = (counts or {}).get(task, "")
        lines.append(f"| {task} | {metric} | {_fmt(value)} | {n} |")
    return "\n".join(lines) + "\n"


def side_by_side(runs: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per ``task/metric``, one column per run (missing: blank)."""
    names = list(runs)
    keys: list[str] = []
    for summary in runs.values():
        keys += [k for k in summary if k not in keys]
    lines = ["| task/metric | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(_fmt(runs[n][k]) if k in runs[n] else "" for n in names) + " |")
    return "\n".join(lines) + "\n"
