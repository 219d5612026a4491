"""The run's checkpointer: what to start from, when to save, and what a save holds.

The training loop only asks it two things per global batch, ``should_save`` and
``save``; the rules (interval, end of run, a launch stopping early) and the saved
state live here. The state is gathered from the objects registered as ``states``
(anything with ``state_dict`` / ``load_state_dict``, e.g. the data loader), so a new
piece of resumable state is one more entry, not an edit of the loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from psft_megatron.checkpoint.config import CheckpointConfig
from psft_megatron.checkpoint.model_checkpoint import load_model_checkpoint
from psft_megatron.checkpoint.train_checkpoint import find_latest, load_training_checkpoint, save_training_checkpoint
from psft_megatron.model.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["Checkpointer", "Stateful"]


class Stateful(Protocol):
    """What the checkpointer saves and restores besides the model and optimizer."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Checkpointer:
    """Saves and restores one run's checkpoints under ``save_dir`` (collective: every rank calls it)."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        save_dir: str | Path,
        model_config: ModelConfig,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.save_dir = Path(save_dir)
        self.model_config = model_config
        self.meta = dict(meta or {})  # stored in every checkpoint's psft_meta.json (e.g. the tokenizer)
        self.last: Path | None = None
        self._resume_from: Path | None = None

    def find_resume_point(self) -> Path | None:
        """The checkpoint this run resumes from, chosen by rank 0 and broadcast (ranks must agree,
        even on a filesystem whose metadata caches disagree right after a crash). Raised on every
        rank when ``resume: false`` meets existing checkpoints, so no rank is left waiting."""
        found = find_latest(self.save_dir) if dist.get_rank() == 0 else None
        choice = [str(found) if found else None]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        if not self.cfg.resume:
            raise ValueError(
                f"checkpoint.resume is false but {self.save_dir} already holds checkpoints ({Path(choice[0]).name}) "
                "from an earlier run, which this run's saves would mix with: use a fresh checkpoint.save_dir or "
                "logging.run_dir, or set checkpoint.resume: true"
            )
        self._resume_from = self.last = Path(choice[0])
        return self._resume_from

    def load_initial_weights(self, chunks: list[Any]) -> None:
        """Before the optimizer is built (bf16 runs copy the weights into fp32 main params then):
        ``init_from``'s weights for a fresh run; nothing when resuming (the checkpoint brings them)."""
        if self._resume_from is not None:
            return
        if self.cfg.init_from:
            load_model_checkpoint(chunks, self.cfg.init_from)
            log.info("initialised weights from %s", self.cfg.init_from)
        else:
            log.warning("starting from RANDOM weights (checkpoint.allow_random_init is set)")

    def resume(self, model: list, optimizer: Any, scheduler: Any, states: dict[str, Stateful]) -> int:
        """Restore everything from the resume point; returns its step (0 for a fresh run)."""
        if self._resume_from is None:
            return 0
        saved = load_training_checkpoint(self._resume_from, model, optimizer, scheduler)
        for name, obj in states.items():
            obj.load_state_dict(saved[name])
        return int(saved["step"])

    def should_save(self, step: int, *, last_step: bool, stopping: bool) -> bool:
        """Save at every ``save_interval``, at the end (``save_at_end``), and when a launch stops early."""
        if last_step:
            return self.cfg.save_at_end
        interval = self.cfg.save_interval
        return stopping or bool(interval and step % interval == 0)

    def save(self, step: int, model: list, optimizer: Any, scheduler: Any, states: dict[str, Stateful]) -> Path:
        """Write checkpoint ``step`` with the model, optimizer, schedule and every registered state."""
        train_state = {name: obj.state_dict() for name, obj in states.items()}
        train_state["step"] = step
        meta = {"model": self.model_config, "step": step, **self.meta}
        self.last = save_training_checkpoint(
            self.save_dir, step, model, optimizer, scheduler, train_state, meta, keep_last=self.cfg.keep_last
        )
        return self.last
