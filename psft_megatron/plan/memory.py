"""A recipe's memory per GPU, term by term, for the worst rank of each pipeline-stage kind.

**Weights, gradients, optimizer** (megatron's bytes per parameter, its distributed-optimizer
table; Megatron-LM's ``theoretical_memory_usage``): weights in ``params_dtype`` (2 or 4),
gradients in the fp32 ``main_grad`` buffer (4: ``grad_reduce_in_fp32``), Adam's two fp32
moments (8) and, for bf16 weights, an fp32 main copy (4). bf16: 18 bytes, or ``6 + 12/d``
with the distributed optimizer; fp32: 16, or ``8 + 8/d``; ``d`` = DP x CP, the group
megatron shards the optimizer over. Parameters per rank: ``1/PP`` of the layers (TP-sharded
except the norms), the embedding on the first stage, the output layer (or, tied, a copy of
the embedding) and the final norm on the last. Activations: :mod:`psft_megatron.plan.layer`
and :mod:`psft_megatron.plan.stage`. Mixture of experts (:mod:`psft_megatron.plan.moe`): an
expert layer's ``E / EP`` experts (split over expert TP) and its router; the experts' optimizer
state is sharded over the expert-data-parallel ranks ``world / (ETP x EP x PP)``.

LoRA (``model.lora``): the base weights are held, frozen (no gradient buffer, no optimizer state);
the adapters (``1/TP`` of B for a column-parallel linear, of A for a row-parallel one, the other
half whole) are weights, fp32 gradients and optimizer state like any trained parameter. sft_kl's
reference is the base itself (the adapters switched off): no second copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psft_megatron.model.config import ModelConfig
from psft_megatron.model.lora.count import adapter_parameters_per_layer
from psft_megatron.plan.flops import step_flops
from psft_megatron.plan.gpus import DEFAULT_MFU, FRAMEWORK_RESERVE, USABLE_FRACTION, GiB, GpuSpec
from psft_megatron.plan.layer import Shape, Term, kernels_for, sum_terms
from psft_megatron.plan.moe import chunk_layers, dispatcher_buffers, stage_expert_parameters
from psft_megatron.plan.stage import head_terms, in_flight_chunks, stage_activations
from psft_megatron.recipe import RecipeConfig

__all__ = ["Plan", "StageMemory", "optimizer_bytes_per_param", "plan_recipe", "stage_adapter_parameters",
           "stage_parameter_split", "stage_parameters"]

BATCH_BYTES_PER_TOKEN = 32  # token ids, labels, position ids (int64), loss mask (fp32), segment ids (int32)



def _layer_parameters(m: ModelConfig, tp: int, expert_layer: bool = False) -> float:
    """One layer's parameters on one TP rank, without an expert layer's router and experts."""
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.query_groups, m.kv_channels, m.ffn_hidden_size
    qkv = h * d * (a + 2 * g) + (d * (a + 2 * g) if m.qkv_bias else 0)
    mlp = 0 if expert_layer else 3 * h * f
    norms = 2 * h + (2 * d if m.qk_layernorm else 0)  # replicated over TP (the q/k norms: one head's size)
    return (qkv + a * d * h + mlp) / tp + norms


def stage_parameter_split(m: ModelConfig, tp: int, pp: int, pp_rank: int, *, ep: int = 1, etp: int | None = None,
                          vp: int | None = None) -> tuple[int, int]:
    """(dense, expert) parameters held by one rank of pipeline stage ``pp_rank`` (any TP and EP rank:
    they hold the same count). Dense: the layers' attention, norms, dense MLPs and routers, the
    embedding on the first stage, the final norm and output layer (or, tied with PP > 1, the last
    stage's copy of the embedding) on the last. Expert: ``E / EP`` experts of each expert layer,
    split over expert TP (``etp``, default TP)."""
    layers = [i for chunk in chunk_layers(m.num_layers, pp, vp, pp_rank) for i in chunk]
    moe = set(m.moe_layers)
    vocab = m.padded_vocab_size * m.hidden_size // tp
    dense = sum(_layer_parameters(m, tp, i in moe) for i in layers)
    router, experts = stage_expert_parameters(m, layers, tp, ep, etp or tp)
    dense += router
    if pp_rank == 0:
        dense += vocab
    if pp_rank == pp - 1:
        dense += m.hidden_size
        if not m.tie_word_embeddings or pp > 1:
            dense += vocab
    return int(round(dense)), int(experts)


def stage_parameters(m: ModelConfig, tp: int, pp: int, pp_rank: int, *, ep: int = 1, etp: int | None = None,
                     vp: int | None = None) -> int:
    """Parameters held by one rank of pipeline stage ``pp_rank`` (any TP rank: they hold the same count).

    ``1/PP`` of the layers; the embedding on the first stage; on the last the final norm and the
    output layer, or for tied embeddings with PP > 1 the last stage's copy of the embedding; for a
    mixture-of-experts model ``1/EP`` of each expert layer's experts (see :func:`stage_parameter_split`).
    """
    return sum(stage_parameter_split(m, tp, pp, pp_rank, ep=ep, etp=etp, vp=vp))


def stage_adapter_parameters(m: ModelConfig, tp: int, pp: int) -> int:
    """LoRA adapter parameters held by one rank of a pipeline stage (0 without ``model.lora``)."""
    if m.lora is None:
        return 0
    return int(round(m.num_layers // pp * adapter_parameters_per_layer(m, tp)))


def optimizer_bytes_per_param(params_dtype: str, distributed: bool, shards: int) -> float:
    """Optimizer state per parameter: fp32 Adam moments (8) and, for bf16 weights, the fp32 main copy
    (4); sharded over ``shards`` = DP x CP ranks by the distributed optimizer."""
    state = 12 if params_dtype == "bf16" else 8
    return state / shards if distributed else state


@dataclass
class StageMemory:
    """Memory of one rank of a pipeline stage, term by term (see :func:`plan_recipe`)."""

    stage: str  # "first", "last" or "only"
    pp_rank: int
    params: int
    static: list[Term]  # weights, gradients, optimizer state (the recipe's choice), reference model
    optimizer_alternative: Term  # the optimizer state the other choice of use_distributed_optimizer gives
    kept_per_micro_batch: float  # activations one in-flight micro-batch (all chunks of this rank) keeps
    in_flight: float  # micro-batches in flight, in units of this rank's layers
    in_flight_detail: str
    kept: Term
    working: list[Term]  # candidates for the peak's working memory; the largest counts
    other: list[Term]  # batch tensors, persistent buffers, the framework reserve
    head: dict[str, float] = field(default_factory=dict)  # logits / fused figures (last stage)

    @property
    def peak_working(self) -> Term:
        return max(self.working, key=lambda x: x.bytes)

    @property
    def terms(self) -> list[Term]:
        """The terms that add up to the total."""
        return [*self.static, self.kept, self.peak_working, *self.other]

    @property
    def total(self) -> float:
        return sum_terms(self.terms)


@dataclass
class Plan:
    """Per-GPU memory of each pipeline-stage kind, and FLOPs and time per optimizer step."""

    source: str
    gpu: GpuSpec
    gpu_assumed: bool
    world_size: int
    tp: int
    pp: int
    vp: int | None
    cp: int
    dp: int
    sp: bool
    seq: int
    micro: int
    micro_batches: int  # per mini-batch per DP rank
    k: int
    model: ModelConfig
    impl: str
    recompute: str
    stages: list[StageMemory]
    flops: dict[str, float]
    mfu: float
    device: str = "cuda"
    notes: list[str] = field(default_factory=list)
    ep: int = 1
    etp: int = 1
    edp: int = 1  # expert-data-parallel size

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_bytes * USABLE_FRACTION

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.usable_bytes

    @property
    def step_seconds(self) -> float | None:
        if not self.gpu.peak_flops:
            return None
        return self.flops["model_per_step"] / (self.world_size * self.gpu.peak_flops * self.mfu)


def _impl(model: ModelConfig, device: str) -> str:
    """The layer spec a job on ``device`` will use: ``auto`` means TransformerEngine on a GPU."""
    if model.transformer_impl == "local" or device == "cpu":
        return "local"
    return "transformer_engine"


def _recompute_name(m: ModelConfig) -> str:
    if m.recompute_granularity is None:
        return "none"
    if m.recompute_granularity == "selective":
        return "selective (core attention)"
    return f"full, {m.recompute_method}, {m.recompute_num_layers} layer(s)"


def plan_recipe(recipe: RecipeConfig, world_size: int, gpu: GpuSpec, *, mfu: float = DEFAULT_MFU,
                gpu_assumed: bool = False, device: str = "cuda") -> Plan:
    """The per-GPU plan of ``recipe`` on ``world_size`` GPUs of kind ``gpu`` (validate the recipe first).

    ``device="cpu"`` plans a CPU run (the local spec, CPU chunk sizes): what the tests measure.
    """
    m = recipe.resolved_model
    par, tr = recipe.parallel, recipe.training
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    vp = par.virtual_pipeline_model_parallel_size
    dp = par.data_parallel_size(world_size)
    ep, etp = (par.expert_model_parallel_size, par.expert_tp_size) if m.is_moe else (1, 1)
    edp = par.expert_data_parallel_size(world_size) if m.is_moe else dp * cp
    chunks_per_rank = vp or 1
    impl = _impl(m, device)
    act_bytes = 2 if m.params_dtype == "bf16" else 4
    param_bytes = act_bytes
    k = kernels_for(impl, act_bytes)
    sh = Shape(tr.seq_length, tr.micro_batch_size, tp, cp, par.sequence_parallel, act_bytes, ep, etp,
               par.moe_token_dispatcher)
    micro_batches = tr.mini_batch_size // (tr.micro_batch_size * dp)
    snapshot_minis = tr.snapshot_mini_batches
    layers_per_chunk = m.num_layers // (pp * chunks_per_rank)
    loss = recipe.loss
    dist_opt = recipe.optimizer.use_distributed_optimizer
    notes: list[str] = []

    ranks = [0] if pp == 1 else [0, pp - 1]
    stages = []
    for r in ranks:
        kind = "only" if pp == 1 else ("first" if r == 0 else "last")
        first, last = r == 0, r == pp - 1
        dense_params, expert_params = stage_parameter_split(m, tp, pp, r, ep=ep, etp=etp, vp=vp)
        base = dense_params + expert_params
        adapters = stage_adapter_parameters(m, tp, pp)
        params = base + adapters
        trained = adapters if m.lora is not None else params  # LoRA: the base is frozen

        def opt_bytes(distributed: bool) -> float:  # dense state sharded over DP x CP, experts' over expert DP
            if m.lora is not None:  # only the adapters train (never in expert linears): over DP x CP
                return optimizer_bytes_per_param(m.params_dtype, distributed, dp * cp) * adapters
            return (optimizer_bytes_per_param(m.params_dtype, distributed, dp * cp) * dense_params
                    + optimizer_bytes_per_param(m.params_dtype, distributed, edp) * expert_params)

        opt_used, opt_other = opt_bytes(dist_opt), opt_bytes(not dist_opt)
        state = "fp32 Adam moments" + (" + fp32 main params" if m.params_dtype == "bf16" else "")
        experts_note = (f" ({expert_params / 1e9:.3f}B in {m.num_experts // ep} of {m.num_experts} experts per layer, "
                        f"EP {ep}, expert TP {etp})" if m.is_moe else "")
        shard = f"DP x CP = {dp * cp}" + (f", experts over expert DP = {edp}" if m.is_moe and m.lora is None else "")
        held = f"{params / 1e9:.3f}B parameters on this rank{experts_note}"
        if m.lora is not None:
            held += f" ({base / 1e9:.3f}B frozen base + {adapters / 1e6:.1f}M LoRA adapter)"
            state += ", adapters only"
        static = [
            Term(f"weights ({m.params_dtype})", params * param_bytes, held),
            Term("gradients (fp32 main_grad)", trained * 4.0, "adapters only" if m.lora is not None else ""),
            Term("optimizer state, " + (f"distributed over {shard}" if dist_opt else "not distributed"),
                 opt_used, state),
        ]
        if loss.needs_reference or tr.eval_kl_to_start:
            users = ([loss.name] if loss.needs_reference else []) + (["eval_kl_to_start"] if tr.eval_kl_to_start else [])
            if m.lora is not None:
                static.append(Term(f"frozen starting model for {', '.join(users)}", 0.0,
                                   "the base: the adapters switched off"))
            else:
                static.append(Term(f"frozen starting model for {', '.join(users)} (weights only)", params * param_bytes))
        alt = Term("optimizer state, " + ("not distributed" if dist_opt else f"distributed over {shard}"),
                   opt_other, "the other choice of optimizer.use_distributed_optimizer")

        # Each chunk of this rank: activations one micro-batch keeps, averaged over chunks (chunk 0 of
        # the first stage has the embedding, the last chunk of the last stage the head).
        per_chunk = []
        working = 0.0
        moe_layers = set(m.moe_layers)
        for c, layer_ids in enumerate(chunk_layers(m.num_layers, pp, vp, r)):
            a = stage_activations(m, k, sh, layers_per_chunk, first and c == 0, last and c == chunks_per_rank - 1,
                                  expert_layers=sum(i in moe_layers for i in layer_ids))
            per_chunk.append(a["kept"])
            working = max(working, a["working"])
        chunks = in_flight_chunks(pp, vp, r, micro_batches)
        # The interleaved schedule cycles through the chunks: warm-up visits them in turn.
        # Interleaved warm-up runs chunk 0 for PP micro-batches, then chunk 1, ... (megatron's groups of PP).
        kept_bytes = sum(per_chunk[(i // pp) % chunks_per_rank] for i in range(chunks))
        kept_one = sum(per_chunk)
        in_flight = chunks / chunks_per_rank
        sched = "no pipelining" if pp == 1 else ("interleaved 1F1B" if vp else "1F1B")
        detail = (f"{kept_one / GiB:.2f} GiB per micro-batch ({m.num_layers // pp} layers) x {in_flight:.2f} in flight "
                  f"({sched}: {chunks} chunk(s) of {layers_per_chunk} layers of {micro_batches} micro-batches)")
        kept = Term("activations kept for backward", kept_bytes, detail)
        work_terms = [Term("backward of one layer" + (" group (recomputed)" if m.recompute_granularity == "full" else ""),
                           working)]
        head: dict[str, float] = {}
        if last:
            terms, head = head_terms(m, sh, loss.fused_output_layer, device)
            work_terms += terms
        other = []
        rows = tr.global_batch_size // dp
        batch = rows * tr.seq_length / cp * BATCH_BYTES_PER_TOKEN
        if last and loss.needs_snapshot and snapshot_minis:
            batch += snapshot_minis * (tr.mini_batch_size // dp) * tr.seq_length / cp * 4
        # One name for every stage (the report prints the terms as rows); only the last holds logp_old.
        snapshot = loss.needs_snapshot and snapshot_minis > 0
        other.append(Term("batch tensors" + (", snapshot log-probs (last stage)" if snapshot else ""), batch,
                          f"{rows} rows of the global batch on this DP rank"))
        if k.attention == "unfused":
            keys = sh.keys
            other.append(Term("attention score buffer (local spec, persistent)",
                              sh.micro * m.num_attention_heads / tp * sh.tokens / sh.micro * keys * act_bytes))
        if m.is_moe and par.moe_token_dispatcher == "allgather":
            other.append(Term("MoE dispatcher buffer (gathered tokens, persistent)",
                              dispatcher_buffers(m, sh)["persistent"],
                              f"the tokens of the expert TP x EP group ({etp} x {ep}), megatron's global buffer"))
        if device != "cpu":
            other.append(Term("CUDA context, NCCL buffers, workspaces", FRAMEWORK_RESERVE))
        stages.append(StageMemory(kind, r, params, static, alt, kept_one, in_flight, detail, kept, work_terms, other,
                                  head))

    if impl == "transformer_engine" and m.recompute_granularity == "selective":
        notes.append("selective recompute recomputes the core attention, which TransformerEngine's flash attention "
                     "never stores: it saves almost nothing; use model.recompute_granularity: full to cut activations")
    if m.is_moe:
        notes.append(f"expert activations assume balanced routing ({m.moe_router_topk} of {m.num_experts} experts per "
                     f"token, each expert its mean share); a collapsing router sends up to EP = {ep} x more routed "
                     "rows to one rank: watch expert_load_max_over_mean in metrics.jsonl")
    if impl == "local" and device != "cpu":
        notes.append("transformer_impl: local on a GPU materialises [s, s] attention scores per layer; "
                     "TransformerEngine (transformer_impl: auto) does not")
    return Plan(
        source=recipe.origin.source, gpu=gpu, gpu_assumed=gpu_assumed, world_size=world_size, tp=tp, pp=pp, vp=vp,
        cp=cp, dp=dp, sp=par.sequence_parallel, seq=tr.seq_length, micro=tr.micro_batch_size,
        micro_batches=micro_batches, k=tr.mini_batches_per_global_batch, model=m, impl=impl, recompute=_recompute_name(m), stages=stages,
        flops=step_flops(recipe, m), mfu=mfu, device=device, notes=notes, ep=ep, etp=etp, edp=edp,
    )
