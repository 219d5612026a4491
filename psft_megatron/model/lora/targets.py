"""Which linear layers of a model family take LoRA adapters, read from the family's weight table.

A family's table (:mod:`psft_megatron.model.architectures`) maps each Megatron linear of a layer to
the HF tensors it is made of: ``linear_qkv`` <- ``q_proj, k_proj, v_proj``, ``linear_fc1`` <-
``gate_proj, up_proj``, ``linear_proj`` <- ``o_proj``, ``linear_fc2`` <- ``down_proj``. Each HF
projection is one adapter *unit* with its own A and B (PEFT's layout, so an adapter exports to PEFT
one to one): the fused linears carry one adapter per projection, and their outputs are placed where
the projection's rows sit in the fused output. A family without plain MLP rows (mixture-of-experts:
the experts are named with ``{expert}``) offers only the attention units.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from psft_megatron.model.architectures import architecture

__all__ = ["LINEAR_MODULES", "LinearTarget", "linear_targets", "resolve_targets"]

# Megatron's linear layers inside a transformer layer, and how each is split over tensor parallelism.
LINEAR_MODULES: dict[str, tuple[str, Literal["column", "row"]]] = {
    "linear_qkv": ("self_attention", "column"),
    "linear_proj": ("self_attention", "row"),
    "linear_fc1": ("mlp", "column"),
    "linear_fc2": ("mlp", "row"),
}
_ROW = re.compile(r"^decoder\.layers\.\{layer\}\.(self_attention|mlp)\.(linear_qkv|linear_proj|linear_fc1|linear_fc2)"
                  r"\.weight$")


@dataclass(frozen=True)
class LinearTarget:
    """One Megatron linear of a layer and the HF projections (units) its output is made of."""

    module: str  # linear_qkv | linear_proj | linear_fc1 | linear_fc2
    parent: str  # self_attention | mlp
    kind: Literal["column", "row"]  # column-parallel (output split over TP) or row-parallel (input split)
    units: tuple[str, ...]  # HF projection names in the fused output's order: ("q_proj", "k_proj", "v_proj")
    hf_modules: tuple[str, ...]  # their HF module paths: ("model.layers.{layer}.self_attn.q_proj", ...)


def linear_targets(family: str) -> dict[str, LinearTarget]:
    """``{megatron module: LinearTarget}`` for every layer linear of ``family`` that can take adapters."""
    out = {}
    for row in architecture(family).weights:
        m = _ROW.match(row.megatron)
        if not m or any("{expert}" in h for h in row.hf):
            continue
        parent, module = m.groups()
        out[module] = LinearTarget(
            module=module, parent=parent, kind=LINEAR_MODULES[module][1],
            units=tuple(h.split(".")[-2] for h in row.hf),
            hf_modules=tuple(h.removesuffix(".weight") for h in row.hf),
        )
    return out


def resolve_targets(family: str, names: list[str]) -> dict[str, tuple[str, ...]]:
    """``{megatron module: the units that get adapters}`` for target ``names`` (HF projection names
    such as ``q_proj`` and/or Megatron module names such as ``linear_qkv``, which mean all its units).

    Raises ValueError naming the unknown target and the known ones.
    """
    targets = linear_targets(family)
    by_unit = {u: t.module for t in targets.values() for u in t.units}
    chosen: dict[str, set[str]] = {}
    for name in names:
        if name in targets:
            chosen.setdefault(name, set()).update(targets[name].units)
        elif name in by_unit:
            chosen.setdefault(by_unit[name], set()).add(name)
        else:
            known = sorted(by_unit) + sorted(targets)
            moe = "" if "linear_fc1" in targets else (
                f"; the {family} family's MLP is a mixture of experts, whose expert linears take no LoRA adapters "
                "(target the attention)")
            raise ValueError(f"unknown LoRA target {name!r} for the {family} family; known: {known}{moe}")
    # Units in the fused output's order, modules in the layer's order.
    return {m: tuple(u for u in targets[m].units if u in chosen[m]) for m in targets if m in chosen}
