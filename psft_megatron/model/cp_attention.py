"""Context-parallel core attention for megatron's local layer spec (no TransformerEngine).

megatron-core's ``DotProductAttention`` asserts ``context_parallel_size == 1``: it attends
over the keys it is given, and under CP each rank only holds its own share of the sequence.
:class:`ContextParallelDotProductAttention` is a drop-in for it (the layer spec's
``core_attention``): it all-gathers K and V over the CP group, then runs megatron's own
``DotProductAttention`` math with this rank's queries against every key, under the
per-sample causal mask of :func:`psft_megatron.data.context_parallel.thd_attention_mask`.

Inputs come in THD form (a CP micro-batch, see :mod:`psft_megatron.data.batches`):
megatron squeezes ``[t, 1, heads, dim]`` to ``[t, heads, dim]`` and has already applied
RoPE by ``cu_seqlens_q_padded`` (positions restart in every sample, CP chunks included).

Backward: the all-gather is megatron's ``gather_from_sequence_parallel_region`` on the CP
group, an autograd function whose backward reduce-scatters, so each rank receives the sum
of every rank's gradient for the K/V tokens it owns. The CPU/gloo path this serves is for
tests and small runs: it holds ``t_local x t`` attention scores; GPUs use TransformerEngine.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention

from psft_megatron.data.context_parallel import thd_attention_mask

__all__ = ["ContextParallelDotProductAttention"]


class ContextParallelDotProductAttention(DotProductAttention):
    """megatron's ``DotProductAttention`` over K/V all-gathered from the context-parallel group."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        # The parent refuses CP only because it would attend over local keys; it gets all of them
        # here. A shallow copy flips the one field for its check (no TransformerConfig re-validation).
        local = copy.copy(config)
        object.__setattr__(local, "context_parallel_size", 1)
        super().__init__(local, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                         softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.config = config
        cp = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.cp_group = cp if cp is not None else parallel_state.get_context_parallel_group()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """``query`` ``[t, heads, dim]`` and ``key``/``value`` ``[t, groups, dim]`` (this rank's tokens);
        returns ``[t, 1, heads * dim]``."""
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise ValueError(
                "context-parallel attention needs THD packed_seq_params with cu_seqlens_q_padded "
                "(feed micro-batches split by psft_megatron.data.context_parallel)"
            )
        if attention_mask is not None:
            raise ValueError("context-parallel attention builds its mask from packed_seq_params; pass attention_mask=None")
        cu_padded = packed_seq_params.cu_seqlens_q_padded
        if cu_padded is None:
            cu_padded = packed_seq_params.cu_seqlens_q
        cp_size, cp_rank = self.cp_group.size(), self.cp_group.rank()
        # Forward: all-gather along the token dim; backward: reduce-scatter back to the owners.
        key = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=self.cp_group)
        value = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=self.cp_group)
        mask = thd_attention_mask(packed_seq_params.cu_seqlens_q, cu_padded, cp_size, cp_rank).to(query.device)
        # The parent works on [s, b, heads, dim] with a [b, 1, sq, sk] mask: b = 1 here.
        return super().forward(
            query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask[None, None],
            attn_mask_type=attn_mask_type, attention_bias=attention_bias, packed_seq_params=None,
        )
