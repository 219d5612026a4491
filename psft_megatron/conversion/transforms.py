"""The generic tensor transforms between HF and Megatron layouts, both directions.

A family's weight table (:mod:`psft_megatron.model.architectures`) names one of these by
string, or one of its own (``Architecture.transforms``). Each maps the HF tensors of one
mapping row to the *TP=1* Megatron tensor and back. The Megatron dist checkpoint stores
TP-independent global tensors, and megatron-core's own sharded state dict splits them per TP
rank on load, so no transform here needs to know the TP size:

* QKV: Megatron's ``linear_qkv`` holds, per query group (key/value head), that
  group's query heads, then its key head, then its value head. Splitting rows
  evenly over TP then gives every rank whole groups. (Concatenating q|k|v and
  chunking would hand rank 0 only queries.)
* gate/up: the checkpoint's ``linear_fc1`` global tensor is ``[gate; up]``;
  megatron's swiglu sharded factory cuts gate and up separately per TP rank and
  concatenates ``[gate_r; up_r]`` on load, so ``[gate; up]`` is right here.
* vocab: embedding / output rows are padded with zeros to the padded vocab size
  and trimmed back on export.
"""

from __future__ import annotations

import torch

from psft_megatron.model.architectures.base import TensorTransform
from psft_megatron.model.config import ModelConfig

__all__ = ["TRANSFORMS", "qkv_merge", "qkv_split"]


def qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """HF q/k/v projections (weights ``[out, hidden]`` or biases ``[out]``) -> Megatron's per-group QKV."""
    groups, d = cfg.query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // groups
    tail = q.shape[1:]
    merged = torch.cat(
        [q.reshape(groups, per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)], dim=1
    )
    return merged.reshape(groups * (per_group + 2) * d, *tail)


def qkv_split(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_merge`."""
    groups, d = cfg.query_groups, cfg.kv_channels
    per_group = cfg.num_attention_heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return (
        q.reshape(groups * per_group * d, *tail).contiguous(),
        k.reshape(groups * d, *tail).contiguous(),
        v.reshape(groups * d, *tail).contiguous(),
    )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, more than the padded size {rows}")
    out = t.new_zeros((rows, *t.shape[1:]))
    out[: t.shape[0]] = t
    return out


def _gate_up_split(t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    gate, up = torch.chunk(t, 2, dim=0)
    return [gate.contiguous(), up.contiguous()]


TRANSFORMS: dict[str, TensorTransform] = {
    "direct": TensorTransform("direct", 1, lambda hf, cfg, padded: hf[0], lambda t, cfg: [t]),
    "qkv": TensorTransform(
        "qkv", 3, lambda hf, cfg, padded: qkv_merge(hf[0], hf[1], hf[2], cfg), lambda t, cfg: list(qkv_split(t, cfg))
    ),
    "gate_up": TensorTransform("gate_up", 2, lambda hf, cfg, padded: torch.cat([hf[0], hf[1]], dim=0), _gate_up_split),
    "vocab": TensorTransform(
        "vocab", 1, lambda hf, cfg, padded: _pad_rows(hf[0], padded), lambda t, cfg: [t[: cfg.vocab_size].contiguous()]
    ),
}
