"""Qwen2 / Qwen2.5 (HF ``model_type: qwen2``, ``Qwen2ForCausalLM``).

Llama's tensors plus a bias on q, k and v (always, whatever the config says) and no other
linear bias; the small models tie their embeddings. ``use_sliding_window`` is not reproduced
(full causal attention, logged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psft_megatron.model.architectures import llama
from psft_megatron.model.architectures.base import Architecture
from psft_megatron.model.architectures.decoder import decoder_fields, decoder_hf_config, warn_sliding_window

if TYPE_CHECKING:
    from psft_megatron.model.config import ModelConfig

__all__ = ["ARCHITECTURE"]


def fields_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of a Qwen2 config.json."""
    fields = decoder_fields(cfg, "qwen2", qkv_bias=True)
    warn_sliding_window(cfg, used=bool(cfg.get("use_sliding_window", False)))
    return fields


def to_hf_config(model: "ModelConfig", dtype: str = "float32") -> dict[str, Any]:
    """A Qwen2 config.json for ``model``."""
    return decoder_hf_config(model, "qwen2", "Qwen2ForCausalLM", dtype)


ARCHITECTURE = Architecture(
    family="qwen2",
    model_types=("qwen2",),
    hf_class="Qwen2ForCausalLM",
    fields_from_hf=fields_from_hf,
    to_hf_config=to_hf_config,
    weights=llama.WEIGHTS,  # the same tensor names; the QKV bias is the table's "qkv_bias" row
)
