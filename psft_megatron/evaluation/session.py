"""Load a model checkpoint for scoring at a TP/PP/DP layout (every rank of the job calls this).

The checkpoint is a converted one or a trainer step folder (see :mod:`.inputs`); its
``psft_meta.json`` gives the architecture. Weights load at any layout through
``dist_checkpointing`` (:func:`~psft_megatron.checkpoint.model_checkpoint.load_model_checkpoint`).
Megatron's parallel state must be initialised for the layout first
(:func:`~psft_megatron.runtime.distributed.init_model_parallel`); several models (a checkpoint
and its reference) share it.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psft_megatron.checkpoint.model_checkpoint import load_model_checkpoint, model_config_of, read_meta
from psft_megatron.model.build import build_model
from psft_megatron.model.config import ModelConfig

__all__ = ["ScoringModel", "load_scoring_model", "scoring_model_from_chunks"]


@dataclass
class ScoringModel:
    """This rank's model chunks in eval mode, with what scoring needs to know about them."""

    chunks: list[Any]
    config: ModelConfig
    source: str  # the checkpoint folder, or a description of where the chunks came from
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.chunks[0].parameters()).device

    def release(self) -> None:
        """Drop the weights (e.g. before generating with an exported copy on the same device)."""
        self.chunks = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_scoring_model(ckpt: str | Path, parallel: Any, *, params_dtype: str = "fp32") -> ScoringModel:
    """Build the checkpoint's model for this rank at ``parallel`` (a ParallelConfig) and load its weights.

    Collective over every rank. ``params_dtype``: fp32 (CPU, exact comparisons) or bf16.
    """
    meta = read_meta(ckpt)
    cfg = dataclasses.replace(model_config_of(meta), params_dtype=params_dtype)
    built = build_model(cfg, parallel)
    load_model_checkpoint(built.chunks, ckpt)
    for chunk in built.chunks:
        chunk.eval()
    return ScoringModel(chunks=built.chunks, config=cfg, source=str(ckpt), meta=meta)


def scoring_model_from_chunks(chunks: list[Any], config: ModelConfig, source: str = "training model") -> ScoringModel:
    """Wrap chunks that already exist (the trainer's, possibly DDP-wrapped) for scoring."""
    return ScoringModel(chunks=list(chunks), config=config, source=source)
