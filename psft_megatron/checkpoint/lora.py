"""LoRA checkpoints: the adapters alone, with a pointer to the full checkpoint they adapt.

A model checkpoint (:mod:`psft_megatron.checkpoint.model_checkpoint`) of a model built with
``model.lora`` holds only the adapter tensors in ``model/`` (and, for a training checkpoint, only
their optimizer state: the base has none); its ``psft_meta.json`` keeps the whole ``model`` config
(``lora`` included) and ``lora_base``, the absolute path of the full checkpoint the adapters were
trained on. Every reader of model checkpoints follows it: loading a LoRA checkpoint loads the
base's weights from there, then the adapters. A LoRA run started from a LoRA checkpoint
(``checkpoint.init_from``) trains on the same base, so pointers never chain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psft_megatron.errors import UserError

__all__ = ["LORA_BASE", "LoRACheckpointError", "base_checkpoint", "is_lora_meta", "lora_base_for"]

LORA_BASE = "lora_base"  # psft_meta.json key: the base checkpoint's absolute path


class LoRACheckpointError(UserError, RuntimeError):
    """A LoRA checkpoint whose base cannot be used."""


def is_lora_meta(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``psft_meta.json`` describes an adapters-only (LoRA) checkpoint."""
    return bool(meta.get(LORA_BASE))


def base_checkpoint(ckpt: str | Path, meta: dict[str, Any], override: str | Path | None = None) -> Path:
    """The full checkpoint under LoRA checkpoint ``ckpt`` (``override`` when given, e.g. after the
    base was moved); raises :class:`LoRACheckpointError` naming both when it is gone."""
    base = Path(override) if override else Path(meta[LORA_BASE])
    if not base.is_dir():
        raise LoRACheckpointError(
            f"{ckpt} holds LoRA adapters over the base checkpoint {base}, which does not exist"
            + ("" if override else " (moved? pass the base's new place, e.g. --base for the tools)")
        )
    return base


def lora_base_for(init_from: str | Path, meta: dict[str, Any]) -> Path:
    """The base a LoRA run started from ``init_from`` (whose ``psft_meta.json`` is ``meta``) trains on:
    ``init_from`` itself when it is a full checkpoint, else the base that LoRA checkpoint points at (absolute)."""
    if is_lora_meta(meta):
        return base_checkpoint(init_from, meta).resolve()
    return Path(init_from).resolve()
