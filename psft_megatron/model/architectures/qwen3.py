"""Qwen3 dense, 0.6B to 32B (HF ``model_type: qwen3``, ``Qwen3ForCausalLM``).

Llama's tensors plus a per-head RMSNorm on queries and keys before RoPE (``q_norm`` /
``k_norm``, ``[head_dim]`` each: megatron's ``qk_layernorm``), an explicit ``head_dim``
(128 on every size, while hidden / heads differ: 4096 / 32 = 128 on the 8B but 1024 / 16 = 64
on the 0.6B), no linear bias, tied embeddings on the small sizes (0.6B to 4B).
``attention_bias: true`` would put a bias on q, k, v and o_proj, which the Megatron model does
not build, so it is refused. ``use_sliding_window`` is not reproduced (full causal attention, logged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psft_megatron.model.architectures import llama
from psft_megatron.model.architectures.base import Architecture, WeightMapping
from psft_megatron.model.architectures.decoder import decoder_fields, decoder_hf_config, warn_sliding_window

if TYPE_CHECKING:
    from psft_megatron.model.config import ModelConfig

__all__ = ["ARCHITECTURE", "QK_NORMS", "attention_fields"]

# transformers' Qwen3Config default, used when a config.json leaves head_dim out.
DEFAULT_HEAD_DIM = 128

_ATTN = "model.layers.{layer}.self_attn"

# The per-head query/key norms: megatron's q_layernorm / k_layernorm, the same key under the local
# and TransformerEngine specs.
QK_NORMS = (
    WeightMapping("decoder.layers.{layer}.self_attention.q_layernorm.weight", (f"{_ATTN}.q_norm.weight",)),
    WeightMapping("decoder.layers.{layer}.self_attention.k_layernorm.weight", (f"{_ATTN}.k_norm.weight",)),
)


def attention_fields(cfg: dict[str, Any], family: str, default_head_dim: int | None) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of a Qwen3-style config.json (dense or MoE): Llama's decoder
    with query/key norms and no bias. ``default_head_dim``: the head size transformers assumes when
    the file has none (None: hidden / heads)."""
    if cfg.get("attention_bias", False):
        raise ValueError(
            "attention_bias=true (bias on q/k/v and o_proj) is not supported: only QKV bias (Qwen2 style) is"
        )
    if "head_dim" not in cfg and default_head_dim is not None:
        cfg = dict(cfg, head_dim=default_head_dim)
    fields = decoder_fields(cfg, family, qkv_bias=False)
    fields["qk_layernorm"] = True
    warn_sliding_window(cfg, used=bool(cfg.get("use_sliding_window", False)))
    return fields


def fields_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of a Qwen3 config.json."""
    return attention_fields(cfg, "qwen3", DEFAULT_HEAD_DIM)


def to_hf_config(model: "ModelConfig", dtype: str = "float32") -> dict[str, Any]:
    """A Qwen3 config.json for ``model`` (head_dim always written: transformers' default is 128)."""
    return dict(decoder_hf_config(model, "qwen3", "Qwen3ForCausalLM", dtype), attention_bias=False,
                use_sliding_window=False, sliding_window=None)


ARCHITECTURE = Architecture(
    family="qwen3",
    model_types=("qwen3",),
    hf_class="Qwen3ForCausalLM",
    fields_from_hf=fields_from_hf,
    to_hf_config=to_hf_config,
    weights=llama.WEIGHTS + QK_NORMS,  # llama's "qkv_bias" row never applies: Qwen3 has no bias
)
