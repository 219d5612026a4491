"""Attention structure for packed rows, for both of megatron-core's attention paths.

Local path (``get_gpt_layer_local_spec``, ``DotProductAttention``)
    takes a bool mask ``[b, 1, s, s]`` where **True means masked out**
    (``attention_mask_func`` does ``scores.masked_fill_(mask, -10000.0)``).
    :func:`block_causal_mask` builds it. Whether it is honoured depends on the
    layer's ``attn_mask_type`` (megatron-core 0.16.1, ``fusions/fused_softmax.py``):

    * ``AttnMaskType.causal`` (the default in every GPT spec) with the fused
      softmax kernel active (``masked_softmax_fusion=True``, fp16/bf16, 16 < s <= 4096,
      s % 4 == 0, ...) runs ``ScaledUpperTriangMaskedSoftmax`` and **ignores the
      mask**: packed samples would attend to each other with no error.
    * ``causal`` on the torch path (fp32, or fusion off, or shapes the kernel refuses)
      uses the given mask when it is not None (and builds a CUDA causal mask only
      when it is None).
    * ``AttnMaskType.arbitrary`` (or ``padding``) always applies the given mask,
      fused or not; with no mask it attends bidirectionally, so the mask is mandatory.

    So for packed training on the local path configure the self-attention spec
    with ``attn_mask_type=AttnMaskType.arbitrary`` (or keep ``causal`` and set
    ``masked_softmax_fusion=False``), no ``window_size`` (a sliding window replaces
    the mask), and pass the mask on every pipeline stage.
    :func:`check_model_honours_mask` verifies a built model.

TransformerEngine path (``TEDotProductAttention``)
    takes :class:`megatron.core.packed_seq_params.PackedSeqParams` with
    ``qkv_format='thd'`` and ``cu_seqlens``; megatron turns ``causal`` into
    ``padding_causal`` for THD, and RoPE restarts per segment. THD needs a batch
    dimension of 1, so a micro-batch of ``b`` rows is flattened to ``[1, b*S]``
    (see :meth:`psft_megatron.data.batches.MicroBatch.thd`).

RoPE and ``position_ids`` (megatron-core 0.16.1, ``GPTModel._preprocess``)
    With ``position_embedding_type="rope"`` the rotary table is built on *every*
    stage from a length only (``get_rotary_seq_len``: the hidden states' length,
    or ``packed_seq_params.max_seqlen_q`` when given); ``position_ids`` reach only
    the first stage's embedding, which ignores them unless the embedding is
    ``learned_absolute``. So:

    * local path: positions run 0..S-1 across the whole packed row, **no per-sample
      restart**. Because RoPE scores depend only on ``i - j`` and the block mask
      keeps ``i, j`` in one sample, the result equals running each sample alone
      (up to float rounding of larger angles; verified in
      ``tests/test_data_packing_model.py``). No extra rotary input is needed.
    * THD path: ``apply_rotary_pos_emb`` splits by ``cu_seqlens`` and restarts at
      0 per segment (as long as ``max_seqlen`` is not the whole flattened length).
    * ``learned_absolute`` embeddings: ``position_ids`` (restarting per sample) matter
      and are needed on the first stage only.
"""

from __future__ import annotations

from typing import Any

import torch


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[b, 1, S, S]`` mask, True = masked: query i sees key j iff j <= i and same segment.

    ``segment_ids`` is ``[b, S]`` (or ``[S]``). Built on ``segment_ids``' device,
    so a GPU stage can build it from the small id tensor instead of receiving it.
    """
    if segment_ids.dim() == 1:
        segment_ids = segment_ids.unsqueeze(0)
    s = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril_()
    return ~(same & causal).unsqueeze(1)


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> Any:
    """``PackedSeqParams`` (THD) for TransformerEngine from flattened ``cu_seqlens`` (int32, ends at b*S).

    ``max_seqlen`` should be the longest segment: megatron sizes the RoPE table
    from it, and a table as long as the whole flattened row would make the unfused
    THD RoPE use running offsets instead of per-sample restarts (harmless for
    RoPE's relative scores, but not what a per-sample position means).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )


def check_model_honours_mask(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` if any local-path softmax in ``model`` could ignore a block-diagonal mask.

    Call once after building the model when training on packed rows without
    TransformerEngine. It inspects every ``FusedScaleMaskSoftmax``: a causal mask
    type with the fused kernel enabled for half precision, or a sliding window,
    would replace the given mask.
    """
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType

    for name, mod in model.named_modules():
        if not isinstance(mod, FusedScaleMaskSoftmax):
            continue
        if mod.window_size is not None:
            raise ValueError(f"{name}: window_size={mod.window_size} replaces the packed-sequence mask; unset window_size")
        if mod.attn_mask_type == AttnMaskType.causal and mod.scaled_masked_softmax_fusion and mod.input_in_float16:
            raise ValueError(
                f"{name}: attn_mask_type=causal with masked_softmax_fusion in fp16/bf16 runs the "
                "upper-triangular kernel and ignores the packed-sequence mask, so packed samples would "
                "attend to each other; build the self-attention spec with "
                "attn_mask_type=AttnMaskType.arbitrary or set masked_softmax_fusion=False"
            )
