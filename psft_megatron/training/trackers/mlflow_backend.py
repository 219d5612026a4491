"""MLflow as a :class:`~psft_megatron.training.trackers.base.Tracker`, through ``MlflowClient``
(no global active run: nothing else in the process is affected).

The run id is kept in ``<run_dir>/mlflow_run_id``; a relaunch marks that run RUNNING again and
logs on into it. The recipe goes in as params (flattened: ``training.seq_length``,
``data.train.0.path``) and as the artifact ``config.yaml``; metrics under metrics.jsonl's names
(numbers only: MLflow metrics are floats, so ``phase`` is the run tag ``phase``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from psft_megatron.training.trackers.base import flatten, keep_run_id, metric_items, read_run_id
from psft_megatron.training.trackers.config import MlflowConfig

log = logging.getLogger("psft")

RUN_ID_FILE = "mlflow_run_id"
# run_status.json's status -> MLflow's terminal run status.
TERMINAL = {"finished": "FINISHED", "stopped": "FINISHED", "preempted": "KILLED", "diverged": "FAILED",
            "failed": "FAILED"}
_BATCH = 100  # MLflow's limit on params per log_batch call


class MlflowTracker:
    """One MLflow run for ``run_dir``, started or resumed with the resolved recipe as its params."""

    def __init__(self, cfg: MlflowConfig, run_dir: Path, config: dict[str, Any]) -> None:
        from mlflow import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        if cfg.tracking_uri and cfg.tracking_uri.startswith("file:"):
            # MLflow 3 refuses file stores unless this is set; naming one in the recipe is that choice.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        id_file = run_dir / RUN_ID_FILE
        self.run_id = self._resume(read_run_id(id_file)) or self._create(cfg, run_dir)
        keep_run_id(id_file, self.run_id)
        self._phase: str | None = None
        have = self.client.get_run(self.run_id).data.params
        params = {k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flatten(config).items()}
        changed = sorted(k for k, v in params.items() if k in have and have[k] != v)
        if changed:  # MLflow params cannot change: config.yaml (below) holds this launch's values
            log.warning("mlflow: the recipe changed since the run began (%s); the params keep the first values, "
                        "the artifact config.yaml this launch's", ", ".join(changed))
        self._log_params({k: v for k, v in params.items() if k not in have})
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def _resume(self, run_id: str | None) -> str | None:
        if run_id is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException:  # deleted, or another tracking server: start a new run
            log.warning("mlflow: run %s (from %s) is not in this tracking store; starting a new run", run_id,
                        RUN_ID_FILE)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _create(self, cfg: MlflowConfig, run_dir: Path) -> str:
        found = self.client.get_experiment_by_name(cfg.experiment)
        experiment = found.experiment_id if found else self.client.create_experiment(cfg.experiment)
        return self.client.create_run(experiment, run_name=cfg.run_name or run_dir.name).info.run_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])

    def log(self, record: dict[str, Any], split: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = metric_items(record, split)
        metrics = [Metric(k, float(v), now, record["step"]) for k, v in items.items() if not isinstance(v, str)]
        self.client.log_batch(self.run_id, metrics=metrics)
        phase = items.get("phase")
        if phase is not None and phase != self._phase:
            self.client.set_tag(self.run_id, "phase", phase)
            self._phase = phase

    def log_plan(self, summary: dict[str, Any], text: str) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(f"plan.{k}", str(v)) for k, v in summary.items()])
        self.client.log_text(self.run_id, text, "plan.txt")

    def finish(self, status: str, fields: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag("run_status", status)] + [RunTag(f"run_status.{k}", str(v)) for k, v in fields.items()
                                                 if v is not None]
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, status=TERMINAL[status])
