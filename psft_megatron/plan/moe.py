"""Mixture-of-experts layers in the plan: expert weights over EP, routed-token activations, dispatcher buffers.

**Parameters.** An expert layer holds the router (``[E, h]``, replicated over TP) and ``E / EP``
experts of ``3 h I / ETP`` each (gate, up, down of ``moe_ffn_hidden_size`` ``I``, split over expert
TP). Their gradients sit in the same fp32 buffers as the dense ones; the distributed optimizer
shards the expert parameters' state over the expert-data-parallel ranks
(``world / (ETP x EP x PP)``), the dense ones' over DP x CP.

**Activations** (per micro-batch and rank; ``n`` tokens of the micro-batch on this rank's CP
share, ``n / TP`` with SP, which MoE requires at TP > 1). The router keeps its input, the
softmax scores of the load-balancing loss and the routing map (``[n, E]``, fp32 and bool). The
experts see ``rows = n x k x ETP / SP`` routed rows (the allgather dispatcher gathers the tokens
of the TP x EP group and each rank keeps those of its ``E / EP`` experts), counted at **balanced
routing**: every expert its mean share (dropless routing has no capacity; a collapsing router sends
up to EP x more rows to one rank, which ``expert_load_max_over_mean`` in metrics.jsonl shows). Per
routed row an expert keeps its input (``h``) and megatron's unfused SwiGLU intermediates plus the
routing-weight product (``6 I / ETP``; TransformerEngine's grouped GEMM: the same tensors).

**Dispatcher buffers.** allgather: the gathered tokens ``[n EP, h]`` live in megatron's global
memory buffer, allocated once and kept (counted with the persistent buffers), and each layer's
forward and backward briefly hold the gathered routing probabilities ``[n EP, E]`` and the
combined output before its reduce-scatter (fp32: routing runs in fp32). alltoall: the routed rows
sent and received (``2 x rows x h``). Checked against what torch's profiler sees on a CPU run
(``tests/test_moe.py``).
"""

from __future__ import annotations

from psft_megatron.model.config import ModelConfig
from psft_megatron.plan.layer import Kernels, Shape, Term

__all__ = ["chunk_layers", "expert_layer_saved", "expert_layer_working", "dispatcher_buffers", "routed_rows",
           "stage_expert_parameters"]

_INDEX_BYTES = 8  # int64 indices of the top-k choice and the permutation


def chunk_layers(num_layers: int, pp: int, vp: int | None, pp_rank: int) -> list[list[int]]:
    """Global layer indices of each model chunk of pipeline rank ``pp_rank`` (megatron's even split:
    with VP chunks, chunk ``c`` of rank ``r`` holds ``L / (PP VP)`` layers from ``c L / VP + r L / (PP VP)``)."""
    chunks = vp or 1
    per = num_layers // (pp * chunks)
    return [list(range(c * num_layers // chunks + pp_rank * per, c * num_layers // chunks + (pp_rank + 1) * per))
            for c in range(chunks)]


def routed_rows(m: ModelConfig, sh: Shape) -> float:
    """Rows one rank's experts process for one micro-batch at balanced routing (see the module doc)."""
    return sh.tokens * m.moe_router_topk * sh.etp / sh.seq_shard


def stage_expert_parameters(m: ModelConfig, layers: list[int], tp: int, ep: int, etp: int) -> tuple[int, int]:
    """(router parameters, expert parameters) of ``layers`` on one rank: the router replicated over
    TP, ``E / EP`` experts split over expert TP."""
    moe = [i for i in layers if i in set(m.moe_layers)]
    router = len(moe) * (m.num_experts or 0) * m.hidden_size
    experts = len(moe) * ((m.num_experts or 0) // ep) * m.expert_parameters() // etp
    return router, experts


def expert_layer_saved(m: ModelConfig, k: Kernels, sh: Shape) -> list[Term]:
    """What an expert layer's MLP part keeps for backward (replacing the dense MLP's items)."""
    n, e, ss = sh.tokens, sh.act_bytes, sh.seq_shard
    h, experts, topk = m.hidden_size, m.num_experts or 0, m.moe_router_topk
    norm = n * h / ss * e * k.norm_tensors + (n / ss * (4 if e == 4 else e) if k.norm_stats else 0)
    rows = routed_rows(m, sh)
    width = (m.moe_ffn_hidden_size or 0) / sh.etp
    router = n / ss * experts * (4 * (1 if m.aux_loss_coeff > 0 else 0) + 1) + n / ss * topk * (4 + 2 * _INDEX_BYTES)
    local_map = n * sh.ep * sh.etp / ss * experts / sh.ep  # the dispatcher's local routing map (bool)
    return [
        Term("MLP norm", norm),
        Term("router input", n * h / ss * e),
        Term("router scores, routing map (fp32, bool)", router + local_map),
        Term("routed rows (expert inputs)", rows * (h * e + _INDEX_BYTES)),
        Term("expert intermediates", rows * 6 * width * e),
    ]


def expert_layer_working(m: ModelConfig, sh: Shape) -> float:
    """Gradients alive in an expert layer's MLP backward: the experts' intermediates and routed-row
    gradients, one expert's weight gradient, and the dispatcher's gradient exchange."""
    e, h = sh.act_bytes, m.hidden_size
    rows = routed_rows(m, sh)
    width = (m.moe_ffn_hidden_size or 0) / sh.etp
    return rows * (4 * width + h) * e + 3 * h * width * e + dispatcher_buffers(m, sh)["working"]


def dispatcher_buffers(m: ModelConfig, sh: Shape) -> dict[str, float]:
    """The token dispatcher's ``persistent`` (allgather: megatron's global buffer of gathered
    tokens) and per-layer ``working`` bytes for one micro-batch (none without TP x EP > 1)."""
    group = sh.etp * sh.ep  # the TP x EP group the dispatcher spans (expert TP x EP)
    if group == 1:
        return {"persistent": 0.0, "working": 0.0}
    n, e, h, ss = sh.tokens, sh.act_bytes, m.hidden_size, sh.seq_shard
    gathered = n / ss * group  # tokens of the group
    if sh.dispatcher == "alltoall":
        return {"persistent": 0.0, "working": 2 * routed_rows(m, sh) * h * e}
    return {"persistent": gathered * h * e,
            "working": gathered * ((m.num_experts or 0) * 4 + h * 4) + n / ss * h * 4}
