"""When a launch stops before the run's last step: a step budget, a wall-clock budget, or a signal.

SLURM sends SIGTERM at preemption and at the time limit, and (with ``--signal``) SIGUSR1
ahead of it. Either signal, on any rank, only sets a flag: the step in flight finishes,
every rank learns of it at the next step boundary (one all-reduce per step), and the run
saves and exits with :data:`EXIT_PREEMPTED`. Repeated signals change nothing: under SLURM
a worker gets SIGTERM more than once (from slurmstepd directly, and forwarded by torchrun),
and the save must not be cut short by the second copy.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

# The exit status of a launch that stopped early on a signal or its time budget, after saving.
from psft_megatron.errors import EXIT_PREEMPTED

log = logging.getLogger("psft")

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "StopPolicy"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopPolicy:
    """Decides, collectively, whether the launch stops after the current optimizer step.

    ``exit_after_steps`` counts this launch's steps and is honoured between global batches;
    signals and ``exit_duration_minutes`` are honoured after any step (the checkpoint then
    records the position inside the global batch).
    """

    def __init__(self, start_step: int, exit_after_steps: int | None = None,
                 exit_duration_minutes: float | None = None, device: torch.device | str = "cpu") -> None:
        self.start_step = start_step
        self.exit_after_steps = exit_after_steps
        self.exit_duration_s = exit_duration_minutes * 60 if exit_duration_minutes else None
        self.device = device
        self._started = time.monotonic()
        self._signal: int | None = None
        self._previous: dict[int, object] = {}
        self.reason: str | None = None
        self.preempted = False

    # ---- signals ---------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """Catch :data:`STOP_SIGNALS` (main thread only; a no-op elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:  # already stopping: repeats (slurmstepd, torchrun) change nothing
            return
        self._signal = signum
        log.warning("received %s: finishing the current optimizer step, then saving and exiting",
                    signal.Signals(signum).name)

    # ---- the decision ------------------------------------------------------------
    def should_stop(self, step: int, at_global_batch_boundary: bool) -> bool:
        """Collective (every rank, after every optimizer step): stop now? Sets :attr:`reason`."""
        over_time = self.exit_duration_s is not None and time.monotonic() - self._started >= self.exit_duration_s
        # The signal's number travels (MAX over ranks), so every rank can name it.
        flags = torch.tensor([float(self._signal or 0), 1.0 if over_time else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            self.reason, self.preempted = f"received {signal.Signals(int(flags[0])).name}", True
        elif flags[1] > 0:
            self.reason, self.preempted = f"training.exit_duration_minutes={self.exit_duration_s / 60:g}", True
        elif (at_global_batch_boundary and self.exit_after_steps is not None
              and step - self.start_step >= self.exit_after_steps):
            self.reason = f"training.exit_after_steps={self.exit_after_steps}"
        return self.reason is not None
