"""When a launch stops before the run's last step: a step budget, a wall-clock budget, or a signal.

SLURM sends SIGTERM at preemption and at the time limit, and (with ``--signal``) SIGUSR1
ahead of it. Either signal, on any rank, only sets a flag: the step in flight finishes,
every rank learns of it at the next step boundary (one all-reduce per step), and the run
saves and exits with :data:`EXIT_PREEMPTED`. Repeated signals change nothing: under SLURM
a worker gets SIGTERM more than once (from slurmstepd directly, and forwarded by torchrun),
and the save must not be cut short by the second copy.

For tests only, :data:`TEST_SIGNAL_ENV` makes a rank send itself the real signal as a chosen
step begins (:class:`SelfSignalForTests`), so a test knows where the stop lands instead of
racing a signal sent from outside against the run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Mapping

import torch
import torch.distributed as dist

# The exit status of a launch that stopped early on a signal or its time budget, after saving.
from psft_megatron.errors import EXIT_PREEMPTED
from psft_megatron.training.config import TrainingConfig

log = logging.getLogger("psft")

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "SelfSignalForTests", "StopPolicy", "TEST_SIGNAL_ENV"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# TEST ONLY. "N" or "N:SIGNAME" (default SIGTERM): this rank sends itself that signal with
# os.kill as optimizer step N (1-based) begins; the step then runs to its end and the launch
# stops after it. Never set it outside tests.
TEST_SIGNAL_ENV = "PSFT_TEST_SIGNAL_AT_STEP"


@dataclass(frozen=True)
class SelfSignalForTests:
    """Test only: a real stop signal this rank sends itself as step :attr:`step` begins.

    It goes through the real handler (``os.kill`` of this process), so a test of preemption
    exercises everything a scheduler's signal does, at a step the test chose: a signal sent
    from outside lands wherever the run happens to be (on a global-batch boundary, or after
    the run's end), and such a test fails by chance.
    """

    step: int
    signum: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SelfSignalForTests | None:
        """The hook :data:`TEST_SIGNAL_ENV` asks for (None when unset); a bad value raises ValueError."""
        value = environ.get(TEST_SIGNAL_ENV, "").strip()
        if not value:
            return None
        step, _, name = value.partition(":")
        name = name.strip().upper() or "SIGTERM"
        known = {s.name: s for s in STOP_SIGNALS}
        if not step.strip().isdigit() or int(step) < 1 or name not in known:
            raise ValueError(f"{TEST_SIGNAL_ENV}={value!r}: expected STEP or STEP:SIGNAL with STEP >= 1 and "
                             f"SIGNAL one of {sorted(known)} (a test-only hook: unset it)")
        return cls(int(step), int(known[name]))

    def send_if_due(self, step: int) -> None:
        """Send the signal to this process if optimizer step ``step`` is the chosen one."""
        if step == self.step:
            log.warning("%s: sending %s to this rank as step %d begins (test hook)", TEST_SIGNAL_ENV,
                        signal.Signals(self.signum).name, step)
            os.kill(os.getpid(), self.signum)


class StopPolicy:
    """Decides, collectively, whether the launch stops after the current optimizer step.

    ``exit_after_steps`` counts this launch's steps and is honoured between global batches;
    signals and ``exit_duration_minutes`` are honoured after any step (the checkpoint then
    records the position inside the global batch).
    """

    def __init__(self, start_step: int, exit_after_steps: int | None = None,
                 exit_duration_minutes: float | None = None, device: torch.device | str = "cpu",
                 self_signal: SelfSignalForTests | None = None) -> None:
        self.start_step = start_step
        self.exit_after_steps = exit_after_steps
        self.exit_duration_s = exit_duration_minutes * 60 if exit_duration_minutes else None
        self.device = device
        self.self_signal = self_signal
        self._started = time.monotonic()
        self._signal: int | None = None
        self._previous: dict[int, object] = {}
        self.reason: str | None = None
        self.preempted = False

    @classmethod
    def from_config(cls, training: TrainingConfig, start_step: int, device: torch.device | str = "cpu",
                    environ: Mapping[str, str] = os.environ) -> StopPolicy:
        """The policy of ``training`` for a launch that starts after step ``start_step`` (and the
        test-only self-signal, if :data:`TEST_SIGNAL_ENV` is set)."""
        return cls(start_step, training.exit_after_steps, training.exit_duration_minutes, device,
                   self_signal=SelfSignalForTests.from_env(environ))

    # ---- signals ---------------------------------------------------------------
    def step_begins(self, step: int) -> None:
        """Called as optimizer step ``step`` begins; only the test hook acts on it."""
        if self.self_signal is not None:
            self.self_signal.send_if_due(step)

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
