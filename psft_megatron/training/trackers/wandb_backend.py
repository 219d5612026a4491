"""Weights & Biases as a :class:`~psft_megatron.training.trackers.base.Tracker`.

The run id is kept in ``<run_dir>/wandb_run_id``; a relaunch passes it with ``resume="allow"``,
so every launch of a run logs into one W&B run. W&B's files go to ``<run_dir>/wandb/`` (offline
runs: ``offline-run-*/run-ID.wandb``, one per launch, which ``wandb sync`` uploads as one run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psft_megatron.training.trackers.base import EXIT_CODES, keep_run_id, metric_items, read_run_id
from psft_megatron.training.trackers.config import WandbConfig

RUN_ID_FILE = "wandb_run_id"


class WandbTracker:
    """One W&B run for ``run_dir``, started or resumed with the resolved recipe as its config."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / RUN_ID_FILE
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, tags=cfg.tags or None,
            mode=cfg.mode, dir=str(run_dir), id=read_run_id(id_file), resume="allow", config=config,
            allow_val_change=True,  # a relaunch may change a field (e.g. training.train_steps)
        )
        keep_run_id(id_file, self.run.id)
        # An online resume continues after the last step the server holds: the records a crashed
        # launch logged past its checkpoint are there already, with the same values (resume is
        # exact), and W&B would refuse the redone ones. Offline this is 0 (the server merges later).
        self._first_step = self.run.step

    def log(self, record: dict[str, Any], split: str) -> None:
        if record["step"] >= self._first_step:
            self.run.log(metric_items(record, split), step=record["step"])

    def log_plan(self, summary: dict[str, Any], text: str) -> None:
        self.run.summary.update({f"plan/{k}": v for k, v in summary.items()} | {"plan/report": text})

    def finish(self, status: str, fields: dict[str, Any]) -> None:
        self.run.summary.update({"run_status": status}
                                | {f"run_status/{k}": v for k, v in fields.items() if v is not None})
        if status == "preempted":
            self.run.mark_preempting()  # W&B shows it as preempted, not failed
        self.run.finish(exit_code=EXIT_CODES[status])
