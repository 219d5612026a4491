"""Activations of a model chunk, the output layer and loss, and micro-batches in flight.

**Full recompute** keeps each layer group's input; the backward of a group holds its
recomputed activations. **In flight** (megatron's schedules, :func:`in_flight_chunks`): one
micro-batch without pipelining; ``min(PP - rank, M)`` with 1F1B;
``min(2 (PP - rank - 1) + (VP - 1) PP + 1, M VP)`` model chunks with the interleaved schedule
(its warm-up plus one). **Working memory at the peak**: the larger of the backward of one layer
(group) and, on the last stage, the output layer and loss: the ``[n, V/TP]`` logits kept from
forward to backward (unfused) and the loss's fp32 chunk buffers, or with
``loss.fused_output_layer`` only the fused head's chunk buffers (:mod:`psft_megatron.loss.fused_head_loss`).
"""

from __future__ import annotations

import math

from psft_megatron.loss.fused_head import fused_chunk_size
from psft_megatron.loss.token_stats import auto_chunk_size
from psft_megatron.model.config import ModelConfig
from psft_megatron.plan.gpus import GiB
from psft_megatron.plan.layer import Kernels, Shape, Term, layer_backward_working, layer_saved, norm_tensors, sum_terms
from psft_megatron.plan.moe import expert_layer_saved, expert_layer_working

__all__ = ["head_terms", "in_flight_chunks", "layer_kept", "stage_activations"]

_DENSE_MLP_ITEMS = ("MLP norm", "fc1 input", "MLP intermediates")


def layer_kept(m: ModelConfig, k: Kernels, sh: Shape, granularity: str | None, expert: bool) -> list[Term]:
    """What one layer keeps for backward: :func:`layer_saved`, with an expert layer's MLP part
    (:func:`psft_megatron.plan.moe.expert_layer_saved`) in place of the dense MLP's."""
    items = layer_saved(m, k, sh, granularity)
    if not expert:
        return items
    return [t for t in items if t.name not in _DENSE_MLP_ITEMS] + expert_layer_saved(m, k, sh)



def in_flight_chunks(pp: int, vp: int | None, pp_rank: int, micro_batches: int) -> int:
    """Model chunks whose activations pipeline rank ``pp_rank`` holds at its peak in one
    mini-batch of ``micro_batches`` micro-batches (megatron's warm-up forwards plus one)."""
    if pp == 1:
        return 1  # forward_backward_no_pipelining: each micro-batch's backward follows its forward
    if not vp or vp == 1:
        return min(pp - pp_rank, micro_batches)  # 1F1B: warm-up min(pp - rank - 1, M), then one more
    total = micro_batches * vp
    warmup = 2 * (pp - pp_rank - 1) + (vp - 1) * pp  # microbatch_group_size_per_vp_stage = pp
    return total if warmup >= total else warmup + 1


def head_terms(m: ModelConfig, sh: Shape, fused: bool, device: str) -> tuple[list[Term], dict[str, float]]:
    """Working memory of the output layer and the loss on the last stage for one micro-batch.

    Unfused: the ``[n, V/TP]`` logits (kept from forward to backward; the loss writes their
    gradient in place) plus the larger of the loss's two fp32 chunk buffers and the output
    layer's backward (input gradient, SP-gathered input, weight gradient). Fused
    (:mod:`psft_megatron.loss.fused_head_loss`, gradients formed in the forward pass): the larger
    of its forward (SP-gathered input, the chunk buffers: logits of one chunk in the weight's dtype
    and fp32 and two row blocks, the input gradient) and its backward (the input gradient and
    megatron's dummy weight gradient); the weight's gradient goes straight into main_grad.
    """
    n_full = sh.seq * sh.micro / sh.cp  # the output layer sees this rank's whole CP share
    e, t, h = sh.act_bytes, sh.tp, m.hidden_size
    v_local = m.padded_vocab_size // t
    gathered = n_full * h * e if sh.sp and t > 1 else 0
    wgrad = v_local * h * e
    block_rows = min(n_full, auto_chunk_size(v_local, device))
    logits = n_full * v_local * e
    if fused:
        rows = min(n_full, fused_chunk_size(v_local, device))
        bufs = rows * v_local * (4 + (e if e != 4 else 0)) + 2 * block_rows * v_local * 4
        work = max(gathered + bufs + n_full * h * e, n_full * h * e + wgrad)
        unfused_work = logits + max(2 * block_rows * v_local * 4, gathered + n_full * h * e + wgrad)
        return ([Term("output layer + loss (fused: logits never exist)", work,
                      f"chunk buffers {bufs / GiB:.2f} GiB; unfused would hold {unfused_work / GiB:.2f} GiB")],
                {"logits": 0.0, "fused": work, "unfused": unfused_work})
    work = logits + max(2 * block_rows * v_local * 4, gathered + n_full * h * e + wgrad)
    rows = min(n_full, fused_chunk_size(v_local, device))
    bufs = rows * v_local * (4 + (e if e != 4 else 0)) + 2 * block_rows * v_local * 4
    fused_work = max(gathered + bufs + n_full * h * e, n_full * h * e + wgrad)
    return ([Term("output layer + loss (logits kept to backward)", work,
                  f"logits {logits / GiB:.2f} GiB; loss.fused_output_layer: true would need {fused_work / GiB:.2f} GiB")],
            {"logits": logits, "fused": fused_work, "unfused": work})


def stage_activations(m: ModelConfig, k: Kernels, sh: Shape, layers: int, first: bool, last: bool,
                      expert_layers: int = 0) -> dict[str, float]:
    """Activations one micro-batch keeps on a chunk of ``layers`` layers (``first``/``last``: it holds
    the embedding / the final norm and output layer), and the working memory of its backward.
    ``expert_layers``: how many of the layers are mixture-of-experts layers."""
    selective = m.recompute_granularity if m.recompute_granularity == "selective" else None
    dense = layers - expert_layers
    kinds = [(n, expert) for n, expert in ((dense, False), (expert_layers, True)) if n]
    # The larger layer (recomputed groups), and the kept bytes per layer averaged over the chunk's layers.
    full_layer = max((sum_terms(layer_kept(m, k, sh, None, expert)) for _, expert in kinds), default=0.0)
    per_layer = sum(n * sum_terms(layer_kept(m, k, sh, selective, expert)) for n, expert in kinds) / max(layers, 1)
    group_input = sh.tokens * m.hidden_size / sh.seq_shard * sh.act_bytes
    bwd = max(layer_backward_working(m, k, sh) if dense else 0.0,
              layer_backward_working(m, k, sh, mlp=expert_layer_working(m, sh)) if expert_layers else 0.0)
    g = m.recompute_granularity
    if g == "full" and m.recompute_method == "uniform":
        n_r = min(m.recompute_num_layers, layers)
        kept = math.ceil(layers / n_r) * group_input
        working = n_r * full_layer + bwd  # one group recomputed while it runs backward
    elif g == "full":  # block: the first n layers recomputed one at a time, the rest keep everything
        n_r = min(m.recompute_num_layers, layers)
        kept = n_r * group_input + (layers - n_r) * full_layer
        # Backward runs last layer first: the recomputed (first) layers come when the others are freed.
        working = bwd if n_r < layers else full_layer + bwd
    else:
        kept = layers * per_layer
        # Selective: the core attention is recomputed (its scores come back) during the layer's backward.
        working = bwd + (full_layer - per_layer if g == "selective" else 0)
    extra = 0.0
    row = sh.tokens * m.hidden_size / sh.seq_shard * sh.act_bytes
    if first:
        extra += sh.tokens * 8  # the embedding's token ids
        if m.lora is not None:  # a frozen embedding: the first layer's input norm has nothing to save for
            extra -= row * norm_tensors(m, k) + (sh.tokens / sh.seq_shard * 4 if k.norm_stats else 0)
    if last:  # final norm (input, normalised input, stats) and the output layer's input (not when frozen: LoRA)
        extra += row * (norm_tensors(m, k) + (0 if m.lora is not None else 1))
    # The pipeline keeps each chunk's output for its backward (megatron does not free it).
    if not last:
        extra += group_input
    # Shared by the layers: the local spec's [b, 1, s, s] mask; under full recompute, the RoPE table.
    if k.attention == "unfused" and sh.cp == 1:
        extra += sh.micro * sh.seq * sh.seq
    if g == "full":
        extra += sh.seq / sh.cp * m.kv_channels * 4
    return {"kept": kept + extra, "working": working, "full_layer": full_layer}
