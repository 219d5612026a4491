"""Experiment trackers (W&B, MLflow) fed by the metrics writer, on the logging rank only.

One small protocol (:class:`~psft_megatron.training.trackers.base.Tracker`) and one module per
backend; each builds from its own section of ``logging`` and imports its package only when the
recipe asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psft_megatron.training.trackers.base import Tracker
from psft_megatron.training.trackers.config import MlflowConfig, WandbConfig, missing_packages
from psft_megatron.training.trackers.mlflow_backend import MlflowTracker
from psft_megatron.training.trackers.wandb_backend import WandbTracker

__all__ = ["MlflowConfig", "Tracker", "WandbConfig", "build_trackers", "missing_packages"]


def build_trackers(wandb: WandbConfig | None, mlflow: MlflowConfig | None, run_dir: Path,
                   config: dict[str, Any]) -> list[Tracker]:
    """Start (or resume) the trackers the recipe sets, each with ``config`` (the resolved recipe)."""
    trackers: list[Tracker] = []
    if wandb is not None:
        trackers.append(WandbTracker(wandb, run_dir, config))
    if mlflow is not None:
        trackers.append(MlflowTracker(mlflow, run_dir, config))
    return trackers
