"""Mistral (HF ``model_type: mistral``, ``MistralForCausalLM``).

Llama's tensors and config fields. Its sliding-window attention is not reproduced: attention
is full causal, identical to HF for sequences up to the window (logged when a window is set).
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
    """``ModelConfig`` keyword arguments of a Mistral config.json."""
    fields = decoder_fields(cfg, "mistral", qkv_bias=bool(cfg.get("attention_bias", False)))
    warn_sliding_window(cfg, used=True)
    return fields


def to_hf_config(model: "ModelConfig", dtype: str = "float32") -> dict[str, Any]:
    """A Mistral config.json for ``model`` (no sliding window: the converted model has none)."""
    return dict(decoder_hf_config(model, "mistral", "MistralForCausalLM", dtype), sliding_window=None)


ARCHITECTURE = Architecture(
    family="mistral",
    model_types=("mistral",),
    hf_class="MistralForCausalLM",
    fields_from_hf=fields_from_hf,
    to_hf_config=to_hf_config,
    weights=llama.WEIGHTS,
)
