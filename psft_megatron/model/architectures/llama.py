"""Llama 2 / 3 / 3.1 / 3.2 (HF ``model_type: llama``, ``LlamaForCausalLM``).

No linear biases (``attention_bias`` would put one on o_proj too, which the Megatron model
does not build, so it is refused), optional Llama-3.1 RoPE scaling, optionally tied
embeddings. Its weight table is the one Qwen2 and Mistral reuse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psft_megatron.model.architectures.base import Architecture, WeightMapping
from psft_megatron.model.architectures.decoder import decoder_fields, decoder_hf_config, warn_sliding_window

if TYPE_CHECKING:
    from psft_megatron.model.config import ModelConfig

__all__ = ["ARCHITECTURE", "WEIGHTS"]

_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"

# Megatron names are TransformerEngine's module names (``linear_qkv.layer_norm_weight`` for the
# input norm); megatron's local spec saves its ``input_layernorm`` / ``pre_mlp_layernorm`` under
# the same dist-checkpoint keys (``sharded_state_dict_keys_map``), so one table serves both specs.
WEIGHTS = (
    WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight",
        ("model.layers.{layer}.input_layernorm.weight",),
    ),
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.weight",
        (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
        "qkv",
    ),
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.bias",
        (f"{_ATTN}.q_proj.bias", f"{_ATTN}.k_proj.bias", f"{_ATTN}.v_proj.bias"),
        "qkv",
        when="qkv_bias",
    ),
    WeightMapping("decoder.layers.{layer}.self_attention.linear_proj.weight", (f"{_ATTN}.o_proj.weight",)),
    WeightMapping(
        "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight",
        ("model.layers.{layer}.post_attention_layernorm.weight",),
    ),
    WeightMapping(
        "decoder.layers.{layer}.mlp.linear_fc1.weight", (f"{_MLP}.gate_proj.weight", f"{_MLP}.up_proj.weight"), "gate_up"
    ),
    WeightMapping("decoder.layers.{layer}.mlp.linear_fc2.weight", (f"{_MLP}.down_proj.weight",)),
    WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightMapping("output_layer.weight", ("lm_head.weight",), "vocab", when="not tie_word_embeddings"),
)


def fields_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of a Llama config.json."""
    if cfg.get("attention_bias", False):
        raise ValueError(
            "attention_bias=true (bias on q/k/v and o_proj) is not supported: only QKV bias (Qwen2 style) is"
        )
    fields = decoder_fields(cfg, "llama", qkv_bias=False)
    warn_sliding_window(cfg, used=bool(cfg.get("use_sliding_window", False)))
    return fields


def to_hf_config(model: "ModelConfig", dtype: str = "float32") -> dict[str, Any]:
    """A Llama config.json for ``model``."""
    return dict(decoder_hf_config(model, "llama", "LlamaForCausalLM", dtype), attention_bias=False, mlp_bias=False)


ARCHITECTURE = Architecture(
    family="llama",
    model_types=("llama",),
    hf_class="LlamaForCausalLM",
    fields_from_hf=fields_from_hf,
    to_hf_config=to_hf_config,
    weights=WEIGHTS,
)
