"""Rank 0 drives, every other rank serves: how one process runs lm-eval over a model sharded on many.

lm-eval is single-process code. Global rank 0 runs it (tasks, prompts, metrics, files) and,
whenever it needs the model, calls :meth:`Driver.call` with a command name and a payload:
the command is broadcast, *every* rank (rank 0 included) runs the handler registered under
that name (a collective piece of work: forward passes at the job's TP/PP/DP), and each rank's
return value comes back to rank 0. The other ranks sit in :meth:`Driver.serve` until rank 0
sends STOP (:meth:`Driver.stop`, which rank 0 calls in a ``finally:``, so an exception on
rank 0 never leaves the workers blocked).

An exception in a handler on any rank is caught there and reported back: after every
command rank 0 gathers each rank's ``(ok, value)`` and raises :class:`WorkerError` naming
the rank and the error, so nothing waits forever on a failed peer (a handler that fails on
some ranks in the middle of a collective can still hang its peers until the process-group
timeout; handlers therefore check their inputs before their first collective).

The commands travel on a separate gloo group with a long timeout: workers wait there while
rank 0 builds prompts or writes files, and a NCCL group would time them out (its watchdog).
"""

from __future__ import annotations

import logging
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["Driver", "WorkerError", "STOP"]

STOP = "__stop__"
# How long a worker may wait for rank 0's next command (HFLM uses 52 weeks for the same reason).
CONTROL_TIMEOUT = timedelta(days=7)


class WorkerError(RuntimeError):
    """A command failed on some rank; the message names the rank and the error."""


class Driver:
    """Command dispatch over all ranks (collective to construct: every rank builds one)."""

    def __init__(self, handlers: dict[str, Callable[[Any], Any]], timeout: timedelta = CONTROL_TIMEOUT) -> None:
        self.handlers = dict(handlers)
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.group = dist.new_group(backend="gloo", timeout=timeout) if self.distributed else None
        self.stopped = False

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def _run(self, name: str, payload: Any) -> tuple[bool, Any]:
        try:
            return True, self.handlers[name](payload)
        except Exception as e:  # reported to rank 0, which raises it there
            log.error("rank %d: command %r failed:\n%s", self.rank, name, traceback.format_exc())
            return False, f"{type(e).__name__}: {e}"

    def call(self, name: str, payload: Any = None) -> list[Any]:
        """Run command ``name`` on every rank (rank 0 only); each rank's result, indexed by rank."""
        if not self.is_driver:
            raise RuntimeError("Driver.call runs on rank 0; the other ranks call serve()")
        if self.stopped:
            raise RuntimeError("the workers were already stopped")
        if name not in self.handlers:
            raise KeyError(f"unknown command {name!r}; known: {sorted(self.handlers)}")
        if not self.distributed:
            ok, value = self._run(name, payload)
            if not ok:
                raise WorkerError(f"rank 0: {value}")
            return [value]
        msg = [(name, payload)]
        dist.broadcast_object_list(msg, src=0, group=self.group)
        local = self._run(name, payload)
        gathered: list[Any] = [None] * self.world
        dist.gather_object(local, gathered, dst=0, group=self.group)
        failed = [f"rank {r}: {value}" for r, (ok, value) in enumerate(gathered) if not ok]
        if failed:
            raise WorkerError(f"command {name!r} failed on {len(failed)} rank(s): " + "; ".join(failed))
        return [value for _, value in gathered]

    def serve(self) -> None:
        """Run commands from rank 0 until STOP (ranks other than 0)."""
        if self.is_driver:
            raise RuntimeError("rank 0 drives; serve() is for the other ranks")
        while self.distributed:
            msg: list[Any] = [None]
            dist.broadcast_object_list(msg, src=0, group=self.group)
            name, payload = msg[0]
            if name == STOP:
                break
            local = self._run(name, payload) if name in self.handlers else (False, f"unknown command {name!r}")
            dist.gather_object(local, None, dst=0, group=self.group)
        self.stopped = True

    def begin(self) -> None:
        """Make a stopped driver usable again (every rank, before rank 0's next call and the
        others' next :meth:`serve`): a trainer evaluates at many steps over one driver."""
        self.stopped = False

    def stop(self) -> None:
        """Release the workers (rank 0; safe to call twice)."""
        if self.is_driver and self.distributed and not self.stopped:
            dist.broadcast_object_list([(STOP, None)], src=0, group=self.group)
        self.stopped = True

    def close(self) -> None:
        """Destroy the control group (every rank, after stop/serve returned)."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
