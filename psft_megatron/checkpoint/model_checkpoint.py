"""Model weights as a megatron dist checkpoint: ``<dir>/model/`` plus ``<dir>/psft_meta.json``.

One format for everything that holds weights: the HF converter's output, the trainer's
checkpoints (which add optimizer and train state beside it), and what the exporter and
scorer read. The weights are megatron ``ShardedTensor``s with global keys, so they load
at any TP/PP/VP layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

MODEL_SUBDIR = "model"
META_FILE = "psft_meta.json"


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(model: list) -> dict[str, Any]:
    """All chunks' sharded state dicts, nested per chunk (storage keys are global, not these)."""
    if len(model) == 1:
        return {"model": _unwrap(model[0]).sharded_state_dict()}
    return {"model": {f"chunk{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model)}}


def save_model_weights(model: list, directory: str | Path, meta: dict[str, Any]) -> None:
    """Save the weights of ``model`` (all ranks call this) and, on rank 0, the meta file."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    target = directory / MODEL_SUBDIR
    if not dist.is_initialized() or dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model), str(target))


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a psft-megatron checkpoint: {META_FILE} is missing")
    return json.loads(path.read_text())


def load_model_weights(model: list, directory: str | Path, strict: bool = True) -> None:
    """Load weights saved by :func:`save_model_weights` (at any layout) into ``model``."""
    from megatron.core import dist_checkpointing

    target = Path(directory) / MODEL_SUBDIR
    if not target.is_dir():
        raise FileNotFoundError(
            f"{directory} holds no model weights ({MODEL_SUBDIR}/ is missing): pass a directory written by "
            "tools/convert_hf_to_megatron.py or a trainer checkpoint step_NNNNNN/"
        )
    loaded = dist_checkpointing.load(model_sharded_state_dict(model), str(target))["model"]
    if len(model) == 1:
        _unwrap(model[0]).load_state_dict(loaded, strict=strict)
    else:
        for i, chunk in enumerate(model):
            _unwrap(chunk).load_state_dict(loaded[f"chunk{i}"], strict=strict)
