"""HF copies of saved checkpoints (``checkpoint.save_hf``), exported in a background process.

After a chosen checkpoint is complete on disk (renamed, ``latest`` written), rank 0 starts
``python -m psft_megatron.cli.export_hf`` (``psft-export-hf``: the streaming exporter of
``conversion/megatron_to_hf.py``) on it, writing ``step_NNNNNN_hf/`` beside ``step_NNNNNN/``
(or in ``checkpoint.save_hf_dir``), and returns: training goes on while it runs. Why a process
of its own rather than the training ranks:

- the exporter reads the dist checkpoint back layer group by layer group, so no process ever
  holds the whole model (rank 0 does not gather it) and the training ranks do nothing at all;
- it needs a single-process megatron state (one gloo rank, TP=PP=1), which cannot share a
  process with the job's parallel state; it runs on the CPU (no GPU memory taken);
- whatever happens to it (an unwritable folder, a full disk, a crash) cannot touch the run or
  the checkpoint it reads: it writes into ``step_NNNNNN_hf.partial`` and renames that when
  complete, so a reader (vLLM, an evaluation pipeline) never sees a half-written folder.

One export at a time: the next save first waits for the previous export, so ``keep_last``
pruning never removes a checkpoint an export is reading; then HF copies whose checkpoint was
pruned are removed with it. The end of a launch waits for the last export, except after a
preemption (the job has little time left; the copy is not needed to resume). A failed export
is one warning line (with the exporter's own error); the run and its checkpoints go on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psft_megatron.checkpoint.config import CheckpointConfig
from psft_megatron.checkpoint.model_checkpoint import global_rank

log = logging.getLogger(__name__)

__all__ = ["HfCopy", "hf_copy_name"]

# torchrun's variables: the exporter must start its own one-process group, not join the job's.
_JOB_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                  "TORCHELASTIC_ERROR_FILE", "PSFT_TEST_SIGNAL_AT_STEP")


def hf_copy_name(step_dir: str | Path) -> str:
    """``step_000100`` -> ``step_000100_hf``: the HF copy's folder name."""
    return Path(step_dir).name + "_hf"


@dataclass
class _Export:
    step: int
    checkpoint: Path
    out: Path
    process: subprocess.Popen
    log_path: Path
    started: float


class HfCopy:
    """Starts, waits for and prunes the HF copies of one run's checkpoints (acts on rank 0 only)."""

    def __init__(self, every: int, save_interval: int, folder: Path | None, dtype: str = "auto") -> None:
        self.every = every
        self.save_interval = save_interval
        self.folder = folder  # None: beside each checkpoint
        self.dtype = dtype
        self.results: list[dict[str, Any]] = []  # one per finished export: step, ok, seconds, out, error
        self._running: _Export | None = None

    @classmethod
    def from_config(cls, cfg: CheckpointConfig) -> HfCopy:
        """The HF copies of the ``checkpoint`` section (``save_hf``, ``save_hf_dir``, ``save_hf_dtype``)."""
        return cls(cfg.save_hf, cfg.save_interval, Path(cfg.save_hf_dir) if cfg.save_hf_dir else None,
                   cfg.save_hf_dtype)

    @property
    def active(self) -> bool:
        return self.every > 0 and global_rank() == 0

    def wanted(self, step: int, final: bool) -> bool:
        """Whether the checkpoint of ``step`` gets an HF copy: every ``every``-th interval checkpoint
        (steps that are multiples of ``every x save_interval``) and the final one."""
        if self.every <= 0:
            return False
        return final or bool(self.save_interval and step % (self.save_interval * self.every) == 0)

    def out_dir(self, checkpoint: Path) -> Path:
        """Where the HF copy of ``checkpoint`` goes."""
        return (self.folder or checkpoint.parent) / hf_copy_name(checkpoint)

    def after_save(self, checkpoint: Path, step: int, final: bool) -> None:
        """After checkpoint ``step`` is complete: prune HF copies whose checkpoint is gone, then start
        this one's export when it is wanted. Call :meth:`wait` before the save."""
        if not self.active:
            return
        self.prune(checkpoint.parent)
        if self.wanted(step, final):
            self._start(checkpoint, step)

    def _start(self, checkpoint: Path, step: int) -> None:
        out = self.out_dir(checkpoint)
        env = {k: v for k, v in os.environ.items() if k not in _JOB_VARIABLES}
        env["CUDA_VISIBLE_DEVICES"] = ""  # streams on the CPU: no GPU memory taken from the training ranks
        fd, log_name = tempfile.mkstemp(prefix=f"psft_hf_copy_{step:06d}_", suffix=".log")
        command = [sys.executable, "-m", "psft_megatron.cli.export_hf", "--ckpt", str(checkpoint), "--out", str(out),
                   "--dtype", self.dtype, "--overwrite"]
        try:
            with os.fdopen(fd, "w") as sink:
                # Its own session: a signal meant for the training job's process group does not cut it off
                # mid-write (it writes into .partial anyway).
                process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            Path(log_name).unlink(missing_ok=True)
            self._record(step, out, ok=False, seconds=0.0, error=f"could not start the exporter: {e}")
            return
        self._running = _Export(step, checkpoint, out, process, Path(log_name), time.monotonic())
        log.info("HF copy of %s: exporting to %s in the background (pid %d)", checkpoint.name, out, process.pid)

    def wait(self, before: str = "the next save") -> None:
        """Wait for the export in flight, if any, and report how it ended."""
        job, self._running = self._running, None
        if job is None:
            return
        waited = time.monotonic()
        code = job.process.wait()
        seconds = time.monotonic() - job.started
        if time.monotonic() - waited > 1.0:
            log.info("waited %.1f s for the HF copy of %s before %s", time.monotonic() - waited,
                     job.checkpoint.name, before)
        output = job.log_path.read_text(errors="replace") if job.log_path.is_file() else ""
        job.log_path.unlink(missing_ok=True)
        if code == 0 and (job.out / "config.json").is_file():
            report = _last_json(output)
            self._record(job.step, job.out, ok=True, seconds=seconds, export_seconds=report.get("seconds"))
        else:
            self._record(job.step, job.out, ok=False, seconds=seconds, error=f"exit {code}: {_error_line(output)}")

    def _record(self, step: int, out: Path, ok: bool, seconds: float, **extra: Any) -> None:
        result = {"step": step, "ok": ok, "out": str(out), "seconds": seconds, **extra}
        self.results.append(result)
        if ok:
            log.info("HF copy of step %d written to %s in %.1f s", step, out, seconds)
        else:
            log.warning("HF copy of step %d to %s failed (%s); the checkpoint itself is intact and training goes on",
                        step, out, result["error"])

    def prune(self, save_dir: Path) -> None:
        """Remove the HF copies whose checkpoint is no longer in ``save_dir`` (pruned by ``keep_last``),
        and the partial folders of exports that were killed (none is running when this is called)."""
        if not self.active or self._running is not None:
            return
        folder = self.folder or save_dir
        for copy in folder.glob("step_*_hf"):
            if not (save_dir / copy.name.removesuffix("_hf")).is_dir():
                shutil.rmtree(copy, ignore_errors=True)
        for partial in folder.glob("step_*_hf.partial"):
            shutil.rmtree(partial, ignore_errors=True)

    def finish(self, wait: bool) -> None:
        """End of the launch: wait for the export in flight (``wait``), or leave it running on its own."""
        if self._running is None:
            return
        if wait:
            self.wait(before="the end of the launch")
        else:
            log.info("HF copy of %s is still being written by pid %d; it appears as %s when complete",
                     self._running.checkpoint.name, self._running.process.pid, self._running.out)
            self._running = None


def _last_json(output: str) -> dict[str, Any]:
    """The exporter's report: the last line of its output that is a JSON object."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def _error_line(output: str) -> str:
    """The exporter's one ``error:`` line (its exit status 2), else the last line of its output."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]
