"""Run outputs: metrics.jsonl (one object per optimizer step), TensorBoard, experiment trackers
(W&B, MLflow: :mod:`psft_megatron.training.trackers`), console progress."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from psft_megatron.training.config import LoggingConfig
from psft_megatron.training.trackers import Tracker, build_trackers

log = logging.getLogger("psft")

# Fields every train record carries (metrics.jsonl contract, documented in the README).
TRAIN_FIELDS = (
    "step", "phase", "loss", "entropy", "clip_frac", "ratio_mean", "ratio_min", "ratio_max",
    "mean_logp", "grad_norm", "lr", "tokens", "tokens_per_s", "step_time_s",
)


def train_record(step: int, phase: str, stats: dict[str, float], grad_norm: float, lr: float,
                 tokens: int, seconds: float) -> dict[str, Any]:
    """The metrics.jsonl object of one optimizer step (from the last stage's reduced stats)."""
    return {
        "step": step,
        "phase": phase,
        "loss": stats["loss"],
        "entropy": stats["mean_entropy"],
        "clip_frac": stats["clip_fraction"],
        "ratio_mean": stats["ratio_mean"],
        "ratio_min": stats["ratio_min"],
        "ratio_max": stats["ratio_max"],
        "mean_logp": stats["mean_logp"],
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens": int(stats["token_count"]),
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "step_time_s": seconds,
    }


def _finite(x: Any) -> Any:
    # JSON has no NaN/inf: write them as null so every line stays valid JSON.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


class MetricsWriter:
    """Writes metrics on the logging rank only; every method is a no-op elsewhere.

    ``trackers`` get every record written here, the ``--plan`` summary (:meth:`log_plan`) and the
    launch's outcome (:meth:`finish`, after :meth:`close`: the outcome is known only once the
    loop has ended).
    """

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, tensorboard: bool = True,
                 log_interval: int = 1, progress_bar: bool = True, resumed_at: int = 0,
                 trackers: list[Tracker] | None = None) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self._start = time.monotonic()
        self._start_step: int | None = None
        self._file = None
        self._tb = None
        self._bar = None
        self.trackers: list[Tracker] = list(trackers or []) if enabled else []
        if not enabled:
            return
        # A live bar only on a terminal; batch logs (SLURM, CI) get the periodic lines alone.
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        # A resumed run continues the same file. Records written after the checkpoint it
        # resumes from (by the launch that crashed) are dropped: they are about to be redone.
        _drop_records_after(path, resumed_at)
        self._file = open(path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the crashed launch's events after the checkpoint.
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)
            except ImportError:  # tensorboard is a declared dependency; tolerate a trimmed env
                log.warning("tensorboard is not installed: no TensorBoard events")

    @classmethod
    def from_config(cls, logging_cfg: LoggingConfig, enabled: bool, total_steps: int,
                    resumed_at: int = 0, run_config: dict[str, Any] | None = None) -> MetricsWriter:
        """The writer of the ``logging`` section (``enabled`` on the logging rank only), with the
        trackers it sets started there (``run_config``: the resolved recipe, their run's config)."""
        run_dir = Path(logging_cfg.run_dir)
        trackers = []
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            trackers = build_trackers(logging_cfg.wandb, logging_cfg.mlflow, run_dir, run_config or {})
        return cls(run_dir, enabled, total_steps, logging_cfg.tensorboard, logging_cfg.log_interval,
                   logging_cfg.progress_bar, resumed_at=resumed_at, trackers=trackers)

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """Append one record (``step`` required) and mirror its numbers to TensorBoard."""
        if not self.enabled:
            return
        rec = {k: _finite(v) for k, v in record.items()}
        if prefix != "train":
            rec["split"] = prefix
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])
                elif isinstance(v, dict):  # per-layer values (expert load): one tag per layer
                    self._write_per_layer(f"{prefix}/{k}", v, record["step"])
        self._to_trackers("log", rec, prefix)

    def log_plan(self, summary: dict[str, Any], text: str) -> None:
        """Give the trackers this launch's ``--plan`` figures and report."""
        self._to_trackers("log_plan", summary, text)

    def finish(self, status: str, **fields: Any) -> None:
        """Give the trackers how the launch ended (run_status.json's ``status`` and fields) and close them."""
        self._to_trackers("finish", status, fields)
        self.trackers = []

    def _to_trackers(self, method: str, *args: Any) -> None:
        # A tracker that fails (its server down, a full disk) must not stop a training run:
        # metrics.jsonl keeps every record, so that tracker is dropped with one warning.
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:
                log.warning("%s failed (%s: %s); it gets no more records in this launch (metrics.jsonl has them)",
                            type(tracker).__name__, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.trackers.remove(tracker)

    def _write_per_layer(self, tag: str, values: dict[str, Any], step: int) -> None:
        """A number per key as a scalar ``tag/layer_K``; a list per key (each expert's share) as a
        histogram ``tag/layer_K`` (a collapsing router shows as mass at 0 and one large share)."""
        import numpy as np

        for key, v in values.items():
            name = f"{tag}/layer_{int(key):03d}" if str(key).isdigit() else f"{tag}/{key}"
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(name, v, step)
            elif isinstance(v, list) and v:
                self._tb.add_histogram(name, np.asarray(v, dtype=np.float64), step)

    def progress(self, record: dict[str, Any]) -> None:
        """A console line with throughput and ETA every ``log_interval`` steps."""
        if not self.enabled:
            return
        step = record["step"]
        if self._start_step is None:
            self._start_step = step - 1
            self._start = time.monotonic() - record.get("step_time_s", 0.0)
            if self._bar is not None:
                self._bar.update(step - 1 - self._bar.n)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(phase=record["phase"], loss=f"{record['loss']:.4f}",
                                  entropy=f"{record['entropy']:.3f}", clip=f"{record['clip_frac']:.3f}", refresh=False)
        if step % self.log_interval and step != self.total_steps:
            return
        done = step - self._start_step
        elapsed = time.monotonic() - self._start
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        message = (
            "step %d/%d [%s] loss %.4f entropy %.4f clip %.3f ratio %.3f/%.3f/%.3f grad %.3f lr %.3g | "
            "%.0f tok/s %.2fs/step ETA %s"
        ) % (
            step, self.total_steps, record["phase"], record["loss"], record["entropy"], record["clip_frac"],
            record["ratio_min"], record["ratio_mean"], record["ratio_max"], record["grad_norm"], record["lr"],
            record["tokens_per_s"], record["step_time_s"], _fmt_seconds(eta),
        )
        if self._bar is not None:
            self._bar.write(message)  # above the bar, not through it
        else:
            log.info(message)

    def source_totals(self, step: int, totals: dict[str, int]) -> None:
        """A console line with the response tokens trained per source since the run began (and
        their shares), on the ``log_interval`` of :meth:`progress`; nothing with one source."""
        if not self.enabled or len(totals) < 2 or (step % self.log_interval and step != self.total_steps):
            return
        all_tokens = sum(totals.values()) or 1
        parts = ", ".join(f"{name} {n} ({100 * n / all_tokens:.1f}%)" for name, n in totals.items())
        message = f"step {step}: response tokens trained per source so far: {parts}"
        if self._bar is not None:
            self._bar.write(message)
        else:
            log.info(message)

    def close(self) -> None:
        """Close metrics.jsonl, TensorBoard and the bar (the trackers stay open for :meth:`finish`)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _drop_records_after(path: Path, step: int) -> None:
    """Keep only the records of ``path`` with ``step <= step`` (atomically rewritten)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
