"""What one transformer layer keeps for backward, tensor by tensor, for one micro-batch on one rank.

The list of tensors autograd keeps: norm inputs (and, for torch's composite RMSNorm, the
normalised input), the linear layers' inputs, Q/K/V (and Qwen3's query/key norms' inputs), the
attention output, the MLP's intermediates. Tokens per rank ``n = s * b / CP``; tensors outside the tensor-parallel
regions are ``/TP`` only with sequence parallelism. Attention:

* TransformerEngine (``transformer_impl`` auto/transformer_engine: what a GPU job runs):
  flash attention keeps Q, K, V, its output and the fp32 softmax statistics; no ``[s, s]``
  tensor exists. ``selective`` recompute then saves almost nothing.
* the local spec (``transformer_impl: local``, and every CPU run): megatron's unfused
  ``DotProductAttention`` materialises the scores. It keeps the softmax output in fp32 (plus
  its bf16 cast with bf16 weights), K and V expanded to every head, per-layer RoPE cos/sin
  tables and, under CP, the ``[n, keys]`` mask. ``selective`` recompute keeps the attention's
  inputs instead.

With GPT-3's choices (LayerNorm, GELU MLP, dropout, 16-bit softmax) the same item list sums
to Korthikanti et al. 2022 (Table 2): ``s*b*h*(34 + 5*a*s/h)`` bytes, ``/t`` with TP + SP,
``34/t`` with selective recompute (``tests/test_plan.py`` checks it).

LoRA (``model.lora``): a frozen linear keeps no input (megatron's ``linear_with_frozen_weight``
saves only its weight) and forms no weight gradient; an adapted one's input is kept by the
adapter's ``x A^T`` (under dropout the dropped copy and its mask instead), plus the adapter's
``[n, units x r]`` intermediate that B reads. A frozen norm keeps no normalised input (only the
weight's gradient needs it): :func:`norm_tensors` is one less for torch's composite RMSNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psft_megatron.model.config import ModelConfig
from psft_megatron.model.lora.spec import lora_plans

__all__ = ["Kernels", "Shape", "Term", "kernels_for", "layer_backward_working", "layer_saved", "lora_saved",
           "norm_tensors", "sum_terms"]


@dataclass(frozen=True)
class Kernels:
    """How a transformer layer is computed, as far as what it keeps for backward is concerned.

    ``norm_tensors``: ``[n, h]`` tensors a norm keeps (its input; torch's composite RMSNorm also
    the normalised input). ``mlp``: ``gelu`` keeps the activation's input and output; megatron's
    unfused SwiGLU ``silu(x1) * (x2 + 0)`` keeps the fc1 output ``2f``, ``silu(x1)``, ``x2 + 0``
    and the fc2 input (``5f``). ``attention``: ``flash`` or ``unfused`` (scores materialised;
    ``score_bytes`` per score kept: softmax output and casts, dropout mask and output).
    ``expand_kv``: unfused GQA repeats K and V to every head and keeps the copies.
    ``rope_tables``: the unfused RoPE keeps cos and sin per layer for Q and K.
    ``selective_keeps_qkv``: under selective recompute V is a view of the fused QKV output, so the
    checkpoint keeps that whole tensor alive.
    """

    norm_tensors: int
    norm_stats: bool  # one fp32 (or activation-dtype) scalar per token and norm
    mlp: Literal["gelu", "swiglu", "swiglu_fused"]
    attention: Literal["flash", "unfused"]
    score_bytes: int
    dropout_masks: bool = False
    expand_kv: bool = False
    rope_tables: bool = False
    selective_keeps_qkv: bool = True


def kernels_for(impl: str, act_bytes: int) -> Kernels:
    """The kernels megatron-core runs for ``impl`` (``transformer_engine`` or ``local``)."""
    if impl == "transformer_engine":
        # TE's LayerNormLinear keeps its input and the norm output (+ rsigma); flash attention
        # keeps q, k, v (contiguous copies), its output and the fp32 log-sum-exp.
        return Kernels(norm_tensors=1, norm_stats=True, mlp="swiglu", attention="flash", score_bytes=0)
    # torch's RMSNorm keeps input, normalised input and rstd; the softmax output is fp32
    # (attention_softmax_in_fp32) plus, for 16-bit weights, the cast that bmm keeps.
    return Kernels(norm_tensors=2, norm_stats=True, mlp="swiglu", attention="unfused",
                   score_bytes=4 if act_bytes == 4 else 4 + act_bytes, expand_kv=True, rope_tables=True)


@dataclass(frozen=True)
class Shape:
    """One micro-batch on one rank."""

    seq: int  # packed row length
    micro: int  # rows per micro-batch
    tp: int = 1
    cp: int = 1
    sp: bool = False
    act_bytes: int = 2
    ep: int = 1  # expert parallelism (mixture-of-experts models)
    etp: int = 1  # tensor parallelism inside each expert
    dispatcher: str = "allgather"  # the MoE token dispatcher

    @property
    def tokens(self) -> float:
        """Tokens of the micro-batch on this rank (its CP share)."""
        return self.seq * self.micro / self.cp

    @property
    def seq_shard(self) -> int:
        """Split of tensors outside the tensor-parallel regions (sequence parallelism)."""
        return self.tp if self.sp else 1

    @property
    def keys(self) -> int:
        """Keys each query is scored against by unfused attention: its row, or under CP every
        rank's tokens of the micro-batch (the local CP attention all-gathers K/V over THD rows)."""
        return self.seq * self.micro if self.cp > 1 else self.seq


@dataclass(frozen=True)
class Term:
    """One line of the plan: a name, bytes, and how they were counted."""

    name: str
    bytes: float
    detail: str = ""


def _attention_saved(m: ModelConfig, k: Kernels, sh: Shape) -> list[Term]:
    n, t, e = sh.tokens, sh.tp, sh.act_bytes
    a, g, d = m.num_attention_heads, m.query_groups, m.kv_channels
    if k.attention == "flash":
        return [Term("q, k, v (flash attention)", n * (a + 2 * g) * d / t * e),
                Term("softmax statistics (fp32)", n * a / t * 4)]
    kv_heads = a if k.expand_kv else g
    items = [Term("q, k, v (unfused attention" + (", K/V expanded" if k.expand_kv else "") + ")",
                  n * a * d / t * e + 2 * (n * sh.keys / sh.seq) * kv_heads * d / t * e),
             Term("attention scores", n * a / t * sh.keys * k.score_bytes)]
    if k.rope_tables:  # cos and sin for q and k: [s/CP, d] each, per layer
        items.append(Term("RoPE cos/sin", 4 * sh.seq / sh.cp * d * e))
    if sh.cp > 1:  # the local CP attention builds its [n, keys] mask inside every layer
        items.append(Term("attention mask (per layer)", n * sh.keys))
    return items


def norm_tensors(m: ModelConfig, k: Kernels) -> int:
    """``[n, h]`` tensors one norm keeps: its input, and (torch's composite RMSNorm, trained weight) the
    normalised input, which only the weight's gradient reads."""
    return k.norm_tensors - 1 if m.lora is not None and k.norm_tensors > 1 else k.norm_tensors


def _linear_input(m: ModelConfig, module: str, elements: float, e: int) -> float:
    """Bytes one linear's input costs in backward: kept by the linear itself (full fine-tuning), by its
    adapter (LoRA; under dropout the dropped copy and its mask, which torch's CPU dropout keeps as a
    noise tensor of the input's dtype: counted so, an upper bound for CUDA's 1-byte mask), or not at
    all (frozen, no adapter)."""
    if m.lora is None:
        return elements * e
    if module not in lora_plans(m.family, m.lora):
        return 0.0
    return elements * (2 * e if m.lora.dropout else e)


def lora_saved(m: ModelConfig, sh: Shape) -> float:
    """The adapters' own tensors kept per layer: ``h = x A^T`` (scaled), which B reads; a column-parallel
    linear's ``[n, units x r]`` over the whole sequence (gathered under SP), a row-parallel's ``[n/SP, r]``."""
    if m.lora is None:
        return 0.0
    n, e, r = sh.tokens, sh.act_bytes, m.lora.rank
    total = 0.0
    for plan in lora_plans(m.family, m.lora).values():
        total += n * len(plan.units) * r * e if plan.target.kind == "column" else n / sh.seq_shard * r * e
    return total


def layer_saved(m: ModelConfig, k: Kernels, sh: Shape, granularity: str | None = None) -> list[Term]:
    """What one transformer layer keeps for backward for one micro-batch on one rank.

    ``granularity`` None or ``selective`` (core attention recomputed: its inputs kept instead).
    Full recompute keeps only layer-group inputs: see :func:`stage_activations`. With LoRA the
    linears' inputs are kept only where an adapter reads them (see the module docstring).
    """
    n, t, e, ss = sh.tokens, sh.tp, sh.act_bytes, sh.seq_shard
    h, f, a, g, d = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.query_groups, m.kv_channels
    norm = n * h / ss * e * norm_tensors(m, k) + (n / ss * (4 if e == 4 else e) if k.norm_stats else 0)
    items = [Term("input norm", norm), Term("QKV input", _linear_input(m, "linear_qkv", n * h / ss, e))]
    if m.qk_layernorm:  # Qwen3's per-head query/key norms keep what any norm keeps, on q and k
        qk = n * (a + g) * d / t
        items.append(Term("query/key norms", qk * e * norm_tensors(m, k) + (qk / d * (4 if e == 4 else e) if k.norm_stats else 0)))
    if granularity == "selective":
        v = (a + 2 * g) * d if k.selective_keeps_qkv else g * d  # V: a view of the fused QKV output
        items.append(Term("q, k, v (kept for the recomputed attention)", n * (a * d + g * d + v) / t * e))
    else:
        items += _attention_saved(m, k, sh)
    items.append(Term("attention output (projection input)", _linear_input(m, "linear_proj", n * a * d / t, e)))
    if k.dropout_masks:
        items.append(Term("dropout mask", n * h / ss))
    items += [Term("MLP norm", norm), Term("fc1 input", _linear_input(m, "linear_fc1", n * h / ss, e))]
    # The activation's own tensors, then fc2's input (the activation's output): kept by fc2 or its adapter.
    mlp_widths = {"gelu": f, "swiglu": 4 * f, "swiglu_fused": 2 * f}
    items.append(Term("MLP intermediates", n * mlp_widths[k.mlp] / t * e + _linear_input(m, "linear_fc2", n * f / t, e)))
    if k.dropout_masks:
        items.append(Term("dropout mask", n * h / ss))
    if m.lora is not None:
        items.append(Term("LoRA adapters' intermediates (x A^T)", lora_saved(m, sh)))
    return items


def sum_terms(terms: list[Term]) -> float:
    """Total bytes of ``terms``."""
    return sum(x.bytes for x in terms)


def layer_backward_working(m: ModelConfig, k: Kernels, sh: Shape, mlp: float | None = None) -> float:
    """Gradients alive while one layer runs backward (the larger of its attention and its MLP),
    plus the weight gradient megatron's linear layers materialise before adding it to main_grad.
    ``mlp``: the MLP part's figure when it is not the dense MLP's (an expert layer's)."""
    n, t, e = sh.tokens, sh.tp, sh.act_bytes
    h, f, a, g, d = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.query_groups, m.kv_channels
    # SP re-gathers a linear's input in backward for its weight gradient; a frozen (LoRA) base forms none.
    wgrad = 0 if m.lora is not None else 1
    gathered = n * h * e if sh.sp and t > 1 and wgrad else 0
    if mlp is None:  # grads of fc1 out (2f), silu/linear parts; fc1 wgrad
        mlp = n * 4 * f / t * e + wgrad * 2 * f * h / t * e + gathered
    if k.attention == "flash":
        attn = 2 * n * (a + 2 * g) * d / t * e + wgrad * (a + 2 * g) * d * h / t * e + gathered
    else:  # grads of the probabilities and of the scores (fp32), dq and the expanded dk, dv
        kv = a if k.expand_kv else g
        attn = 2 * n * a / t * sh.keys * 4 + n * (a + 2 * kv) * d / t * e
    return max(mlp, attn)
