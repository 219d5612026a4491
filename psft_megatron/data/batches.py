"""Batch objects handed to the trainer: global batch -> mini-batches -> micro-batches.

What each pipeline stage must pass to ``GPTModel.forward``
=========================================================

Every rank (every PP stage, every TP rank) builds the loader with its own
data-parallel rank and size, so all stages of one model replica draw the *same*
micro-batches locally: no broadcast of tokens or masks between stages is needed,
and no stage can lose the packing boundaries. Each stage's ``forward_step`` takes
its micro-batch ``mb`` and calls ``model(**mb.forward_kwargs(backend))``:

``backend="local"`` (``get_gpt_layer_local_spec``, megatron's ``DotProductAttention``)
    ``input_ids=mb.tokens [b,S]``, ``position_ids=mb.position_ids [b,S]``,
    ``attention_mask=mb.attention_mask() [b,1,S,S] bool, True = masked``.
    *All* stages need ``attention_mask``: every layer applies it, and without it
    a middle/last stage's layers would attend across samples. ``input_ids`` and
    ``position_ids`` are read only on the first stage (embedding); RoPE is
    computed on every stage from the sequence length, not from ``position_ids``.
    The attention spec must honour the mask: see :mod:`psft_megatron.data.masks`.

``backend="transformer_engine"`` (TransformerEngine, THD packed format)
    call ``mb = mb.thd()`` first (flattens to ``[1, b*S]``; THD needs batch 1), then
    ``input_ids``, ``position_ids``, ``attention_mask=None`` and
    ``packed_seq_params=mb.packed_seq_params()``. *All* stages need
    ``packed_seq_params``: it selects the per-sample attention kernel and the
    per-sample RoPE restart (megatron sizes the RoPE table from its ``max_seqlen``).

Context parallelism (``mb.cp_size > 1``, made by :mod:`psft_megatron.data.context_parallel`)
    the micro-batch is already one CP rank's share of its rows in THD form ``[1, t]``
    (each sample padded to a multiple of 2 x CP, load-balanced chunks). Both backends then
    take the THD keywords: ``attention_mask=None`` and ``packed_seq_params`` with
    ``cu_seqlens_q_padded``. TransformerEngine runs its own CP attention; the local spec runs
    :class:`psft_megatron.model.cp_attention.ContextParallelDotProductAttention`. megatron's
    THD RoPE gives every token its position inside its own sample.

The last stage computes the loss from its output with ``mb.labels`` and
``mb.loss_mask`` (the trainer passes ``labels=mb.labels``, for which
``psft_megatron.model.gpt.PSFTGPTModel`` returns the ``[s, b, V/TP]`` logits); normalise by :attr:`MiniBatch.num_loss_tokens`, the loss-token count of
the whole mini-batch over all data-parallel ranks (no all-reduce needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

import numpy as np
import torch

from psft_megatron.data.masks import block_causal_mask, packed_seq_params
from psft_megatron.data.packing import PackedRow

AttentionBackend = Literal["local", "transformer_engine"]


@dataclass(frozen=True)
class RowMap:
    """Where each token of a reshaped micro-batch (THD, or one CP rank's share) came from:
    its row in the loader's ``[num_rows, seq_length]`` micro-batch and its position in that row.
    Token order is the reshaped micro-batch's row-major order."""

    row: torch.Tensor  # int64 [t]
    index: torch.Tensor  # int64 [t]; -1 for padding that the CP split inserted (no source token)
    num_rows: int
    seq_length: int


@dataclass
class MicroBatch:
    """``b`` packed rows of ``S`` tokens, with everything any pipeline stage needs."""

    tokens: torch.Tensor  # int64 [b, S]
    labels: torch.Tensor  # int64 [b, S]; next token in the same sample, else pad_id
    loss_mask: torch.Tensor  # float32 [b, S]; aligned with labels, 0 across boundaries / padding
    position_ids: torch.Tensor  # int64 [b, S]; restart at 0 per sample
    segment_ids: torch.Tensor  # int32 [b, S]; sample index within its row, padding its own segment
    cu_seqlens: torch.Tensor  # int32 [n_segments + 1] over the row-major flattened b*S tokens
    max_seqlen: int  # longest segment
    num_loss_tokens: int  # loss_mask.sum() of this micro-batch
    sample_ids: list[tuple[int, ...]] = field(default_factory=list)  # dataset indices per row
    # THD with padded samples (the CP split): cumulative padded lengths; cu_seqlens then holds
    # the real lengths, cumulated without the padding (TransformerEngine's convention).
    cu_seqlens_padded: torch.Tensor | None = None
    cp_size: int = 1  # > 1: this is one context-parallel rank's share of its rows
    row_map: RowMap | None = None  # None: tokens are [rows, S] exactly as the loader made them

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def attention_mask(self) -> torch.Tensor:
        """Block-diagonal causal mask ``[b, 1, S, S]`` (bool, True = masked) for the local path."""
        return block_causal_mask(self.segment_ids)

    def packed_seq_params(self) -> Any:
        """``PackedSeqParams`` (THD) for TransformerEngine; use on a :meth:`thd` micro-batch
        (with ``cu_seqlens_q_padded`` on a CP share)."""
        params = packed_seq_params(self.cu_seqlens, self.max_seqlen)
        if self.cu_seqlens_padded is not None:
            padded = self.cu_seqlens_padded.to(torch.int32)
            params.cu_seqlens_q_padded = padded
            params.cu_seqlens_kv_padded = padded
        return params

    def token_rows(self) -> RowMap:
        """Row and in-row position of every token, in row-major token order (see :class:`RowMap`)."""
        if self.row_map is not None:
            return self.row_map
        b, s = self.shape
        return RowMap(torch.arange(b).repeat_interleave(s), torch.arange(s).repeat(b), b, s)

    def thd(self) -> "MicroBatch":
        """The same tokens flattened to one row ``[1, b*S]`` (``cu_seqlens`` already covers it)."""
        b, s = self.shape
        if b == 1 or self.cp_size > 1:  # a CP share is THD already
            return self
        # Segment ids must stay distinct across the joined rows.
        seg = self.segment_ids.to(torch.int64)
        per_row = seg.amax(dim=1, keepdim=True) + 1
        shift = torch.cumsum(per_row, dim=0) - per_row
        flat = lambda t: t.reshape(1, b * s)  # noqa: E731
        return replace(
            self,
            tokens=flat(self.tokens),
            labels=flat(self.labels),
            loss_mask=flat(self.loss_mask),
            position_ids=flat(self.position_ids),
            segment_ids=flat((seg + shift).to(torch.int32)),
            sample_ids=[tuple(i for row in self.sample_ids for i in row)],
            row_map=self.token_rows(),
        )

    def forward_kwargs(self, backend: AttentionBackend = "local") -> dict[str, Any]:
        """Keyword arguments for ``GPTModel.forward`` on *any* pipeline stage (see module docstring)."""
        if backend not in ("local", "transformer_engine"):
            raise ValueError(f"backend must be 'local' or 'transformer_engine', got {backend!r}")
        if backend == "local" and self.cp_size == 1:
            return {
                "input_ids": self.tokens,
                "position_ids": self.position_ids,
                "attention_mask": self.attention_mask(),
            }
        # THD: TransformerEngine, and a CP share on either attention (see the module docstring).
        if self.shape[0] != 1:
            raise ValueError(f"THD needs a batch of 1 row, got {self.shape[0]}; call mb.thd() first")
        return {
            "input_ids": self.tokens,
            "position_ids": self.position_ids,
            "attention_mask": None,
            "packed_seq_params": self.packed_seq_params(),
        }

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "MicroBatch":
        """Copy the tensors to ``device`` (cu_seqlens included: TE wants it on the GPU)."""
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self,
            tokens=mv(self.tokens),
            labels=mv(self.labels),
            loss_mask=mv(self.loss_mask),
            position_ids=mv(self.position_ids),
            segment_ids=mv(self.segment_ids),
            cu_seqlens=mv(self.cu_seqlens),
            cu_seqlens_padded=None if self.cu_seqlens_padded is None else mv(self.cu_seqlens_padded),
        )


@dataclass
class MiniBatch:
    """One optimizer step's share of data on this data-parallel rank."""

    micro_batches: list[MicroBatch]
    num_loss_tokens: int  # over the whole mini-batch, all DP ranks: the normaliser
    local_num_loss_tokens: int  # this rank's micro-batches only
    # The whole mini-batch's response tokens per training source (the loader's Sources order).
    source_loss_tokens: tuple[int, ...] = ()


@dataclass
class GlobalBatch:
    """This rank's part of one global batch, already split into mini- and micro-batches."""

    mini_batches: list[MiniBatch]
    epoch: int
    index_in_epoch: int  # which global batch of the epoch (0-based)
    step: int  # global batches drawn since the start of training (epoch * steps_per_epoch + index)


def collate(rows: Sequence[PackedRow]) -> MicroBatch:
    """Stack packed rows into a :class:`MicroBatch` (CPU tensors)."""
    if not rows:
        raise ValueError("collate needs at least one row")
    s = len(rows[0].tokens)
    stack = lambda name, dt: torch.from_numpy(np.stack([getattr(r, name) for r in rows]).astype(dt, copy=False))  # noqa: E731
    cu = [np.asarray([0], dtype=np.int64)]
    for k, r in enumerate(rows):
        cu.append(r.cu_seqlens[1:].astype(np.int64) + k * s)
    cu_flat = np.concatenate(cu).astype(np.int32)
    loss_mask = stack("loss_mask", np.float32)
    return MicroBatch(
        tokens=stack("tokens", np.int64),
        labels=stack("labels", np.int64),
        loss_mask=loss_mask,
        position_ids=stack("position_ids", np.int64),
        segment_ids=stack("segment_ids", np.int32),
        cu_seqlens=torch.from_numpy(cu_flat),
        max_seqlen=int(np.diff(cu_flat).max()),
        num_loss_tokens=int(sum(r.num_loss_tokens for r in rows)),
        sample_ids=[r.sample_ids for r in rows],
    )
