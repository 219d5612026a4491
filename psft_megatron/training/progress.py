"""How far the run has got: the one piece of loop state that checkpoints carry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainProgress:
    """Optimizer steps done and positions consumed (prompts and padding included), resumable."""

    step: int = 0
    consumed_tokens: int = 0

    def advance(self, tokens: int) -> None:
        """One optimizer step over ``tokens`` positions."""
        self.step += 1
        self.consumed_tokens += tokens

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.consumed_tokens = int(state["consumed_tokens"])
