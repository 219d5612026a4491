"""The adapters of built model chunks: which tensors they are, freezing the base, their first
values, switching them off (the base model without a copy of its weights).

Adapter tensors are named ``...<linear>.lora_A.<unit>`` / ``...lora_B.<unit>`` (module, state-dict
and dist-checkpoint names alike); everything else is the base.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from psft_megatron.model.init import fill_rows
from psft_megatron.model.lora.layers import LoRALinearMixin

__all__ = [
    "BaseModelView",
    "adapter_parameters",
    "adapters_disabled",
    "freeze_base",
    "has_adapters",
    "init_adapters",
    "is_adapter_key",
    "lora_layers",
]

_ADAPTER = re.compile(r"(^|\.)lora_[AB]\.[^.]+$")


def is_adapter_key(key: str) -> bool:
    """Whether a parameter, state-dict or checkpoint key names an adapter tensor."""
    return bool(_ADAPTER.search(key))


def _unwrap(chunk: Any) -> Any:
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk


def lora_layers(chunks: list[Any]) -> list[LoRALinearMixin]:
    """Every linear with adapters in ``chunks`` (wrapped or not)."""
    return [m for c in chunks for m in _unwrap(c).modules() if isinstance(m, LoRALinearMixin)]


def has_adapters(chunks: list[Any]) -> bool:
    """Whether the chunks were built with LoRA adapters."""
    return bool(lora_layers(chunks))


def adapter_parameters(chunks: list[Any]) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every adapter tensor, chunk by chunk."""
    return [(n, p) for c in chunks for n, p in _unwrap(c).named_parameters() if is_adapter_key(n)]


def freeze_base(chunks: list[Any]) -> None:
    """Only the adapters train: every other parameter gets ``requires_grad=False``, so megatron's
    DDP gives it no gradient buffer and its optimizer no state."""
    for chunk in chunks:
        for name, p in _unwrap(chunk).named_parameters():
            p.requires_grad_(is_adapter_key(name))


@contextmanager
def adapters_disabled(chunks: list[Any]) -> Iterator[None]:
    """The base model for the duration: every adapter's output left out (the weights untouched)."""
    layers = lora_layers(chunks)
    before = [m.lora_enabled for m in layers]
    for m in layers:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.lora_enabled = b


class BaseModelView(torch.nn.Module):
    """A model chunk with its adapters switched off while it runs: the base model, sharing its weights.

    What megatron's schedules and the loss need of a chunk is found through ``.module`` (as for DDP).
    """

    def __init__(self, chunk: Any) -> None:
        super().__init__()
        self.module = chunk

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with adapters_disabled([self.module]):
            return self.module(*args, **kwargs)


def _uniform(bound: float):
    def draw(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
    return draw


@torch.no_grad()
def init_adapters(chunks: list[Any], seed: int) -> None:
    """Give the adapters their first values, the same at every layout: B = 0 (so the model starts as
    the base exactly) and A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default range), drawn in row blocks
    of the global tensor from generators seeded by ``seed`` and the tensor's checkpoint key and layer
    (:func:`psft_megatron.model.init.fill_rows`), so each rank draws exactly its part."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    for chunk in chunks:
        for sh in nested_values(_unwrap(chunk).sharded_state_dict()):
            if not isinstance(sh, ShardedTensor) or not is_adapter_key(sh.key) or sh.data is None:
                continue
            if ".lora_B." in sh.key:
                sh.data.zero_()
                continue
            fan_in = sh.global_shape[-1]
            fill_rows(sh, seed, _uniform(1 / math.sqrt(fan_in)))
