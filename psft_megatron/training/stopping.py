"""When a launch stops before the run's last step (to be resumed by the next launch)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class StopPolicy:
    """``exit_after_steps`` optimizer steps of this launch; checked between global batches."""

    def __init__(self, start_step: int, exit_after_steps: int | None = None) -> None:
        self.start_step = start_step
        self.exit_after_steps = exit_after_steps

    def should_stop(self, step: int) -> bool:
        """True once this launch has run ``exit_after_steps`` steps (logged once by the caller)."""
        return self.exit_after_steps is not None and step - self.start_step >= self.exit_after_steps

    def reason(self) -> str:
        return f"training.exit_after_steps={self.exit_after_steps}"
