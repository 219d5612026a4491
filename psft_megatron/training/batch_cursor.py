"""The global batch in progress: which mini-batch comes next and its snapshot log-probs.

The loop can stop between any two optimizer steps (a preemption signal finishes the step
in flight, then saves). Inside a global batch that needs two things the data loader does
not know: the loader position *before* the batch (to draw it again) and logp_old of the
mini-batches still to run, which came from weights that no longer exist and cannot be
recomputed. The cursor saves both: the position in the run's JSON state, the log-probs
per packed row keyed by (mini-batch, row position in the mini-batch), so a run resumes
bit-exactly at the same layout and keeps its trust region at any other layout.

Each rank saves the tokens it holds: whole rows, or under context parallelism its share of
each row. A saved row is ``{"index": positions in the row, "logp": their log-probs}``; the
shares of every CP rank are merged back into rows on load, and each rank takes the tokens
its own layout gives it (positions no rank held, padding the CP split inserted, read 0:
they carry no loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from psft_megatron.data.batches import MicroBatch, MiniBatch
from psft_megatron.training.config import TrainingConfig


@dataclass(frozen=True)
class RowLayout:
    """Where this rank's micro-batch rows sit inside each mini-batch (the loader's DP split)."""

    dp_rank: int
    dp_size: int
    mini_batch_size: int
    micro_batch_size: int

    @classmethod
    def current(cls, training: TrainingConfig) -> RowLayout:
        """This rank's layout: ``training``'s batch sizes at megatron's current data-parallel rank and size."""
        from megatron.core import parallel_state as ps

        return cls(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), training.mini_batch_size,
                   training.micro_batch_size)

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

    @classmethod
    def from_config(cls, training: TrainingConfig) -> BatchCursor:
        """The cursor of this rank (needs megatron's parallel state): its row layout, and whether it
        writes snapshot log-probs (last pipeline stage, tensor-parallel rank 0)."""
        from megatron.core import parallel_state as ps

        holds = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
        return cls(RowLayout.current(training), holds_logp=holds)

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

    def shard_state_dict(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """This rank's snapshot log-probs of the mini-batches still to run: per row it holds (all of
        it, or its CP share), the positions in the row and their log-probs."""
        if not self.active or not self.holds_logp:
            return {}
        out = {}
        for m in range(self.next_mini, len(self.minis)):
            old = self.logp_old[m]
            if old is None:
                continue
            for u, lp in enumerate(old):  # lp: [s, b], tokens of micro-batch u
                tokens = self.minis[m].micro_batches[u].token_rows()
                flat = lp.detach().transpose(0, 1).reshape(-1).cpu()  # row-major, as token_rows
                row, index = tokens.row.cpu(), tokens.index.cpu()
                for i, pos in enumerate(self.rows.positions(u, tokens.num_rows)):
                    keep = (row == i) & (index >= 0)
                    out[(m, pos)] = {"index": index[keep].to(torch.int32), "logp": flat[keep].clone()}
        return out

    def load_shards(self, shards: list[dict[tuple[int, int], Any]]) -> None:
        rows: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for shard in shards:
            for key, saved in shard.items():
                if isinstance(saved, torch.Tensor):  # a whole row (checkpoints before CP)
                    saved = {"index": torch.arange(saved.shape[0]), "logp": saved}
                rows.setdefault(key, []).append((saved["index"].to(torch.int64), saved["logp"]))
        self._restored_rows = rows

    def _row(self, key: tuple[int, int], seq_length: int) -> torch.Tensor:
        """A saved row of ``seq_length`` log-probs, merged from every rank's share."""
        pieces = (self._restored_rows or {})[key]
        full = torch.zeros(seq_length, dtype=pieces[0][1].dtype)
        for index, logp in pieces:
            full[index] = logp
        return full

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
            logp_old[m] = [self._micro_batch_logp(m, u, mb, device) for u, mb in enumerate(minis[m].micro_batches)]
        self.minis, self.logp_old = minis, logp_old
        self.next_mini, self.start_step = state["next_mini"], state["start_step"]
        self.loader_before = state["loader_before"]
        self._restored_rows = None

    def _micro_batch_logp(self, m: int, u: int, mb: MicroBatch, device: torch.device) -> torch.Tensor:
        """logp_old ``[s, b]`` of micro-batch ``u`` of mini-batch ``m`` in this rank's layout."""
        tokens = mb.token_rows()
        full = torch.stack([self._row((m, pos), tokens.seq_length)
                            for pos in self.rows.positions(u, tokens.num_rows)])  # [rows, S]
        row, index = tokens.row.cpu(), tokens.index.cpu()
        flat = torch.where(index >= 0, full[row, index.clamp(min=0)], torch.zeros((), dtype=full.dtype))
        b, s = mb.shape
        return flat.reshape(b, s).transpose(0, 1).contiguous().to(device)
