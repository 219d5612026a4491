"""Which objective each optimizer step trains with: plain SFT warm-up, then the recipe's objective."""

from __future__ import annotations

from dataclasses import dataclass, replace

from psft_megatron.loss.objectives import ObjectiveConfig
from psft_megatron.training.config import TrainingConfig


@dataclass(frozen=True)
class PhaseSchedule:
    """SFT for the first ``sft_warmup_steps`` optimizer steps, then ``objective``.

    The warm-up length is a multiple of the steps per global batch (checked with the
    recipe), so a global batch never straddles the switch.
    """

    objective: ObjectiveConfig
    sft_warmup_steps: int = 0

    @classmethod
    def from_config(cls, loss: ObjectiveConfig, training: TrainingConfig) -> PhaseSchedule:
        """``training.sft_warmup_steps`` of SFT, then the ``loss`` section's objective."""
        return cls(loss, training.sft_warmup_steps)

    def objective_at(self, step: int) -> ObjectiveConfig:
        """The objective of the global batch whose first optimizer step is ``step + 1``."""
        if step < self.sft_warmup_steps:
            return replace(self.objective, name="sft")
        return self.objective
