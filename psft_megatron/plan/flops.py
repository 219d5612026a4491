"""FLOPs per optimizer step and the step time at a stated MFU.

Model FLOPs per optimizer step = training (3 x forward) over the mini-batch plus this step's
share of the snapshot pass (PSFT runs one forward over mini-batches 2..k per global batch:
``(k-1)/k`` of a mini-batch forward per step) and of a reference model's pass; forward FLOPs
per token = ``2 x`` the matmul parameters a token passes through (for an expert layer its router
and ``moe_router_topk`` experts, not all of them) + causal attention ``2 * heads * head_dim * s``
per layer over the whole packed row (an upper bound: packed samples attend only within
themselves). Step time = FLOPs / (GPUs x peak x MFU); recompute adds hardware FLOPs, reported
apart, not model FLOPs.

LoRA: the forward adds the adapters' matmuls (2 FLOPs per adapter parameter per token); backward
forms no weight gradient for the frozen base, only the input gradients: training is
``2 x`` the base forward (forward + input gradients) plus ``3 x`` the adapters', not ``3 x``.
"""

from __future__ import annotations

from psft_megatron.model.config import ModelConfig
from psft_megatron.model.lora.count import adapter_parameters_per_model
from psft_megatron.recipe import RecipeConfig

__all__ = ["forward_flops_per_token", "step_flops"]



def forward_flops_per_token(m: ModelConfig, seq: int) -> dict[str, float]:
    """Forward FLOPs per token: the layers (matmuls, causal attention over the packed row) and the head."""
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.query_groups, m.kv_channels, m.ffn_hidden_size
    # The MLP a token passes through, averaged over the layers: dense, or the router and its top-k experts.
    experts = m.moe_router_topk * m.expert_parameters() + (m.num_experts or 0) * h
    mlp = (len(m.dense_layers) * 3 * h * f + len(m.moe_layers) * experts) / m.num_layers
    matmuls = h * d * (a + 2 * g) + a * d * h + mlp
    attention = 2 * a * d * seq  # QK^T and PV, each 2*a*d*(s/2) on average under the causal mask
    adapters = 2 * adapter_parameters_per_model(m) if m.lora is not None else 0
    return {"layers": m.num_layers * (2 * matmuls + attention) + adapters, "attention": m.num_layers * attention,
            "head": 2 * h * m.padded_vocab_size, "adapters": adapters}


def step_flops(recipe: RecipeConfig, m: ModelConfig | None = None) -> dict[str, float]:
    """FLOPs per optimizer step (whole job): model FLOPs, and hardware FLOPs with recompute."""
    m = m or recipe.resolved_model
    tr = recipe.training
    f = forward_flops_per_token(m, tr.seq_length)
    fwd = f["layers"] + f["head"]
    tokens = tr.mini_batch_size * tr.seq_length
    if m.lora is None:
        train = 3 * fwd * tokens
    else:  # frozen base: forward + input gradients; the adapters also their weight gradients
        train = (2 * fwd + f["adapters"]) * tokens
    snapshot = tr.snapshot_mini_batches * fwd * tokens / tr.steps_per_global_batch if recipe.loss.needs_snapshot else 0.0
    reference = fwd * tokens if recipe.loss.needs_reference else 0.0
    recompute = {"full": f["layers"], "selective": f["attention"]}.get(recipe.model.recompute_granularity or "", 0.0)
    model = train + snapshot + reference
    return {"forward_per_token": fwd, "train_per_step": train, "snapshot_per_step": snapshot,
            "reference_per_step": reference, "model_per_step": model,
            "hardware_per_step": model + recompute * tokens, "tokens_per_step": tokens}
