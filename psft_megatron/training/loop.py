"""The PSFT training loop: warm-up SFT, then per global batch a snapshot pass and k optimizer steps.

For each global batch (this DP rank's share, already split by the loader into k
mini-batches of micro-batches):

1. the :class:`~psft_megatron.training.phases.PhaseSchedule` picks the objective
   (``sft`` during warm-up);
2. :func:`~psft_megatron.training.step.train_global_batch` runs the snapshot pass the
   objective needs, then each mini-batch's forward+backward and optimizer step;
3. between global batches the evaluator, the checkpointer and the stop policy each
   decide for themselves whether to act.

The loop only orchestrates; the components are built by :func:`psft_megatron.run.build_trainer`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psft_megatron.checkpoint.checkpointer import Checkpointer, Stateful
from psft_megatron.training.data_setup import TrainData
from psft_megatron.training.evaluator import Evaluator
from psft_megatron.training.metrics import MetricsWriter, train_record
from psft_megatron.training.optimizer import OptimizerBundle
from psft_megatron.training.phases import PhaseSchedule
from psft_megatron.training.progress import TrainProgress
from psft_megatron.training.step import PassSetup, train_global_batch
from psft_megatron.training.stopping import StopPolicy

log = logging.getLogger("psft")


@dataclass
class TrainResult:
    """What a finished run returns (on every rank; metrics only on the logging rank)."""

    step: int
    records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]
    last_checkpoint: Path | None


@dataclass
class Trainer:
    """Everything one run's loop touches, built and resumed (see :func:`psft_megatron.run.build_trainer`)."""

    bundle: OptimizerBundle
    data: TrainData
    setup: PassSetup
    phases: PhaseSchedule
    checkpointer: Checkpointer
    evaluator: Evaluator
    metrics: MetricsWriter
    stop: StopPolicy
    progress: TrainProgress
    total_steps: int
    tokens_per_step: int  # positions per optimizer step: mini_batch_size x seq_length
    is_logger: bool
    states: dict[str, Stateful] = field(default_factory=dict)  # what a checkpoint saves besides the model

    def save(self) -> Path:
        b = self.bundle
        return self.checkpointer.save(self.progress.step, b.model, b.optimizer, b.scheduler, self.states)


def train(t: Trainer) -> TrainResult:
    """Run the built (and possibly resumed) trainer to its last step or until its stop policy says so."""
    records: list[dict[str, Any]] = []
    eval_records: list[dict[str, Any]] = []
    progress = t.progress
    try:
        while progress.step < t.total_steps:
            gb = next(t.data.loader)
            objective = t.phases.objective_at(progress.step)
            steps_before = progress.step
            t0 = time.monotonic()
            for result in train_global_batch(t.bundle, gb, objective, t.setup):
                progress.advance(t.tokens_per_step)
                seconds, t0 = time.monotonic() - t0, time.monotonic()
                if result.stats is not None:
                    rec = train_record(progress.step, objective.name, result.stats, result.grad_norm,
                                       result.lr, t.tokens_per_step, seconds)
                    records.append(rec)
                    t.metrics.write(rec)
                    t.metrics.progress(rec)
            step = progress.step
            if t.evaluator.should_evaluate(step, step - steps_before):
                ev = t.evaluator.evaluate(t.bundle.model, step)
                if ev is not None:
                    eval_records.append(ev)
                    t.metrics.write(ev, prefix="eval")
                    if t.is_logger:
                        log.info("eval step %d: loss %.4f entropy %.4f", step, ev["loss"], ev["entropy"])
            last_step = step >= t.total_steps
            stopping = not last_step and t.stop.should_stop(step)
            if t.checkpointer.should_save(step, last_step=last_step, stopping=stopping):
                t.save()
            if stopping:
                log.info("stopping after step %d (%s); relaunch to resume", step, t.stop.reason())
                break
    finally:
        t.metrics.close()
    return TrainResult(step=progress.step, records=records, eval_records=eval_records,
                       last_checkpoint=t.checkpointer.last)
