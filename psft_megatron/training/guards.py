"""Guards around each optimizer step: non-finite steps are skipped, loss spikes are reported.

Why not megatron-core's own machinery: its optimizers detect overflow only with an fp16
grad scaler (bf16 and fp32 step on NaN), its DDP ``check_for_nan_in_grad`` raises instead
of skipping, and its rerun state machine re-executes steps to tell transient faults from
data (it needs Megatron-LM's training loop). What PSFT fine-tuning needs is simpler:
never apply or checkpoint a non-finite update, say so, and stop when it keeps happening.
"""

from __future__ import annotations

import logging
import math
from collections import deque

from psft_megatron.errors import Diverged
from psft_megatron.training.config import TrainingConfig

log = logging.getLogger("psft")


class TrainingDiverged(Diverged, RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Counts skipped steps; raises :class:`TrainingDiverged` after ``max_consecutive`` in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    @classmethod
    def from_config(cls, training: TrainingConfig) -> NonFiniteGuard:
        """The guard of ``training.max_skipped_steps``."""
        return cls(training.max_skipped_steps)

    def record(self, step: int, skipped: bool, loss: float | None, grad_norm: float) -> None:
        """Note step ``step``'s outcome (call on every rank; the decision was already agreed)."""
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        log.warning(
            "step %d skipped: non-finite %s (loss %s, grad norm %s); no update applied, optimizer state untouched "
            "(%d in a row, %d in total)", step, "loss or gradient", loss, grad_norm, self.consecutive, self.total,
        )
        if self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive optimizer steps (up to step {step}) had a "
                "non-finite loss or gradient norm; lower optimizer.lr, check the data, or resume from an earlier "
                "checkpoint (training.max_skipped_steps sets how many are tolerated)"
            )


class LossSpikeDetector:
    """Warns when a step's response NLL exceeds ``factor`` x its running mean over ``window`` steps.

    The NLL (-mean log-prob of the response tokens) is watched rather than the objective's
    value: it is positive and comparable for every objective (PSFT's loss sits near -1).
    """

    def __init__(self, factor: float, window: int = 20) -> None:
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=window)

    @classmethod
    def from_config(cls, training: TrainingConfig) -> LossSpikeDetector:
        """The detector of ``training.loss_spike_factor`` and ``loss_spike_window``."""
        return cls(training.loss_spike_factor, training.loss_spike_window)

    def check(self, step: int, nll: float) -> bool:
        """True (and a warning) when ``nll`` spikes; the value joins the running window either way."""
        spike = False
        if self.factor > 0 and math.isfinite(nll) and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if mean > 0 and nll > self.factor * mean:
                spike = True
                log.warning("loss spike at step %d: response NLL %.4f is %.1fx its mean %.4f over the last %d steps",
                            step, nll, nll / mean, mean, len(self.recent))
        if math.isfinite(nll):
            self.recent.append(nll)
        return spike
