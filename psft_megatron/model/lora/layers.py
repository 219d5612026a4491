"""LoRA on megatron-core's parallel linears, sharded the way each base layer is.

Written here rather than taken from Megatron-Bridge's ``peft`` (whose design this follows: the
adapter added to the base linear's output, A and B split like the base) because Bridge cannot be
installed beside this project. :func:`lora_linear_class` subclasses a linear of the layer spec
(megatron's local ``ColumnParallelLinear`` / ``RowParallelLinear`` or TransformerEngine's
``TELayerNormColumnParallelLinear`` / ``TERowParallelLinear``); the base weights keep their names,
shapes and checkpoint keys, and each adapted projection ``u`` adds ``lora_A.u`` / ``lora_B.u``.

Column-parallel base (``linear_qkv``, ``linear_fc1``: output rows split over TP)::

    A_u [r, in]           replicated over TP          h = x A^T  (all units' A at once)
    B_u [out_u / TP, r]   split like the base's rows  h gathered over the sequence (SP) or
                                                      copied into the TP region (its backward
                                                      all-reduces dh, so every rank's dA agrees)
    delta = [h_u B_u^T * scale for u], placed where u's rows sit in the fused local output
            (linear_qkv: per query group [q heads, k, v]; linear_fc1: [gate, up])

Row-parallel base (``linear_proj``, ``linear_fc2``: input split over TP)::

    A [r, in / TP]   split like the base's columns    h = x A^T, summed over TP (reduce-scattered
    B [out, r]       replicated over TP                over the sequence under SP)
    delta = h B^T * scale

Under sequence parallelism the replicated half sees only this rank's tokens, so it is marked
``sequence_parallel`` and megatron's ``finalize_model_grads`` sums its gradient over TP (as for
the norms). Gathering ``h`` (``r`` wide) rather than ``x`` (``h`` wide) keeps the extra traffic
small. The checkpoint keeps the TP-independent global tensors (``make_sharded_tensors_for_checkpoint``
with the split axis), so adapters, like the base, load at any layout.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F

from psft_megatron.model.lora.targets import LinearTarget

__all__ = ["LoRAPlan", "LoRALinearMixin", "lora_linear_class"]


@dataclass(frozen=True)
class LoRAPlan:
    """The adapters of one linear: which units (HF projections) get one, their rank, scale and dropout."""

    target: LinearTarget
    units: tuple[str, ...]  # the adapted units, in the fused output's order
    rank: int
    scale: float  # alpha / rank
    dropout: float = 0.0


def _tp(tp_group: Any) -> tuple[int, int]:
    if tp_group is None or not torch.distributed.is_initialized():
        return 1, 0
    return tp_group.size(), tp_group.rank()


def _split_base_output(result: Any, x: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """(output, bias, the adapter's input) of a megatron linear's return value.

    megatron's linears return ``(out, bias)``; TransformerEngine's layernorm linear asked to return
    its norm output gives ``((out, ln_out), bias)`` or ``(out, bias, ln_out)``: then the adapter
    reads the normalised input, as the base weight does.
    """
    if len(result) == 3:
        out, bias, x = result
        return out, bias, x
    out, bias = result
    if isinstance(out, tuple):
        out, x = out
    return out, bias, x


class LoRALinearMixin:
    """The adapters of a column- or row-parallel linear (mixed into the linear's class, first)."""

    def __init__(self, input_size: int, output_size: int, *args: Any, lora: LoRAPlan, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, *args, **kwargs)
        config = kwargs["config"]
        if getattr(config, "attention_output_gate", False) and lora.target.module == "linear_qkv":
            raise ValueError("LoRA on linear_qkv does not support attention_output_gate")
        if hasattr(self, "return_layernorm_output"):  # TransformerEngine's layernorm linear: adapt the norm's output
            self.return_layernorm_output = True
            self.return_layernorm_output_gathered = False
        self.lora_plan = lora
        self.lora_enabled = True
        self.lora_tp_group = getattr(self, "tp_group", None)
        if self.lora_tp_group is None:
            self.lora_tp_group = getattr(self, "_tp_group", None)
        if self.lora_tp_group is None and torch.distributed.is_initialized():
            from megatron.core import parallel_state

            self.lora_tp_group = parallel_state.get_tensor_model_parallel_group()
        tp, _ = _tp(self.lora_tp_group)
        self.lora_sp = bool(config.sequence_parallel) and tp > 1
        self.lora_groups, self.lora_widths = self._fused_layout(config, input_size, output_size, tp)
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        dtype = config.params_dtype
        r = lora.rank
        for unit in lora.units:
            if lora.target.kind == "column":
                a = torch.empty(r, input_size, dtype=dtype)
                b = torch.empty(self.lora_groups * self.lora_widths[unit], r, dtype=dtype)
                a_split, b_split = None, 0
            else:
                a = torch.empty(r, input_size // tp, dtype=dtype)
                b = torch.empty(output_size, r, dtype=dtype)
                a_split, b_split = 1, None
            # PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0. The trainer
            # redraws A independently of the layout (psft_megatron.model.lora.state.init_adapters).
            torch.nn.init.uniform_(a, -1 / math.sqrt(input_size), 1 / math.sqrt(input_size))
            torch.nn.init.zeros_(b)
            self.lora_A[unit] = torch.nn.Parameter(a)
            self.lora_B[unit] = torch.nn.Parameter(b)
            for param, split in ((self.lora_A[unit], a_split), (self.lora_B[unit], b_split)):
                if split is None:  # replicated over TP: under SP each rank holds one sequence slice's gradient
                    param.sequence_parallel = self.lora_sp
                else:
                    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

                    set_tensor_model_parallel_attributes(param, True, split, 1)

    def _fused_layout(self, config: Any, input_size: int, output_size: int, tp: int) -> tuple[int, dict[str, int]]:
        """The local output as ``groups`` repeats of each unit's ``width`` rows, in unit order (column)."""
        target = self.lora_plan.target
        if target.kind == "row":
            return 1, {u: output_size for u in target.units}
        if target.module == "linear_qkv":  # per query group: [q heads of the group, k, v]
            heads, groups, d = config.num_attention_heads, config.num_query_groups or config.num_attention_heads, \
                config.kv_channels
            per_group = dict(zip(target.units, (heads // groups * d, d, d)))
            return groups // tp, per_group
        n = len(target.units)  # linear_fc1: [gate, up], each output_size / 2 (split over TP)
        return 1, {u: output_size // n // tp for u in target.units}

    # ------------------------------------------------------------------ forward

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out, bias, x = _split_base_output(super().forward(input_, *args, **kwargs), input_)
        if not self.lora_enabled or not self.lora_plan.units:
            return out, bias
        x = self._lora_dropout(x)
        delta = self._column_delta(x) if self.lora_plan.target.kind == "column" else self._row_delta(x)
        return out + delta.to(out.dtype), bias

    def _lora_dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_plan.dropout
        if not p or not self.training or not torch.is_grad_enabled():
            return x
        # Replicated input (column, no SP): the default RNG stream is the same on every TP rank, so the
        # masks agree; sequence- or hidden-split input: megatron's per-TP-rank stream.
        split = self.lora_sp or self.lora_plan.target.kind == "row"
        if split:
            from megatron.core import tensor_parallel

            ctx = tensor_parallel.get_cuda_rng_tracker().fork()
        else:
            ctx = nullcontext()
        with ctx:
            return F.dropout(x, p, training=True)

    def _column_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        plan, r = self.lora_plan, self.lora_plan.rank
        a = torch.cat([self.lora_A[u] for u in plan.units]) if len(plan.units) > 1 else self.lora_A[plan.units[0]]
        h = F.linear(x.to(a.dtype), a) * plan.scale  # [s(/TP), b, units * r]
        tp, _ = _tp(self.lora_tp_group)
        if self.lora_sp:
            h = mappings.gather_from_sequence_parallel_region(h, group=self.lora_tp_group)
        elif tp > 1:
            h = mappings.copy_to_tensor_model_parallel_region(h, group=self.lora_tp_group)
        lead = h.shape[:-1]
        g = self.lora_groups
        parts = []
        for unit in plan.target.units:
            w = self.lora_widths[unit]
            if unit in plan.units:
                i = plan.units.index(unit)
                y = F.linear(h[..., i * r:(i + 1) * r], self.lora_B[unit])
            else:  # a projection of the fused linear without an adapter
                y = h.new_zeros(*lead, g * w)
            parts.append(y.view(*lead, g, w))
        return torch.cat(parts, dim=-1).view(*lead, -1) if len(parts) > 1 else parts[0].view(*lead, -1)

    def _row_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        (unit,) = self.lora_plan.units
        h = F.linear(x.to(self.lora_A[unit].dtype), self.lora_A[unit])  # partial sums over TP
        tp, _ = _tp(self.lora_tp_group)
        if self.lora_sp:
            h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=self.lora_tp_group)
        elif tp > 1:
            h = mappings.reduce_from_tensor_model_parallel_region(h, group=self.lora_tp_group)
        return F.linear(h * self.lora_plan.scale, self.lora_B[unit])

    # ------------------------------------------------------------------ checkpoints

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The base's entries as the base class makes them, and the adapters as global tensors split
        along the axis TP splits them (A of a row-parallel linear: 1; B of a column-parallel: 0)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        adapters = {f"lora_{ab}.{u}": getattr(self, f"lora_{ab}")[u] for ab in "AB" for u in self.lora_plan.units}
        for name in adapters:
            out.pop(f"{prefix}{name}", None)
        kind = self.lora_plan.target.kind
        axis = {f"lora_{'B' if kind == 'column' else 'A'}.{u}": 0 if kind == "column" else 1 for u in self.lora_plan.units}
        groups = {}
        dp_cp = (metadata or {}).get("dp_cp_group")
        if dp_cp is not None and self.lora_tp_group is not None:
            groups = dict(tp_group=self.lora_tp_group, dp_cp_group=dp_cp)
        out.update(make_sharded_tensors_for_checkpoint(adapters, prefix, axis, sharded_offsets, **groups))
        return out


@lru_cache(maxsize=None)
def lora_linear_class(base: type) -> type:
    """``base`` (a megatron or TransformerEngine parallel linear class) with LoRA adapters."""
    return type(f"LoRA{base.__name__}", (LoRALinearMixin, base), {"__module__": __name__})
