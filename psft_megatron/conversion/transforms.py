"""Tensor transforms between HF and Megatron layouts, both directions.

Each transform maps the HF tensors of one mapping entry to the *TP=1* Megatron
tensor and back. The Megatron dist checkpoint stores TP-independent global
tensors, and megatron-core's own sharded state dict splits them per TP rank on
load, so no transform here needs to know the TP size:

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

from dataclasses import dataclass

import torch

from psft_megatron.model.config import ModelConfig

__all__ = ["Transform", "TRANSFORMS", "qkv_merge", "qkv_split"]


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


@dataclass(frozen=True)
class Transform:
    """A named HF <-> Megatron transform. ``to_megatron(hf_tensors, cfg, padded_vocab)`` and ``to_hf(t, cfg)``."""

    name: str
    num_hf: int  # how many HF tensors feed one Megatron tensor

    def to_megatron(self, hf: list[torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> torch.Tensor:
        if self.name == "direct":
            return hf[0]
        if self.name == "qkv":
            return qkv_merge(hf[0], hf[1], hf[2], cfg)
        if self.name == "gate_up":
            return torch.cat([hf[0], hf[1]], dim=0)
        if self.name == "vocab":
            return _pad_rows(hf[0], padded_vocab)
        raise KeyError(self.name)

    def to_hf(self, t: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
        if self.name == "direct":
            return [t]
        if self.name == "qkv":
            return list(qkv_split(t, cfg))
        if self.name == "gate_up":
            gate, up = torch.chunk(t, 2, dim=0)
            return [gate.contiguous(), up.contiguous()]
        if self.name == "vocab":
            return [t[: cfg.vocab_size].contiguous()]
        raise KeyError(self.name)


TRANSFORMS = {
    "direct": Transform("direct", 1),
    "qkv": Transform("qkv", 3),
    "gate_up": Transform("gate_up", 2),
    "vocab": Transform("vocab", 1),
}
