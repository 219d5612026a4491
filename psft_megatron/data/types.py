"""Data types shared by the data pipeline's stages.

The flow is one way:
``sources`` (records with provenance) -> ``adapters`` (chat conversations)
-> ``encode`` (token ids + loss mask) -> ``packing`` / ``cache`` / ``loader``
(fixed-length packed sequences in global/mini/micro batches) -> trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Provenance:
    """Where a record came from, for error messages and skip reports."""

    path: str  # file path or hub dataset name (with split)
    line: int  # 1-based line for JSONL, 1-based row index for JSON arrays / Parquet / hub rows

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class RawRecord:
    """One record as read from a source, before any format-specific mapping."""

    fields: dict[str, Any]
    provenance: Provenance


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    # Whether this turn's tokens count in the loss (only assistant turns may be trained).
    train: bool = False
    # The record field this text came from (e.g. "answer", "messages[3].content"), so that
    # errors found after templating/tokenising (e.g. nothing left after truncation) can name it.
    source: str | None = None


@dataclass(frozen=True)
class Conversation:
    """A chat sample: ordered messages, some assistant turns marked for training."""

    messages: tuple[Message, ...]
    provenance: Provenance


@dataclass
class TokenizedSample:
    """Token ids and the loss mask of one conversation.

    ``loss_mask[i]`` is 1 when token ``input_ids[i]`` is a response token to be
    predicted (assistant content plus its end-of-turn/EOS token); prompt tokens are 0.
    The trainer shifts: position i predicts token i+1, so the label mask is ``loss_mask[1:]``.
    """

    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # uint8 [n]
    provenance: Provenance | None = None

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.loss_mask.shape:
            raise ValueError(
                f"input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} differ in shape"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class SkipReport:
    """Counts of samples skipped under a ``skip`` policy, by reason, with examples."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "SkipReport") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(ex))])

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        parts = [f"{reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})" for reason, n in sorted(self.counts.items())]
        return f"{self.total} samples skipped; " + "; ".join(parts)
