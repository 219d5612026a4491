"""How far the run has got: the one piece of loop state that checkpoints carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainProgress:
    """Optimizer steps done, positions consumed (prompts and padding included) and response tokens
    trained per training source since the run began, resumable."""

    step: int = 0
    consumed_tokens: int = 0
    source_tokens: dict[str, int] = field(default_factory=dict)

    def advance(self, tokens: int, by_source: dict[str, int] | None = None) -> None:
        """One optimizer step over ``tokens`` positions, with ``by_source`` response tokens per source."""
        self.step += 1
        self.consumed_tokens += tokens
        for name, n in (by_source or {}).items():
            self.source_tokens[name] = self.source_tokens.get(name, 0) + int(n)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "consumed_tokens": self.consumed_tokens, "source_tokens": dict(self.source_tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.consumed_tokens = int(state["consumed_tokens"])
        self.source_tokens = {k: int(v) for k, v in state.get("source_tokens", {}).items()}  # absent before mixtures
