"""The global batch in progress: which mini-batch comes next and its snapshot log-probs.

The loop can stop between any two optimizer steps (a preemption signal finishes the step
in flight, then saves). Inside a global batch that needs two things the data loader does
not know: the loader position *before* the batch (to draw it again) and logp_old of the
mini-batches still to run, which came from weights that no longer exist and cannot be
recomputed. The cursor saves both: the position in the run's JSON state, the log-probs
per packed row keyed by (mini-batch, row position in the mini-batch), so a run resumes
bit-exactly at the same layout and keeps its trust region at any other layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from psft_megatron.data.batches import MiniBatch


@dataclass(frozen=True)
class RowLayout:
    """Where this rank's micro-batch rows sit inside each mini-batch (the loader's DP split)."""

    dp_rank: int
    dp_size: int
    mini_batch_size: int
    micro_batch_size: int

    def positions(self, micro_index: int, rows: int) -> list[int]:
        """Positions in the mini-batch of the rows of this rank's ``micro_index``-th micro-batch."""
        start = self.dp_rank * (self.mini_batch_size // self.dp_size) + micro_index * self.micro_batch_size
        return list(range(start, start + rows))


class BatchCursor:
    """The loop's place inside the current global batch (inactive between global batches)."""

    def __init__(self, rows: RowLayout, holds_logp: bool) -> None:
        self.rows = rows
        self.holds_logp = holds_logp  # last pipeline stage, TP rank 0: writes this rank's rows
        self.minis: list[MiniBatch] | None = None
        self.logp_old: list[Sequence[torch.Tensor | None] | None] = []
        self.next_mini = 0
        self.start_step = 0
        self.loader_before: dict[str, Any] | None = None
        self._restored_rows: dict[tuple[int, int], torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.minis is not None and self.next_mini < len(self.minis)

    def begin(self, minis: list[MiniBatch], logp_old: list, start_step: int, loader_before: dict[str, Any]) -> None:
        self.minis, self.logp_old, self.next_mini = minis, logp_old, 0
        self.start_step, self.loader_before = start_step, loader_before

    def advance(self) -> None:
        self.next_mini += 1
        if not self.active:
            self.minis, self.logp_old, self.loader_before = None, [], None

    # ---- checkpoint state ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.active:
            return {"active": False}
        return {"active": True, "next_mini": self.next_mini, "start_step": self.start_step,
                "loader_before": self.loader_before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending_state = state if state.get("active") else None

    def shard_state_dict(self) -> dict[tuple[int, int], torch.Tensor]:
        """This rank's snapshot log-probs of the mini-batches still to run, one ``[S]`` row each."""
        if not self.active or not self.holds_logp:
            return {}
        out = {}
        for m in range(self.next_mini, len(self.minis)):
            old = self.logp_old[m]
            if old is None:
                continue
            for u, lp in enumerate(old):  # lp: [s, b]
                for i, pos in enumerate(self.rows.positions(u, lp.shape[1])):
                    out[(m, pos)] = lp[:, i].detach().cpu().clone()
        return out

    def load_shards(self, shards: list[dict[tuple[int, int], torch.Tensor]]) -> None:
        rows: dict[tuple[int, int], torch.Tensor] = {}
        for shard in shards:
            rows.update(shard)
        self._restored_rows = rows

    def pending(self) -> dict[str, Any] | None:
        """The restored position of an interrupted global batch (None: start the next one)."""
        return getattr(self, "_pending_state", None)

    def resume(self, minis: list[MiniBatch], device: torch.device) -> None:
        """Re-enter the interrupted global batch (``minis`` drawn again from ``loader_before``)."""
        state = self._pending_state
        self._pending_state = None
        k = len(minis)
        logp_old: list[Sequence[torch.Tensor | None] | None] = [None] * k
        rows = self._restored_rows or {}
        for m in range(state["next_mini"], k):
            if not any(key[0] == m for key in rows):
                continue
            logp_old[m] = [
                torch.stack([rows[(m, pos)] for pos in self.rows.positions(u, mb.shape[0])], dim=1).to(device)
                for u, mb in enumerate(minis[m].micro_batches)
            ]
        self.minis, self.logp_old = minis, logp_old
        self.next_mini, self.start_step = state["next_mini"], state["start_step"]
        self.loader_before = state["loader_before"]
        self._restored_rows = None
