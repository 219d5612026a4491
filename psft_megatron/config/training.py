"""Training, optimizer, checkpoint and logging sections of a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainingConfig:
    """Batches and schedule.

    One *global batch* gets one logp_old snapshot pass (PSFT), then is split into
    ``global_batch_size / mini_batch_size`` mini-batches, one optimizer step each.
    A mini-batch runs as micro-batches of ``micro_batch_size`` sequences on each of
    the DP ranks. Batch sizes count packed sequences of ``seq_length`` tokens.
    """

    seq_length: int = 2048
    global_batch_size: int = 64
    mini_batch_size: int = 8
    micro_batch_size: int = 1
    # Optimizer steps to run in total (warm-up steps included). Set either this or epochs.
    train_steps: int | None = None
    epochs: float | None = None
    # The first N optimizer steps are plain SFT (no snapshot pass), then the objective below.
    sft_warmup_steps: int = 0
    seed: int = 1234
    # Save a checkpoint and stop after this many optimizer steps *of this launch* (e.g. to fit
    # a SLURM time limit); the next launch of the same recipe resumes. None = run to the end.
    exit_after_steps: int | None = None
    # Validation: score the held-out split every N optimizer steps (0 = never), on its first
    # eval_rows packed rows (the same rows at every layout; None = the whole split).
    eval_interval: int = 0
    eval_rows: int | None = None

    def validate(self) -> None:
        for name in ("seq_length", "global_batch_size", "mini_batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.mini_batch_size:
            raise ValueError(
                f"training.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"training.mini_batch_size ({self.mini_batch_size}): each global batch splits into whole mini-batches"
            )
        if (self.train_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.train_steps and training.epochs")
        if self.train_steps is not None and self.train_steps < 1:
            raise ValueError(f"training.train_steps must be >= 1, got {self.train_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"training.epochs must be > 0, got {self.epochs}")
        if self.exit_after_steps is not None and self.exit_after_steps < 1:
            raise ValueError(f"training.exit_after_steps must be >= 1 or null, got {self.exit_after_steps}")
        if self.eval_rows is not None and self.eval_rows < 1:
            raise ValueError(f"training.eval_rows must be >= 1 or null (the whole held-out split), got {self.eval_rows}")
        if self.sft_warmup_steps < 0:
            raise ValueError(f"training.sft_warmup_steps must be >= 0, got {self.sft_warmup_steps}")

    def validate_for_dp(self, dp_size: int) -> None:
        """Divisibility that depends on the data-parallel size."""
        per_step = self.micro_batch_size * dp_size
        if self.mini_batch_size % per_step:
            raise ValueError(
                f"training.mini_batch_size ({self.mini_batch_size}) must be divisible by "
                f"micro_batch_size x data-parallel size = {self.micro_batch_size} x {dp_size} = {per_step}: "
                f"change mini_batch_size to a multiple of {per_step}, or micro_batch_size, or the number of processes"
            )

    @property
    def mini_batches_per_global_batch(self) -> int:
        return self.global_batch_size // self.mini_batch_size


@dataclass
class OptimConfig:
    """megatron-core optimizer (AdamW) and learning-rate schedule."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 0
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    # megatron's distributed optimizer (ZeRO-1). GPU only: it does not run on CPU.
    use_distributed_optimizer: bool = False

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ValueError(f"optimizer.clip_grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"optimizer.lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")


@dataclass
class CheckpointConfig:
    """Where checkpoints go, how often, and what the run starts from."""

    # Checkpoints are written to <run_dir>/checkpoints unless set.
    save_dir: str | None = None
    save_interval: int = 0  # optimizer steps between saves (0 = only at the end)
    keep_last: int = 2  # older step checkpoints are deleted (0 = keep all)
    save_at_end: bool = True
    # Resume from the latest checkpoint in save_dir when one exists.
    resume: bool = True
    # A converted HF checkpoint (tools/convert_hf_to_megatron.py) to start from.
    init_from: str | None = None
    # Fine-tuning random weights is almost always a mistake: refuse unless said explicitly.
    allow_random_init: bool = False

    def validate(self) -> None:
        if self.save_interval < 0:
            raise ValueError(f"checkpoint.save_interval must be >= 0, got {self.save_interval}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last must be >= 0, got {self.keep_last}")
        if self.init_from is None and not self.allow_random_init:
            raise ValueError(
                "no checkpoint.init_from is set, so the model would start from random weights: "
                "set checkpoint.init_from to a converted HF checkpoint (tools/convert_hf_to_megatron.py), "
                "or set checkpoint.allow_random_init: true if that is really what you want"
            )


@dataclass
class LoggingConfig:
    """Run directory, console and TensorBoard logging."""

    run_dir: str = "runs/psft"
    log_interval: int = 1  # optimizer steps between console lines
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class DistributedConfig:
    """torch.distributed settings."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: float = 30.0


