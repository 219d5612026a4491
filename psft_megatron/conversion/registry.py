"""Declarative HF <-> Megatron weight mappings, one small table per architecture.

Megatron names are the dist-checkpoint names with the layer index spelled out
(``decoder.layers.{layer}.…``): the checkpoint key of a layer tensor is that name
without the index, which becomes the tensor's first (stacked-layer) axis. These
are TransformerEngine's module names (``linear_qkv.layer_norm_weight`` for the
input norm); megatron's local spec saves its ``input_layernorm`` /
``pre_mlp_layernorm`` under the same keys (``sharded_state_dict_keys_map``), so one
table serves both layer specs.

Adding an architecture = adding a table here (and its config fields in
``model/hf_config.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from psft_megatron.conversion.transforms import TRANSFORMS, Transform
from psft_megatron.model.config import ModelConfig

__all__ = ["IGNORED_HF_SUFFIXES", "WeightMapping", "mappings_for", "expand"]


@dataclass(frozen=True)
class WeightMapping:
    """One Megatron tensor <- ``transform`` of one or more HF tensors. ``{layer}`` marks per-layer entries."""

    megatron: str
    hf: tuple[str, ...]
    transform: str = "direct"
    when: str = ""  # "", "qkv_bias" or "untied": a ModelConfig condition

    def applies(self, cfg: ModelConfig) -> bool:
        if self.when == "qkv_bias":
            return cfg.qkv_bias
        if self.when == "untied":
            return not cfg.tie_word_embeddings
        return True

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron

    @property
    def fn(self) -> Transform:
        return TRANSFORMS[self.transform]


_ATTN = "model.layers.{layer}.self_attn"
_MLP = "model.layers.{layer}.mlp"

_LLAMA = (
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
    WeightMapping("output_layer.weight", ("lm_head.weight",), "vocab", when="untied"),
)

# Qwen2 and Mistral share Llama's tensor names; Qwen2's QKV bias is the "qkv_bias" row.
REGISTRY: dict[str, tuple[WeightMapping, ...]] = {"llama": _LLAMA, "qwen2": _LLAMA, "mistral": _LLAMA}

# HF tensors that are not weights (buffers some older checkpoints saved); skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def mappings_for(cfg: ModelConfig) -> list[WeightMapping]:
    """The table for ``cfg.family`` restricted to entries that apply to ``cfg``."""
    if cfg.family not in REGISTRY:
        raise ValueError(f"no weight mapping for architecture {cfg.family!r}; known: {sorted(REGISTRY)}")
    return [m for m in REGISTRY[cfg.family] if m.applies(cfg)]


def expand(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], WeightMapping]]:
    """Every concrete (megatron name, HF names, mapping) for ``cfg``: per-layer entries once per layer."""
    out = []
    for m in mappings_for(cfg):
        layers = range(cfg.num_layers) if m.per_layer else [None]
        for layer in layers:
            fmt = {"layer": layer} if layer is not None else {}
            out.append((m.megatron.format(**fmt), tuple(h.format(**fmt) for h in m.hf), m))
    return out
