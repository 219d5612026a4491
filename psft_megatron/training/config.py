"""The ``training``, ``optimizer`` and ``logging`` sections of a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from psft_megatron.config.load import FieldError, check_choices
from psft_megatron.data.loader import check_batch_sizes
from psft_megatron.evaluation.inputs import EvalInputError
from psft_megatron.evaluation.tasks import MATH_SETS, data_key, resolve_task_names
from psft_megatron.training.trackers.config import MlflowConfig, WandbConfig


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
    # Passes over each global batch per snapshot (PPO's epochs): with 2, the k mini-batches
    # are trained in order, then again, all against the one snapshot's logp_old, so a
    # token's second update sees the ratio its own first update made. 1 = the paper's PSFT.
    passes_per_snapshot: int = 1
    seed: int = 1234
    # Save a checkpoint and stop after this many optimizer steps *of this launch* (e.g. to fit
    # a SLURM time limit); the next launch of the same recipe resumes. None = run to the end.
    exit_after_steps: int | None = None
    # Stop, saving a checkpoint, once this launch has run this long (a SLURM time limit minus
    # the time a save takes); the next launch resumes. None = no budget.
    exit_duration_minutes: float | None = None
    # Validation: score the held-out split every N optimizer steps (0 = never), on its first
    # eval_rows packed rows (the same rows at every layout and seed; None = the whole split).
    eval_interval: int = 0
    eval_rows: int | None = None
    # Also score them before the first step (step 0: the starting model), so every curve has
    # its starting point. Needs a held-out split.
    eval_at_start: bool = False
    # Also measure, on the same rows, the mean per-token KL(model || starting weights) over the
    # full vocabulary: how far training moved the model's predictions. Keeps a frozen copy of
    # the starting weights (shared with sft_kl's reference) and runs it on each evaluation.
    eval_kl_to_start: bool = False
    # lm-eval log-likelihood tasks scored on the training model at each evaluation (eval_interval,
    # eval_at_start), at the run's own layout, logged with the held-out numbers as "TASK/METRIC":
    # the names psft-evaluate --tasks takes (mmlu, mmlu_SUBJECT, mmlu_5shot..., truthfulqa_mc1,
    # truthfulqa_mc2; generation tasks such as gsm8k need psft-evaluate). Needs the eval extra.
    eval_tasks: list[str] = field(default_factory=list)
    # Their data: a folder laid out like ../shared/data (ood/mmlu/{dev,test}, ood/TruthfulQA.csv).
    eval_tasks_data_root: str | None = None
    # Documents per task (lm-eval's limit; None = all): a subset keeps each evaluation cheap.
    eval_tasks_limit: int | None = None
    # Rows per micro-batch per data-parallel replica when scoring them.
    eval_tasks_batch_size: int = 8
    # A step whose loss or gradient norm is non-finite is skipped (no update); this many in a
    # row stop the run with an error.
    max_skipped_steps: int = 3
    # Warn when a step's response NLL exceeds this multiple of its mean over the last
    # loss_spike_window steps (0 = off).
    loss_spike_factor: float = 3.0
    loss_spike_window: int = 20

    def validate(self) -> None:
        """Checks within this section; raises :class:`FieldError`."""
        if self.seq_length < 1:
            raise FieldError("training.seq_length", f"must be >= 1, got {self.seq_length}")
        check_batch_sizes(self.global_batch_size, self.mini_batch_size, self.micro_batch_size, section="training.")
        if (self.train_steps is None) == (self.epochs is None):
            raise FieldError("training.train_steps", "or training.epochs: set exactly one of the two")
        if self.train_steps is not None and self.train_steps < 1:
            raise FieldError("training.train_steps", f"must be >= 1, got {self.train_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise FieldError("training.epochs", f"must be > 0, got {self.epochs}")
        if self.exit_after_steps is not None and self.exit_after_steps < 1:
            raise FieldError("training.exit_after_steps", f"must be >= 1 or null, got {self.exit_after_steps}")
        if self.eval_interval < 0:
            raise FieldError("training.eval_interval", f"must be >= 0, got {self.eval_interval}")
        if self.eval_kl_to_start and not (self.eval_interval or self.eval_at_start):
            raise FieldError("training.eval_kl_to_start", "is true but nothing is evaluated: set "
                             "training.eval_interval (and/or eval_at_start)")
        self._validate_eval_tasks()
        if self.eval_rows is not None and self.eval_rows < 1:
            raise FieldError("training.eval_rows", f"must be >= 1 or null (the whole held-out split), got {self.eval_rows}")
        if self.exit_duration_minutes is not None and self.exit_duration_minutes <= 0:
            raise FieldError("training.exit_duration_minutes", f"must be > 0 or null, got {self.exit_duration_minutes}")
        if self.max_skipped_steps < 1:
            raise FieldError("training.max_skipped_steps", f"must be >= 1, got {self.max_skipped_steps}")
        if self.loss_spike_factor < 0 or (0 < self.loss_spike_factor <= 1):
            raise FieldError("training.loss_spike_factor", f"must be 0 (off) or > 1, got {self.loss_spike_factor}")
        if self.loss_spike_window < 1:
            raise FieldError("training.loss_spike_window", f"must be >= 1, got {self.loss_spike_window}")
        if self.sft_warmup_steps < 0:
            raise FieldError("training.sft_warmup_steps", f"must be >= 0, got {self.sft_warmup_steps}")
        if self.passes_per_snapshot < 1:
            raise FieldError("training.passes_per_snapshot", f"must be >= 1, got {self.passes_per_snapshot}")
        k = self.steps_per_global_batch
        # Checkpoints and the SFT->PSFT switch happen at global-batch boundaries, where no
        # snapshot log-probs are pending: that is what makes resume exact.
        for name in ("train_steps", "exit_after_steps", "sft_warmup_steps"):
            value = getattr(self, name)
            if value is not None and value % k:
                raise FieldError(
                    f"training.{name}",
                    f"({value}) must be a multiple of the optimizer steps per global batch (global_batch_size / "
                    f"mini_batch_size x passes_per_snapshot = {k}): runs switch phase, save and stop between "
                    f"global batches; use "
                    f"{value // k * k or k} or {(value // k + 1) * k}",
                )

    def _validate_eval_tasks(self) -> None:
        if not self.eval_tasks:
            return
        try:
            names = resolve_task_names(self.eval_tasks)
        except EvalInputError as e:
            raise FieldError("training.eval_tasks", "names an " + str(e).replace(" (--tasks)", "")) from None
        generation = [n for n in names if data_key(n) in MATH_SETS]
        if generation:
            raise FieldError("training.eval_tasks", f"lists generation tasks ({', '.join(generation)}), which do not "
                             "run during training (only log-likelihood ones: mmlu..., truthfulqa_mc1/mc2); score a "
                             "saved checkpoint with psft-evaluate --tasks instead")
        if not (self.eval_interval or self.eval_at_start):
            raise FieldError("training.eval_tasks", "are set but nothing is evaluated: set training.eval_interval "
                             "(and/or eval_at_start)")
        if not self.eval_tasks_data_root:
            raise FieldError("training.eval_tasks_data_root", "must name the tasks' data folder (laid out like "
                             "../shared/data: ood/mmlu, ood/TruthfulQA.csv)")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit < 1:
            raise FieldError("training.eval_tasks_limit", f"must be >= 1 or null (every document), got {self.eval_tasks_limit}")
        if self.eval_tasks_batch_size < 1:
            raise FieldError("training.eval_tasks_batch_size", f"must be >= 1, got {self.eval_tasks_batch_size}")

    def validate_for_dp(self, dp_size: int) -> None:
        """Divisibility that depends on the data-parallel size."""
        check_batch_sizes(self.global_batch_size, self.mini_batch_size, self.micro_batch_size, dp_size,
                          section="training.")

    @property
    def mini_batches_per_global_batch(self) -> int:
        """k: the mini-batches one global batch splits into."""
        return self.global_batch_size // self.mini_batch_size

    @property
    def steps_per_global_batch(self) -> int:
        """Optimizer steps per global batch: k mini-batches, each trained ``passes_per_snapshot`` times."""
        return self.mini_batches_per_global_batch * self.passes_per_snapshot

    @property
    def snapshot_mini_batches(self) -> int:
        """Mini-batches the snapshot pass scores, for an objective that needs one: all but the first
        (it runs on the snapshot weights and reuses its own log-probs), or all k with more than one
        pass (the first mini-batch's second pass needs them)."""
        k = self.mini_batches_per_global_batch
        return k if self.passes_per_snapshot > 1 else k - 1


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

    def __post_init__(self) -> None:
        check_choices(self)

    def validate(self) -> None:
        """Checks within this section; raises :class:`FieldError`."""
        if self.lr <= 0:
            raise FieldError("optimizer.lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise FieldError("optimizer.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise FieldError("optimizer.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise FieldError("optimizer.clip_grad", f"must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.lr_warmup_steps < 0:
            raise FieldError("optimizer.lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")


@dataclass
class LoggingConfig:
    """Run directory, console, TensorBoard and experiment-tracker logging."""

    run_dir: str = "runs/psft"
    log_interval: int = 1  # optimizer steps between console lines
    tensorboard: bool = True
    progress_bar: bool = True
    # Experiment trackers beside TensorBoard (off unless set; optional extras .[wandb] / .[mlflow]).
    wandb: WandbConfig | None = None
    mlflow: MlflowConfig | None = None

    def validate(self) -> None:
        if self.log_interval < 1:
            raise FieldError("logging.log_interval", f"must be >= 1, got {self.log_interval}")
        for tracker in (self.wandb, self.mlflow):
            if tracker is not None:
                tracker.validate()
