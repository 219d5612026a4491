"""Qwen3-MoE: Qwen3-30B-A3B, 235B-A22B (HF ``model_type: qwen3_moe``, ``Qwen3MoeForCausalLM``).

Qwen3's attention (query/key norms, explicit ``head_dim``, no bias) with megatron-core's MoE
layer in place of the MLP:

* the router (HF ``mlp.gate``, megatron's ``TopKRouter``, no bias): softmax over all experts, the
  top ``num_experts_per_tok``, renormalised to sum to 1 when ``norm_topk_prob`` (megatron: top-k
  of the logits then a softmax over those k, the same numbers; without it megatron's
  ``moe_router_pre_softmax``: the top k of the full softmax, as HF);
* ``num_experts`` experts, each a SwiGLU MLP of ``moe_intermediate_size`` (SequentialMLP on the
  local spec, the grouped GEMM with TransformerEngine; the checkpoint is the same);
* ``mlp_only_layers`` and ``decoder_sparse_step``: the layers not in the first list whose index
  + 1 divides by the step get experts, the others keep a dense MLP of ``intermediate_size``
  (``ModelConfig.moe_dense_layers`` lists the dense ones);
* ``router_aux_loss_coef``: megatron's load-balancing loss coefficient (see
  :mod:`psft_megatron.training.moe_metrics` for how it enters the objective).

The HF checkpoint holds one tensor per expert (``mlp.experts.{e}.gate_proj``...; transformers 5
fuses them into ``gate_up_proj`` in memory and splits them again when saving), converted one by one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from psft_megatron.model.architectures import qwen3
from psft_megatron.model.architectures.base import Architecture, WeightMapping
from psft_megatron.model.architectures.decoder import decoder_hf_config

if TYPE_CHECKING:
    from psft_megatron.model.config import ModelConfig

__all__ = ["ARCHITECTURE", "WEIGHTS", "moe_dense_layers"]

# transformers' Qwen3MoeConfig defaults, for a config.json that leaves a field out.
_DEFAULTS = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": False,
             "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1}

_L = "model.layers.{layer}"
_ATTN = f"{_L}.self_attn"
_DENSE = "model.layers.{dense_layer}.mlp"
_MOE = "model.layers.{moe_layer}"
_EXPERT = "model.layers.{moe_layer}.mlp.experts.{expert}"
_MG_EXPERT = "decoder.layers.{moe_layer}.mlp.experts.local_experts.{expert}"

# Megatron names are the dist-checkpoint's. A MoE layer's pre-MLP norm is its own module
# (pre_mlp_layernorm), not fused into linear_fc1 as in a dense layer: TransformerEngine saves it so,
# and the local spec is made to (psft_megatron.model.build.layer_spec), so one checkpoint serves both.
WEIGHTS = (
    WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    WeightMapping("decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight", (f"{_L}.input_layernorm.weight",)),
    WeightMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.weight",
        (f"{_ATTN}.q_proj.weight", f"{_ATTN}.k_proj.weight", f"{_ATTN}.v_proj.weight"),
        "qkv",
    ),
    WeightMapping("decoder.layers.{layer}.self_attention.linear_proj.weight", (f"{_ATTN}.o_proj.weight",)),
    *qwen3.QK_NORMS,
    # Dense layers (mlp_only_layers, or skipped by decoder_sparse_step).
    WeightMapping(
        "decoder.layers.{dense_layer}.mlp.linear_fc1.layer_norm_weight",
        ("model.layers.{dense_layer}.post_attention_layernorm.weight",),
    ),
    WeightMapping(
        "decoder.layers.{dense_layer}.mlp.linear_fc1.weight", (f"{_DENSE}.gate_proj.weight", f"{_DENSE}.up_proj.weight"),
        "gate_up",
    ),
    WeightMapping("decoder.layers.{dense_layer}.mlp.linear_fc2.weight", (f"{_DENSE}.down_proj.weight",)),
    # Expert layers: the norm, the router, each expert.
    WeightMapping("decoder.layers.{moe_layer}.pre_mlp_layernorm.weight", (f"{_MOE}.post_attention_layernorm.weight",)),
    WeightMapping("decoder.layers.{moe_layer}.mlp.router.weight", (f"{_MOE}.mlp.gate.weight",)),
    WeightMapping(f"{_MG_EXPERT}.linear_fc1.weight", (f"{_EXPERT}.gate_proj.weight", f"{_EXPERT}.up_proj.weight"),
                  "gate_up"),
    WeightMapping(f"{_MG_EXPERT}.linear_fc2.weight", (f"{_EXPERT}.down_proj.weight",)),
    WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightMapping("output_layer.weight", ("lm_head.weight",), "vocab", when="not tie_word_embeddings"),
)


def moe_dense_layers(num_layers: int, mlp_only_layers: list[int], sparse_step: int) -> list[int]:
    """The layers with a dense MLP, as transformers' Qwen3MoeDecoderLayer decides: layer ``i`` gets
    experts unless it is in ``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0``."""
    only = set(mlp_only_layers)
    return [i for i in range(num_layers) if i in only or (i + 1) % sparse_step != 0]


def fields_from_hf(cfg: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of a Qwen3-MoE config.json."""
    cfg = {**_DEFAULTS, **cfg}
    experts = int(cfg.get("num_local_experts", cfg["num_experts"]))  # transformers 5 writes num_local_experts
    if not experts:
        raise ValueError("num_experts=0 (a dense Qwen3-MoE) is not supported: convert it as model_type qwen3")
    if cfg.get("moe_shared_expert_intermediate_size") or cfg.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts are not part of Qwen3-MoE (this looks like Qwen2-MoE), which is not supported")
    fields = qwen3.attention_fields(cfg, "qwen3_moe", default_head_dim=None)
    step = int(cfg["decoder_sparse_step"])
    if step < 1:
        raise ValueError(f"decoder_sparse_step={step} must be >= 1")
    fields.update(
        num_experts=experts,
        moe_ffn_hidden_size=int(cfg["moe_intermediate_size"]),
        moe_router_topk=int(cfg["num_experts_per_tok"]),
        moe_norm_topk_prob=bool(cfg["norm_topk_prob"]),
        moe_aux_loss_coeff=float(cfg["router_aux_loss_coef"]),
        moe_dense_layers=moe_dense_layers(fields["num_layers"], list(cfg.get("mlp_only_layers") or []), step),
    )
    return fields


def to_hf_config(model: "ModelConfig", dtype: str = "float32") -> dict[str, Any]:
    """A Qwen3-MoE config.json for ``model``: its dense layers as ``mlp_only_layers`` with
    ``decoder_sparse_step: 1`` (the same model, however the original file said it)."""
    return dict(
        decoder_hf_config(model, "qwen3_moe", "Qwen3MoeForCausalLM", dtype),
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=None,
        num_experts=model.num_experts,
        moe_intermediate_size=model.moe_ffn_hidden_size,
        num_experts_per_tok=model.moe_router_topk,
        norm_topk_prob=model.moe_norm_topk_prob,
        router_aux_loss_coef=model.aux_loss_coeff,
        decoder_sparse_step=1,
        mlp_only_layers=list(model.moe_dense_layers),
    )


ARCHITECTURE = Architecture(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    hf_class="Qwen3MoeForCausalLM",
    fields_from_hf=fields_from_hf,
    to_hf_config=to_hf_config,
    weights=WEIGHTS,
)
