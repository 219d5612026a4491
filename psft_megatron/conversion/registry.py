"""The concrete HF <-> Megatron tensor pairs of a model, from its family's weight table.

Each family's table lives with the family (:mod:`psft_megatron.model.architectures`), as
plain data: Megatron and HF names with placeholders, a transform named by string, and the
``ModelConfig`` condition a row needs. This module expands a table for one model (once per
layer, and per value of any other placeholder a row names) and resolves each row's transform:
the family's own first, else the generic ones of :mod:`psft_megatron.conversion.transforms`.

Megatron names are the dist-checkpoint names with the layer index spelled out
(``decoder.layers.{layer}.…``): the checkpoint key of a layer tensor is that name
without the index, which becomes the tensor's first (stacked-layer) axis.
"""

from __future__ import annotations

import itertools

from psft_megatron.conversion.transforms import TRANSFORMS
from psft_megatron.model.architectures import architecture
from psft_megatron.model.architectures.base import (
    PLACEHOLDERS,
    Architecture,
    TensorTransform,
    WeightMapping,
    placeholder_values,
)
from psft_megatron.model.config import ModelConfig

__all__ = ["IGNORED_HF_SUFFIXES", "expand", "mappings_for", "transform_of"]

# HF tensors that are not weights (buffers some older checkpoints saved); skipped on import.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def transform_of(arch: Architecture, mapping: WeightMapping) -> TensorTransform:
    """The transform a row of ``arch``'s table names: the family's own, else a generic one."""
    if mapping.transform in arch.transforms:
        return arch.transforms[mapping.transform]
    if mapping.transform in TRANSFORMS:
        return TRANSFORMS[mapping.transform]
    raise KeyError(
        f"{arch.family}: {mapping.megatron} names the transform {mapping.transform!r}, which is neither the "
        f"family's ({sorted(arch.transforms)}) nor a generic one ({sorted(TRANSFORMS)})"
    )


def mappings_for(cfg: ModelConfig, arch: Architecture | None = None) -> list[WeightMapping]:
    """The table of ``cfg.family`` (or of ``arch``) restricted to the rows that apply to ``cfg``."""
    return [m for m in (arch or architecture(cfg.family)).weights if m.applies(cfg)]


def expand(cfg: ModelConfig, arch: Architecture | None = None) -> list[tuple[str, tuple[str, ...], TensorTransform]]:
    """Every concrete (megatron name, HF names, transform) for ``cfg``: a row with placeholders once
    per combination of their values (``{layer}``: each of ``cfg.num_layers``; ``{moe_layer}``,
    ``{dense_layer}``, ``{expert}``: see :data:`PLACEHOLDERS`). ``arch``: the family's table, by
    default the registered one of ``cfg.family``."""
    arch = arch or architecture(cfg.family)
    out = []
    for m in mappings_for(cfg, arch):
        names = m.placeholders
        unknown = sorted(set(names) - set(PLACEHOLDERS))
        if unknown:
            raise KeyError(f"{arch.family}: {m.megatron} uses unknown placeholder(s) {unknown}; known: {sorted(PLACEHOLDERS)}")
        fn = transform_of(arch, m)
        for values in itertools.product(*(placeholder_values(n, cfg) for n in names)):
            fmt = dict(zip(names, values))
            out.append((m.megatron.format(**fmt), tuple(h.format(**fmt) for h in m.hf), fn))
    return out
