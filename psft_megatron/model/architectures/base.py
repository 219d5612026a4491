"""The shape of a family module: :class:`Architecture`, its weight-mapping rows and its transforms.

A family module (``llama.py``, ``qwen2.py``, ...) builds one :class:`Architecture` and names it
``ARCHITECTURE``. Everything in it is plain data or a plain function, so the model layer holds it
without importing the converters:

* ``fields_from_hf`` / ``to_hf_config``: an HF ``config.json`` dict -> ``ModelConfig`` keyword
  arguments, and a ``ModelConfig`` (and a dtype name) -> a config.json dict transformers loads;
* ``weights``: :class:`WeightMapping` rows, each one Megatron tensor <- one or more HF tensors
  through a transform named by string;
* ``transforms``: the family's own :class:`TensorTransform` objects, by name. The generic ones
  (``direct``, ``qkv``, ``gate_up``, ``vocab``) live in ``psft_megatron.conversion.transforms``,
  which looks a row's name up here first; a family may not reuse a generic name.

Names in a row may hold placeholders, expanded by the converters once per value, in HF and
Megatron names alike (see :data:`PLACEHOLDERS`): ``{layer}`` (each of ``num_layers``); for a
mixture-of-experts model ``{moe_layer}`` and ``{dense_layer}`` (the layers with experts, and those
that keep a dense MLP) and ``{expert}`` (each of ``num_experts``: per-expert HF tensors
``mlp.experts.{expert}.gate_proj`` <-> megatron's ``mlp.experts.local_experts.{expert}.linear_fc1``,
the name the checkpoint's expert tensors get whether SequentialMLP or the grouped GEMM saved them).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

if TYPE_CHECKING:  # model.config imports this package; these modules never build a ModelConfig
    import torch

    from psft_megatron.model.config import ModelConfig

__all__ = ["PLACEHOLDERS", "Architecture", "TensorTransform", "WeightMapping", "placeholder_values", "placeholders_of"]

# Placeholder in a mapping row's names -> the values it takes for a model: a count n (0..n-1) or
# the values themselves. The converters expand a row once per combination of the placeholders it names.
PLACEHOLDERS: dict[str, Callable[["ModelConfig"], int | Sequence[int]]] = {
    "layer": lambda cfg: cfg.num_layers,
    "moe_layer": lambda cfg: cfg.moe_layers,
    "dense_layer": lambda cfg: cfg.dense_layers,
    "expert": lambda cfg: cfg.num_experts or 0,
}


def placeholder_values(name: str, cfg: "ModelConfig") -> Sequence[int]:
    """The values placeholder ``name`` takes for ``cfg`` (KeyError for an unknown one)."""
    values = PLACEHOLDERS[name](cfg)
    return range(values) if isinstance(values, int) else values


def placeholders_of(name: str) -> tuple[str, ...]:
    """The ``{placeholder}`` names in ``name``, in order (``decoder.layers.{layer}.x`` -> ``("layer",)``)."""
    return tuple(f for _, f, _, _ in string.Formatter().parse(name) if f)


@dataclass(frozen=True)
class WeightMapping:
    """One Megatron tensor <- ``transform`` of one or more HF tensors.

    ``megatron`` is the dist-checkpoint name with the layer index spelled out
    (``decoder.layers.{layer}.…``). ``when`` names a boolean field or property of ``ModelConfig``
    the row needs (``"qkv_bias"``), or its negation (``"not tie_word_embeddings"``); empty: always.
    """

    megatron: str
    hf: tuple[str, ...]
    transform: str = "direct"
    when: str = ""

    def applies(self, cfg: "ModelConfig") -> bool:
        """Whether ``cfg`` has this tensor."""
        if not self.when:
            return True
        negated = self.when.startswith("not ")
        return bool(getattr(cfg, self.when.removeprefix("not "))) != negated

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The placeholders the row is expanded over (those of its Megatron name)."""
        return placeholders_of(self.megatron)


@dataclass(frozen=True)
class TensorTransform:
    """How the HF tensors of one row become the full (TP=1) Megatron tensor, and back.

    ``to_megatron(hf_tensors, cfg, padded_vocab)`` and ``to_hf(tensor, cfg)``; ``num_hf`` HF
    tensors feed one Megatron tensor. The dist checkpoint holds TP-independent tensors and
    megatron's sharded state dict splits them per rank on load, so no transform knows the TP size.
    """

    name: str
    num_hf: int
    to_megatron: Callable[[list["torch.Tensor"], "ModelConfig", int], "torch.Tensor"]
    to_hf: Callable[["torch.Tensor", "ModelConfig"], list["torch.Tensor"]]


@dataclass(frozen=True)
class Architecture:
    """Everything the project knows about one HF model family.

    ``family`` is ``ModelConfig.family``; ``model_types`` the HF ``model_type`` values the family
    claims and ``hf_class`` its transformers class (a config.json without a known ``model_type``
    is matched by its ``architectures`` list).
    """

    family: str
    model_types: tuple[str, ...]
    hf_class: str
    fields_from_hf: Callable[[dict[str, Any]], dict[str, Any]]
    to_hf_config: Callable[["ModelConfig", str], dict[str, Any]]  # (model, torch dtype name)
    weights: tuple[WeightMapping, ...]
    transforms: Mapping[str, TensorTransform] = field(default_factory=dict)
