"""How many adapter parameters a LoRA model has, per layer and per tensor-parallel rank (the plan,
the preflight's checkpoint size and the PEFT export's shapes use it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from psft_megatron.model.lora.spec import lora_plans

if TYPE_CHECKING:
    from psft_megatron.model.config import ModelConfig

__all__ = ["adapter_parameters_per_layer", "adapter_parameters_per_model", "unit_shapes"]


def unit_shapes(model: "ModelConfig") -> dict[str, tuple[int, int]]:
    """``{unit: (in_features, out_features)}`` of every adapted projection of one layer (global, TP=1)."""
    h, d, f = model.hidden_size, model.kv_channels, model.ffn_hidden_size
    q, kv = model.num_attention_heads * d, model.query_groups * d
    sizes = {"linear_qkv": [(h, q), (h, kv), (h, kv)], "linear_proj": [(q, h)], "linear_fc1": [(h, f), (h, f)],
             "linear_fc2": [(f, h)]}
    out = {}
    for module, plan in lora_plans(model.family, model.lora).items():
        for unit, shape in zip(plan.target.units, sizes[module]):
            if unit in plan.units:
                out[unit] = shape
    return out


def adapter_parameters_per_layer(model: "ModelConfig", tp: int = 1) -> float:
    """Adapter parameters of one layer on one TP rank: a column-parallel projection keeps A whole
    and ``1/TP`` of B, a row-parallel one ``1/TP`` of A and B whole."""
    r = model.lora.rank
    total = 0.0
    for module, plan in lora_plans(model.family, model.lora).items():
        for unit in plan.units:
            fan_in, fan_out = unit_shapes(model)[unit]
            if plan.target.kind == "column":
                total += r * fan_in + r * fan_out / tp
            else:
                total += r * fan_in / tp + r * fan_out
    return total


def adapter_parameters_per_model(model: "ModelConfig") -> int:
    """Adapter parameters of the whole model (TP=1)."""
    return int(model.num_layers * adapter_parameters_per_layer(model, 1))
