"""The PSFT training loop: warm-up SFT, then per global batch a snapshot pass and k optimizer steps.

For each global batch (this DP rank's share, already split by the loader into k
mini-batches of micro-batches):

1. the :class:`~psft_megatron.training.phases.PhaseSchedule` picks the objective
   (``sft`` during warm-up); the snapshot pass records logp_old and the frozen reference
   model logp_ref, each only if the objective declares it needs them;
2. each mini-batch runs forward+backward and one optimizer step, unless the
   non-finite guard skips it;
3. after every step the stop policy may end the launch (a signal: the checkpoint then
   holds the position inside the global batch); between global batches the evaluator
   and the checkpointer decide for themselves whether to act.

The loop only orchestrates; each component builds from its own config section (``from_config``),
and :func:`psft_megatron.run.build_trainer` lists the builds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psft_megatron.checkpoint.checkpointer import Checkpointer, Stateful
from psft_megatron.training.batch_cursor import BatchCursor
from psft_megatron.training.data_setup import TrainData
from psft_megatron.training.evaluator import Evaluator
from psft_megatron.training.guards import LossSpikeDetector, NonFiniteGuard
from psft_megatron.training.metrics import MetricsWriter, train_record
from psft_megatron.training.moe_metrics import MoEMetrics, counting
from psft_megatron.training.optimizer import OptimizerBundle
from psft_megatron.training.phases import PhaseSchedule
from psft_megatron.training.progress import TrainProgress
from psft_megatron.training.step import (
    PassSetup,
    prepare_global_batch,
    reference_logp,
    snapshot_logp_old,
    train_step,
)
from psft_megatron.training.stopping import StopPolicy

log = logging.getLogger("psft")


@dataclass
class TrainResult:
    """What a finished run returns (on every rank; metrics only on the logging rank)."""

    step: int
    records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]
    last_checkpoint: Path | None
    stop_reason: str | None = None  # why the launch ended before the last step (None: it finished)
    preempted: bool = False  # a signal or the time budget: relaunch to resume
    skipped_steps: int = 0


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
    cursor: BatchCursor
    guard: NonFiniteGuard
    spikes: LossSpikeDetector
    total_steps: int
    tokens_per_step: int  # positions per optimizer step: mini_batch_size x seq_length
    is_logger: bool
    passes_per_snapshot: int = 1  # each global batch's k mini-batches are trained this many times
    states: dict[str, Stateful] = field(default_factory=dict)  # what a checkpoint saves besides the model
    # The frozen reference model's chunks (objectives that need one: sft_kl), and the current
    # global batch's reference log-probs (recomputed on resume: the reference never changes).
    reference: list | None = None
    logp_ref: list = field(default_factory=list)
    # Expert load and the load-balancing loss per step (mixture-of-experts models only).
    moe: MoEMetrics | None = None

    def save(self) -> Path:
        b = self.bundle
        return self.checkpointer.save(self.progress.step, b.model, b.optimizer, b.scheduler, self.states)


def _enter_global_batch(t: Trainer) -> None:
    """Draw the next global batch (or re-draw the interrupted one) and run its snapshot pass.

    The cursor walks ``k x passes`` steps: the k mini-batches in order, once per pass."""
    loader = t.data.loader
    passes = t.passes_per_snapshot
    pending = t.cursor.pending()
    if pending is not None:  # resumed inside a global batch: draw it again, reuse its saved logp_old
        loader.load_state_dict(pending["loader_before"])
        minis = prepare_global_batch(next(loader), t.setup)
        t.cursor.resume(minis * passes, t.setup.device)
    else:
        before = loader.state_dict()
        minis = prepare_global_batch(next(loader), t.setup)
        objective = t.phases.objective_at(t.progress.step)
        logp_old = snapshot_logp_old(t.bundle.model, minis, objective, t.setup, passes)
        t.cursor.begin(minis * passes, logp_old, t.progress.step, before)
    objective = t.phases.objective_at(t.cursor.start_step)
    t.logp_ref = reference_logp(t.reference, minis, objective, t.setup) * passes


def _evaluate(t: Trainer, step: int, eval_records: list[dict[str, Any]]) -> None:
    ev = t.evaluator.evaluate(t.bundle.model, step)
    if ev is not None:
        eval_records.append(ev)
        t.metrics.write(ev, prefix="eval")
        if t.is_logger:
            parts = [f"loss {ev['loss']:.4f} entropy {ev['entropy']:.4f}"] if "loss" in ev else []
            parts += [f"kl to start {ev['kl']:.4f}"] if "kl" in ev else []
            parts += [f"{k} {v:.4f}" for k, v in ev.items() if "/" in k]  # lm-eval tasks: TASK/METRIC
            log.info("eval step %d: %s", step, ", ".join(parts))


def train(t: Trainer) -> TrainResult:
    """Run the built (and possibly resumed) trainer to its last step or until its stop policy says so."""
    records: list[dict[str, Any]] = []
    eval_records: list[dict[str, Any]] = []
    progress, cursor = t.progress, t.cursor
    t.stop.install_signal_handlers()
    try:
        if t.evaluator.should_evaluate_before(progress.step):
            _evaluate(t, progress.step, eval_records)
        while progress.step < t.total_steps:
            t0 = time.monotonic()
            t.stop.step_begins(progress.step + 1)
            if not cursor.active:
                _enter_global_batch(t)
            objective = t.phases.objective_at(cursor.start_step)
            j = cursor.next_mini
            by_source = t.data.source_fields(cursor.minis[j])  # {"tokens/NAME": ...}, several sources only
            with counting(t.moe):  # the step's routing (MoE models), not the snapshot's or evaluation's
                result = train_step(t.bundle, cursor.minis[j], objective, t.setup, cursor.logp_old[j], t.logp_ref[j])
            moe = t.moe.step_record(t.setup.device) if t.moe is not None else {}  # collective: every rank
            cursor.advance()
            progress.advance(t.tokens_per_step, {k.removeprefix("tokens/"): v for k, v in by_source.items()})
            step = progress.step
            loss = result.stats["loss"] if result.stats is not None else None
            t.guard.record(step, result.skipped, loss, result.grad_norm)
            if result.stats is not None:
                rec = train_record(step, objective.name, result.stats, result.grad_norm, result.lr,
                                   t.tokens_per_step, time.monotonic() - t0)
                rec.update(by_source)
                rec.update(moe)
                if result.skipped:
                    rec["skipped"] = True
                else:
                    t.spikes.check(step, -result.stats["mean_logp"])
                records.append(rec)
                t.metrics.write(rec)
                t.metrics.progress(rec)
                t.metrics.source_totals(step, progress.source_tokens)
            boundary = not cursor.active
            if boundary and t.evaluator.should_evaluate(step, step - cursor.start_step):
                _evaluate(t, step, eval_records)
            last_step = step >= t.total_steps
            stopping = not last_step and t.stop.should_stop(step, boundary)
            if t.checkpointer.should_save(step, at_boundary=boundary, last_step=last_step, stopping=stopping):
                t.save()
            if stopping:
                log.info("stopping after step %d (%s); relaunch the same command to resume", step, t.stop.reason)
                break
    finally:
        t.stop.restore_signal_handlers()
        t.metrics.close()
    return TrainResult(step=progress.step, records=records, eval_records=eval_records,
                       last_checkpoint=t.checkpointer.last, stop_reason=t.stop.reason,
                       preempted=t.stop.preempted, skipped_steps=t.guard.total)
