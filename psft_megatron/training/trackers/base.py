"""What the metrics writer asks of an experiment tracker, and the record shapes both backends share."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

# How a launch ended (run_status.json's ``status``) -> the process exit status it corresponds to:
# what a tracker that keeps an exit code is told.
EXIT_CODES = {"finished": 0, "stopped": 0, "preempted": 75, "diverged": 3, "failed": 1}


class Tracker(Protocol):
    """One experiment tracker's run, on the logging rank only.

    Built (and started, or resumed: the run id is kept in ``run_dir``) with the resolved
    recipe as its config; then fed every metrics.jsonl record, the ``--plan`` summary once,
    and the launch's outcome at the end.
    """

    def log(self, record: dict[str, Any], split: str) -> None:
        """One metrics.jsonl record (``step`` required): ``split`` is ``train`` or ``eval``."""
        ...

    def log_plan(self, summary: dict[str, Any], text: str) -> None:
        """The ``--plan`` figures of this launch (numbers and labels) and its printed report."""
        ...

    def finish(self, status: str, fields: dict[str, Any]) -> None:
        """Record how the launch ended (``finished``, ``stopped``, ``preempted``, ``diverged``, ``failed``,
        with run_status.json's other fields) and close the run; a relaunch continues it."""
        ...


def metric_items(record: dict[str, Any], split: str) -> dict[str, Any]:
    """A record's fields under metrics.jsonl's names (``eval/`` in front for held-out rows), without
    ``step`` (the tracker's own step axis). Booleans (``skipped``) become 0/1; strings (``phase``) stay."""
    prefix = "" if split == "train" else f"{split}/"
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key in ("step", "split"):
            continue
        if isinstance(value, bool):
            value = int(value)
        if value is None:  # metrics.jsonl writes a non-finite number as null
            value = math.nan
        if isinstance(value, dict):
            # Per-layer values (a MoE model's expert_load_max_over_mean): one metric per layer,
            # KEY/layer_NNN as in TensorBoard. Per-expert lists (expert_load) stay in metrics.jsonl and
            # TensorBoard's histograms: layers x experts series per step would swamp a tracker.
            for sub, v in value.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    name = f"layer_{int(sub):03d}" if str(sub).isdigit() else str(sub)
                    out[f"{prefix}{key}/{name}"] = v
            continue
        out[prefix + key] = value
    return out


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"data": {"train": [{"path": p}]}}`` -> ``{"data.train.0.path": p}`` (trackers whose config is flat)."""
    if isinstance(tree, dict):
        items = [(str(k), v) for k, v in tree.items()]
    elif isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in tree):
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    if not items and prefix:
        out[prefix] = tree
    return out


def read_run_id(path: Path) -> str | None:
    """The run id a previous launch kept in ``path`` (None for a fresh run)."""
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def keep_run_id(path: Path, run_id: str) -> None:
    """Keep ``run_id`` in ``path`` (atomically) so a relaunch continues the same run."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
