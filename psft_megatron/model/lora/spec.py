"""Put LoRA into a megatron layer spec: the targeted linears become their LoRA subclasses.

The spec names each linear's class (``ColumnParallelLinear``, ``TELayerNormColumnParallelLinear``,
...); swapping in :func:`~psft_megatron.model.lora.layers.lora_linear_class` of it builds the model
with adapters from the start, so the base weights keep megatron's own modules, names and
checkpoint keys. Attention builds ``linear_qkv`` by calling the spec entry, the MLP builds its
linears with ``build_module``: the first gets a ``functools.partial``, the others a ``ModuleSpec``
with the plan in its params.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from psft_megatron.model.lora.config import LoRAConfig
from psft_megatron.model.lora.layers import LoRAPlan, lora_linear_class
from psft_megatron.model.lora.targets import linear_targets, resolve_targets

__all__ = ["lora_layer_spec", "lora_plans"]


def lora_plans(family: str, lora: LoRAConfig) -> dict[str, LoRAPlan]:
    """``{megatron module: LoRAPlan}`` of the linears ``lora`` targets in ``family``."""
    targets = linear_targets(family)
    return {
        module: LoRAPlan(target=targets[module], units=units, rank=lora.rank, scale=lora.scale, dropout=lora.dropout)
        for module, units in resolve_targets(family, list(lora.target_modules)).items()
    }


def _swap(entry: Any, plan: LoRAPlan, called_directly: bool) -> Any:
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(entry, ModuleSpec):
        base, params = entry.module, dict(entry.params)
    elif isinstance(entry, type):
        base, params = entry, {}
    else:
        raise ValueError(f"cannot add LoRA to the layer spec entry {entry!r} for {plan.target.module}")
    cls = lora_linear_class(base)
    if called_directly:
        return functools.partial(cls, **params, lora=plan)
    return ModuleSpec(module=cls, params={**params, "lora": plan})


def lora_layer_spec(spec: Any, family: str, lora: LoRAConfig) -> Any:
    """A copy of the transformer layer ``spec`` whose targeted linears carry LoRA adapters.

    Raises ValueError when an MLP projection is targeted but the spec's MLP is not megatron's dense
    ``MLP`` (a mixture of experts: expert linears take no adapters here).
    """
    from megatron.core.transformer.mlp import MLP

    spec = copy.deepcopy(spec)
    attention = spec.submodules.self_attention.submodules
    mlp = spec.submodules.mlp
    for module, plan in lora_plans(family, lora).items():
        if plan.target.parent == "mlp":
            if getattr(mlp, "module", None) is not MLP:
                raise ValueError(
                    f"model.lora.target_modules targets {', '.join(plan.units)}, but this model's MLP is "
                    f"{getattr(mlp, 'module', mlp)!r}, not a dense MLP: mixture-of-experts linears take no LoRA "
                    "adapters; target the attention (q_proj, k_proj, v_proj, o_proj)"
                )
            parent = mlp.submodules
        else:
            parent = attention
        setattr(parent, module, _swap(getattr(parent, module), plan, called_directly=module == "linear_qkv"))
    return spec
