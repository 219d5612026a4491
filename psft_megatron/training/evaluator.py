"""Held-out scoring during training: when it runs and what it records."""

from __future__ import annotations

from typing import Any, Callable

from psft_megatron.data.batches import MicroBatch
from psft_megatron.training.config import TrainingConfig
from psft_megatron.training.data_setup import TrainData
from psft_megatron.training.step import PassSetup, evaluate


class Evaluator:
    """Scores the held-out rows every ``interval`` optimizer steps (0 = never), and at step 0
    when ``at_start`` is set.

    ``micro_batches`` yields this rank's share of the chosen held-out rows, the same
    rows on every call and at every layout (see ``TrainData.eval_micro_batches``).
    """

    def __init__(self, interval: int, micro_batches: Callable[[], list[MicroBatch]], setup: PassSetup,
                 at_start: bool = False, start_model: list | None = None) -> None:
        self.interval = interval
        self.at_start = at_start
        self._micro_batches = micro_batches
        self.setup = setup
        self.start_model = start_model  # frozen starting weights: each record also has "kl" to them

    @classmethod
    def from_config(cls, training: TrainingConfig, data: TrainData, setup: PassSetup,
                    start_model: list | None = None) -> Evaluator:
        """Scores ``training.eval_rows`` held-out rows of ``data`` every ``training.eval_interval`` steps;
        with ``training.eval_kl_to_start``, also their KL to ``start_model`` (required then)."""
        if training.eval_kl_to_start and start_model is None:
            raise ValueError("training.eval_kl_to_start needs the frozen starting model")
        return cls(training.eval_interval, lambda: data.eval_micro_batches(training.eval_rows), setup,
                   at_start=training.eval_at_start, start_model=start_model if training.eval_kl_to_start else None)

    def should_evaluate_before(self, step: int) -> bool:
        """True before the first step of a fresh run (not of a resumed one) with ``at_start``."""
        return self.at_start and step == 0

    def should_evaluate(self, step: int, steps_just_run: int) -> bool:
        """True when the last ``steps_just_run`` steps (one global batch) crossed a multiple of the interval."""
        every = self.interval
        return bool(every) and step // every > (step - steps_just_run) // every

    def evaluate(self, model: list, step: int) -> dict[str, Any] | None:
        """The eval record of ``step`` (last pipeline stage; None elsewhere)."""
        stats = evaluate(model, self._micro_batches(), self.setup, reference=self.start_model)
        if stats is None:
            return None
        record = {"step": step, "loss": stats["loss"], "entropy": stats["mean_entropy"],
                  "mean_logp": stats["mean_logp"], "tokens": int(stats["token_count"])}
        if "kl" in stats:
            record["kl"] = stats["kl"]
        return record
