"""The ``checkpoint`` section of a recipe: where checkpoints go, how often, and what the run starts from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psft_megatron.config.load import FieldError, check_choices


@dataclass
class CheckpointConfig:
    """Where checkpoints go, how often, and what the run starts from."""

    # Checkpoints are written to <run_dir>/checkpoints unless set.
    save_dir: str | None = None
    save_interval: int = 0  # optimizer steps between saves (0 = only at the end)
    keep_last: int = 2  # older step checkpoints are deleted (0 = keep all)
    # ... except every checkpoint whose step is a multiple of this (0 = none): kept for later
    # evaluation of the run's course while keep_last bounds the disk used for resuming.
    keep_every: int = 0
    # Those kept checkpoints keep only the model (psft_meta.json + model/: evaluation, conversion and
    # init_from read it) once keep_last no longer covers them, dropping the optimizer state, about two
    # thirds of each; they can then no longer be resumed from.
    keep_every_weights_only: bool = False
    save_at_end: bool = True
    # Resume from the latest checkpoint in save_dir when one exists.
    resume: bool = True
    # A converted HF checkpoint (tools/convert_hf_to_megatron.py) to start from.
    init_from: str | None = None
    # Fine-tuning random weights is almost always a mistake: refuse unless said explicitly.
    allow_random_init: bool = False
    # Also write an HF folder (safetensors, config.json, tokenizer) of every N-th interval
    # checkpoint and of the final one, step_NNNNNN_hf/ beside step_NNNNNN/, exported from the saved
    # checkpoint by a background process while training goes on (0 = never). keep_last prunes it
    # with its checkpoint; a failed export is a warning, the checkpoint stays. See checkpoint/hf_copy.py.
    save_hf: int = 0
    save_hf_dir: str | None = None  # the folder the HF copies go in (default: beside the checkpoints)
    save_hf_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the model's HF dtype

    def __post_init__(self) -> None:
        check_choices(self)

    def validate(self, steps_per_global_batch: int = 1) -> None:
        """Checks within this section (``steps_per_global_batch``: saves fall between global batches)."""
        if self.save_interval < 0:
            raise FieldError("checkpoint.save_interval", f"must be >= 0, got {self.save_interval}")
        if self.save_interval % steps_per_global_batch:
            raise FieldError(
                "checkpoint.save_interval",
                f"({self.save_interval}) must be a multiple of the optimizer steps per global batch "
                f"(global_batch_size / mini_batch_size x training.passes_per_snapshot) = "
                f"{steps_per_global_batch}: checkpoints are taken between global batches",
            )
        if self.keep_last < 0:
            raise FieldError("checkpoint.keep_last", f"must be >= 0, got {self.keep_last}")
        if self.keep_every < 0 or (self.keep_every and self.save_interval and self.keep_every % self.save_interval):
            raise FieldError("checkpoint.keep_every", f"({self.keep_every}) must be 0 or a multiple of "
                             f"checkpoint.save_interval ({self.save_interval}): only saved steps can be kept")
        if self.keep_every_weights_only and not (self.keep_every and self.keep_last):
            raise FieldError("checkpoint.keep_every_weights_only", "is set, but no checkpoint is kept by "
                             f"checkpoint.keep_every ({self.keep_every}) outside checkpoint.keep_last "
                             f"({self.keep_last}; 0 keeps every checkpoint whole): set both, or drop this option")
        if self.save_hf < 0:
            raise FieldError("checkpoint.save_hf", f"must be >= 0 (0 = no HF copies), got {self.save_hf}")
        if self.save_hf and not (self.save_interval or self.save_at_end):
            raise FieldError("checkpoint.save_hf", "is set but no checkpoint is saved at an interval or at the end "
                             "(checkpoint.save_interval: 0, save_at_end: false): set one of them, or save_hf: 0")
        if self.init_from is None and not self.allow_random_init:
            raise FieldError(
                "checkpoint.init_from",
                "is not set, so the model would start from random weights: "
                "set checkpoint.init_from to a converted HF checkpoint (tools/convert_hf_to_megatron.py), "
                "or set checkpoint.allow_random_init: true if that is really what you want",
            )
