"""Read a Hugging Face ``config.json`` into ModelConfig fields, and write one back.

The reading of the file is here (:func:`load_hf_config_dict`, the one function that opens
an HF config); what its fields mean is the family's business: the registry in
:mod:`psft_megatron.model.architectures` picks the family by ``model_type`` and its module
maps the fields. An unknown model type is refused in one line naming the supported ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psft_megatron.model.architectures import architecture, architecture_of_hf

if TYPE_CHECKING:  # model.config imports this module; the reader returns plain fields
    from psft_megatron.model.config import ModelConfig

__all__ = ["load_hf_config_dict", "model_fields_from_hf", "hf_config_from_model_config"]


def load_hf_config_dict(config_json: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The parsed config: a dict as is, a path to config.json, or a folder holding one."""
    if isinstance(config_json, dict):
        return dict(config_json)
    path = Path(config_json)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config.json at {path}")
    with open(path) as f:
        return json.load(f)


def model_fields_from_hf(config_json: str | Path | dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments from an HF config (dict, config.json path, or model folder).

    Use :meth:`psft_megatron.model.config.ModelConfig.from_hf` for the config itself.
    Raises ValueError for an unknown architecture or a feature that would not convert exactly.
    """
    cfg = load_hf_config_dict(config_json)
    return architecture_of_hf(cfg).fields_from_hf(cfg)


def hf_config_from_model_config(model: "ModelConfig", dtype: str = "float32") -> dict[str, Any]:
    """A minimal transformers-loadable config.json for ``model`` (used when no original config travelled)."""
    return architecture(model.family).to_hf_config(model, dtype)
