"""The run's checkpointer: what to start from, when to save, and what a save holds.

The training loop only asks it two things per global batch, ``should_save`` and
``save``; the rules (interval, end of run, a launch stopping early) and the saved
state live here. The state is gathered from the objects registered as ``states``
(anything with ``state_dict`` / ``load_state_dict``, e.g. the data loader), so a new
piece of resumable state is one more entry, not an edit of the loop. The HF copies of
chosen checkpoints (``checkpoint.save_hf``) are its business too: :mod:`.hf_copy`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from psft_megatron.checkpoint.config import CheckpointConfig
from psft_megatron.checkpoint.hf_copy import HfCopy
from psft_megatron.checkpoint.lora import is_lora_meta
from psft_megatron.checkpoint.model_checkpoint import CheckpointError, load_model_checkpoint
from psft_megatron.checkpoint.train_checkpoint import (
    complete_checkpoints,
    load_training_checkpoint,
    one_line,
    read_shards,
    save_training_checkpoint,
)
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.lora.state import has_adapters, init_adapters
from psft_megatron.runtime.distributed import any_rank

log = logging.getLogger(__name__)

__all__ = ["Checkpointer", "Stateful"]


class Stateful(Protocol):
    """What the checkpointer saves and restores besides the model and optimizer.

    An object may also define ``shard_state_dict()`` (this rank's own data, e.g. tensors)
    and ``load_shards(list_of_every_ranks_shards)``.
    """

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
        adapter_seed: int = 0,
    ) -> None:
        self.cfg = cfg
        self.adapter_seed = adapter_seed  # a LoRA run's first adapters (init_from a full checkpoint)
        self.save_dir = Path(save_dir)
        self.model_config = model_config
        self.meta = dict(meta or {})  # stored in every checkpoint's psft_meta.json (e.g. the tokenizer)
        self.last: Path | None = None
        self._candidates: list[Path] = []
        self.hf_copy = HfCopy.from_config(cfg)
        self._final_step: int | None = None  # the run's last step, once should_save has seen it

    @property
    def _resume_from(self) -> Path | None:
        return self._candidates[0] if self._candidates else None

    def find_resume_point(self) -> Path | None:
        """The checkpoint this run resumes from (the newest complete one; older ones are fallbacks),
        chosen by rank 0 and broadcast: ranks must agree, even on a filesystem whose metadata caches
        disagree right after a crash. Raised on every rank when ``resume: false`` meets existing
        checkpoints, so no rank is left waiting."""
        found = [str(p) for p in complete_checkpoints(self.save_dir)] if dist.get_rank() == 0 else None
        choice = [found]
        dist.broadcast_object_list(choice, src=0)
        if not choice[0]:
            return None
        if not self.cfg.resume:
            raise CheckpointError(
                f"checkpoint.resume is false but {self.save_dir} already holds checkpoints "
                f"({Path(choice[0][0]).name}) from an earlier run, which this run's saves would mix with: use a "
                "fresh checkpoint.save_dir or logging.run_dir, or set checkpoint.resume: true"
            )
        self._candidates = [Path(p) for p in choice[0]]
        self.last = self._candidates[0]
        return self._resume_from

    def load_initial_weights(self, chunks: list[Any]) -> bool:
        """Before the optimizer is built (bf16 runs copy the weights into fp32 main params then):
        ``init_from``'s weights for a fresh run. Returns False when no weights will be loaded at
        all (a fresh run without ``init_from``: the model keeps its random initialisation)."""
        if self._resume_from is not None:
            return True  # resume() brings them
        if self.cfg.init_from:
            meta = load_model_checkpoint(chunks, self.cfg.init_from)
            log.info("initialised weights from %s", self.cfg.init_from)
            if has_adapters(chunks) and not is_lora_meta(meta):  # a LoRA run on a full checkpoint: fresh adapters
                init_adapters(chunks, self.adapter_seed)
            return True
        log.warning("starting from RANDOM weights (checkpoint.allow_random_init is set)")
        return False

    def resume(self, model: list, optimizer: Any, scheduler: Any, states: dict[str, Stateful]) -> int:
        """Restore everything from the resume point; returns its step (0 for a fresh run).

        A checkpoint that fails to load (corrupt or truncated files) is reported and the next
        older complete one is tried; when none loads, the error names each and why.
        """
        if not self._candidates:
            return 0
        failures = []
        for path in self._candidates:
            error: Exception | None = None
            try:
                saved = load_training_checkpoint(path, model, optimizer, scheduler)
                shards = read_shards(path)
                for name, obj in states.items():
                    obj.load_state_dict(saved[name])
                    if hasattr(obj, "load_shards"):
                        obj.load_shards([s[name] for s in shards if name in s])
            except (Exception, CheckpointException) as e:  # every rank must agree on which checkpoint it resumed from
                error = e
            if not any_rank(error is not None):
                self.last = path
                return int(saved["step"])
            reason = one_line(error) if error is not None else "another rank could not load it"
            failures.append(f"{path.name} ({reason})")
            log.warning("cannot resume from %s: %s; trying an older checkpoint", path, reason)
        raise CheckpointError(
            f"no checkpoint in {self.save_dir} could be loaded: " + "; ".join(failures)
            + ". Remove the broken ones (or point checkpoint.save_dir elsewhere) and relaunch"
        )

    def should_save(self, step: int, *, at_boundary: bool, last_step: bool, stopping: bool) -> bool:
        """Save at every ``save_interval`` (between global batches), at the end (``save_at_end``),
        and whenever a launch stops early (then also inside a global batch)."""
        if last_step:
            self._final_step = step
            return self.cfg.save_at_end
        interval = self.cfg.save_interval
        return stopping or bool(at_boundary and interval and step % interval == 0)

    def save(self, step: int, model: list, optimizer: Any, scheduler: Any, states: dict[str, Stateful]) -> Path:
        """Write checkpoint ``step`` with the model, optimizer, schedule and every registered state.

        Refuses (on every rank) to write weights that are not finite: a checkpoint must be
        something a run can resume from. Starts the checkpoint's HF copy when one is due.
        """
        self.hf_copy.wait()  # before this save's keep_last pruning may remove the checkpoint it reads
        bad = any(not torch.isfinite(p).all() for chunk in model for p in chunk.parameters())
        if any_rank(bad):
            raise CheckpointError(
                f"refusing to save step {step} to {self.save_dir}: the weights are not finite; the last good "
                f"checkpoint is {self.last or 'none'}"
            )
        train_state = {name: obj.state_dict() for name, obj in states.items()}
        train_state["step"] = step
        shards = {name: obj.shard_state_dict() for name, obj in states.items() if hasattr(obj, "shard_state_dict")}
        meta = {"model": self.model_config, "step": step, **self.meta}
        self.last = save_training_checkpoint(
            self.save_dir, step, model, optimizer, scheduler, train_state, meta, keep_last=self.cfg.keep_last,
            shards=shards, keep_every=self.cfg.keep_every, keep_every_weights_only=self.cfg.keep_every_weights_only,
        )
        self.hf_copy.after_save(self.last, step, final=step == self._final_step)
        return self.last

    def finish(self, wait: bool = True) -> None:
        """End of the launch: wait for the HF copy still being written (``wait``; a preempted launch
        leaves it to finish on its own)."""
        self.hf_copy.finish(wait)
