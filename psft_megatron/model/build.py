"""Build megatron-core ``GPTModel`` chunks for this rank from a :class:`ModelConfig`.

One chunk per virtual pipeline stage (one chunk without interleaving), each with
``pre_process`` (embedding) / ``post_process`` (final norm + output layer) set the
way megatron's schedules expect. Llama-family features map to megatron as:
RMSNorm -> ``normalization="RMSNorm"``, SwiGLU -> ``gated_linear_unit`` + SiLU,
GQA -> ``num_query_groups``, Qwen2's QKV bias -> ``add_qkv_bias`` with
``add_bias_linear=False``, Qwen3's query/key norms -> ``qk_layernorm``, tied embeddings ->
``share_embeddings_and_output_weights``.

Mixture of experts (Qwen3-MoE, ``model.num_experts``): megatron's MoE layer (``TopKRouter``,
SequentialMLP on the local spec, the grouped GEMM with TransformerEngine) in the layers
``ModelConfig.moe_layers`` names, a dense MLP in the others (``moe_layer_freq`` as a 0/1 list, one
block spec per model chunk), the token dispatcher ``parallel.moe_token_dispatcher``, routing in
fp32 (``moe_router_dtype``), the load-balancing loss megatron attaches to the router's output
(``moe_aux_loss_coeff``; see :mod:`psft_megatron.training.moe_metrics`).

Llama-3.1 RoPE scaling: megatron-core 0.16's ``GPTModel(rope_scaling=True)`` applies
HF's llama3 formula but only passes ``factor``; ``low_freq_factor``,
``high_freq_factor`` and ``original_max_position_embeddings`` stay at 1 / 4 / 8192.
Llama 3.1 uses exactly those, but Llama 3.2 and custom configs do not, so we
recompute ``inv_freq`` with megatron's own ``_apply_scaling`` and all four values.

The trainer wraps the chunks in megatron's DistributedDataParallel; this module only builds.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from psft_megatron.model.config import ModelConfig
from psft_megatron.model.cp_attention import ContextParallelDotProductAttention
from psft_megatron.model.gpt import PSFTGPTModel
from psft_megatron.model.lora.spec import lora_layer_spec
from psft_megatron.model.lora.state import freeze_base
from psft_megatron.runtime.config import ParallelConfig
from psft_megatron.runtime.cpu_compat import apply_moe_without_te

log = logging.getLogger(__name__)

__all__ = [
    "BuiltModel",
    "build_meta_model",
    "build_model",
    "layer_spec",
    "model_layer_spec",
    "select_transformer_impl",
    "transformer_config",
    "unwrap_model",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BuiltModel:
    """The model chunks of this rank, with what a log line or a trainer needs to know about them."""

    chunks: list[Any]  # megatron GPTModel, one per virtual pipeline stage
    transformer_impl: str  # "transformer_engine" or "local"
    padded_vocab_size: int
    # Global indices of the transformer layers in each chunk.
    layers_per_chunk: list[list[int]] = field(default_factory=list)
    num_parameters: int = 0  # on this rank, all chunks

    @property
    def description(self) -> str:
        parts = []
        for i, (chunk, layers) in enumerate(zip(self.chunks, self.layers_per_chunk)):
            span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
            ends = ("embedding+" if chunk.pre_process else "") + span + ("+head" if chunk.post_process else "")
            parts.append(f"chunk {i}: {ends}")
        return (
            f"{len(self.chunks)} chunk(s), {self.num_parameters / 1e6:.2f}M params on this rank, "
            f"impl={self.transformer_impl}, padded vocab {self.padded_vocab_size}; " + "; ".join(parts)
        )


def _te_available() -> bool:
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        importlib.import_module("megatron.core.extensions.transformer_engine")
    except Exception as e:  # a broken TE install: fall back, but say why
        log.warning("TransformerEngine is installed but does not import (%s); using the local layer spec", e)
        return False
    return True


def select_transformer_impl(requested: str = "auto") -> str:
    """``"transformer_engine"`` where TE imports on a CUDA machine, ``"local"`` otherwise; logged.

    ``requested`` ("auto", "transformer_engine", "local") overrides; asking for TE
    where it is not usable raises.
    """
    if requested == "local":
        impl, why = "local", "requested"
    elif requested == "transformer_engine":
        if not _te_available():
            raise RuntimeError(
                "model.transformer_impl=transformer_engine but TransformerEngine is not usable here "
                "(needs CUDA and the transformer_engine package); set model.transformer_impl: auto or local"
            )
        impl, why = "transformer_engine", "requested"
    elif requested == "auto":
        impl = "transformer_engine" if _te_available() else "local"
        why = "auto: TransformerEngine found" if impl == "transformer_engine" else "auto: TransformerEngine not usable"
    else:
        raise ValueError(f"model.transformer_impl must be auto, transformer_engine or local, got {requested!r}")
    log.info("layer spec: %s (%s)", impl, why)
    return impl


def model_layer_spec(model: ModelConfig, impl: str, context_parallel_size: int = 1, config: Any = None,
                     vp_stage: int | None = None) -> Any:
    """The layer spec of ``model`` (:func:`layer_spec`: a layer spec, or a mixture-of-experts model's
    block spec), with LoRA adapters in the targeted linears when ``model.lora`` is set
    (:mod:`psft_megatron.model.lora.spec`; in a block spec, each distinct layer spec once)."""
    spec = layer_spec(impl, context_parallel_size, config, vp_stage)
    if model.lora is None:
        return spec
    if not hasattr(spec, "layer_specs"):
        return lora_layer_spec(spec, model.family, model.lora)
    adapted: dict[int, Any] = {}
    for i, layer in enumerate(spec.layer_specs):
        if id(layer) not in adapted:
            adapted[id(layer)] = lora_layer_spec(layer, model.family, model.lora)
        spec.layer_specs[i] = adapted[id(layer)]
    return spec


def layer_spec(impl: str, context_parallel_size: int = 1, config: Any = None, vp_stage: int | None = None) -> Any:
    """megatron-core's GPT layer spec for ``impl``, or for a mixture-of-experts ``config`` the block
    spec of this rank's model chunk ``vp_stage`` (dense and expert layers differ).

    Both specs save under the same dist-checkpoint keys (the local spec maps
    ``input_layernorm`` to ``self_attention.linear_qkv.layer_norm_weight`` through
    ``sharded_state_dict_keys_map``), so checkpoints move between them. With context
    parallelism the local spec's core attention is
    :class:`~psft_megatron.model.cp_attention.ContextParallelDotProductAttention` (megatron's
    own refuses CP; it has no parameters, so checkpoints are unchanged); TE's handles CP itself.
    ``config`` (megatron's TransformerConfig) adds Qwen3's query/key norms (``qk_layernorm``).
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if config is not None and config.num_moe_experts:
        return _moe_block_spec(impl, context_parallel_size, config, vp_stage)
    qk_layernorm = bool(config is not None and config.qk_layernorm)
    if impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    if context_parallel_size > 1:
        spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return spec


def _moe_block_spec(impl: str, context_parallel_size: int, config: Any, vp_stage: int | None) -> Any:
    """The decoder block spec of one model chunk of a mixture-of-experts model (megatron's own, with
    the local spec's expert layers saving their pre-MLP norm as TransformerEngine does).

    megatron's local layer spec maps ``pre_mlp_layernorm`` onto ``mlp.linear_fc1.layer_norm_weight``,
    which is right for a dense MLP (TE fuses that norm into ``linear_fc1``) but not for an expert
    layer, where TE keeps a separate ``pre_mlp_layernorm``: without the change a checkpoint written
    on the CPU would not load into a TE model. Each distinct layer spec is copied before the change.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=impl == "transformer_engine",
                                       normalization="RMSNorm", vp_stage=vp_stage)
    if impl == "transformer_engine":
        return block
    fixed: dict[int, Any] = {}
    for i, spec in enumerate(block.layer_specs):
        if id(spec) not in fixed:
            own = copy.deepcopy(spec)
            if own.submodules.mlp.module is MoELayer:
                own.submodules.sharded_state_dict_keys_map = {
                    k: v for k, v in own.submodules.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."
                }
            if context_parallel_size > 1:
                own.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
            fixed[id(spec)] = own
        block.layer_specs[i] = fixed[id(spec)]
    return block


def _moe_kwargs(model: ModelConfig, parallel: ParallelConfig, impl: str) -> dict[str, Any]:
    """TransformerConfig fields of a mixture-of-experts model (none for a dense one)."""
    if not model.is_moe:
        return {}
    moe = set(model.moe_layers)
    coeff = model.aux_loss_coeff
    return dict(
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        # norm_topk_prob: top-k of the logits, softmax over those k (= HF's renormalised top-k of the
        # full softmax); otherwise the top k of the full softmax, as HF without renormalisation.
        moe_router_pre_softmax=not model.moe_norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if coeff > 0 else "none",
        moe_aux_loss_coeff=coeff,
        # Routing and the weighted sum of expert outputs in fp32 (megatron's advice for many experts).
        moe_router_dtype="fp32",
        moe_token_dispatcher_type=parallel.moe_token_dispatcher,
        moe_grouped_gemm=impl == "transformer_engine",
        moe_permute_fusion=False,
        # 1: every layer has experts (megatron then stacks the layers in the checkpoint); a list
        # of 0/1 per layer otherwise (saved layer by layer). Either way the same at every layout.
        moe_layer_freq=1 if len(moe) == model.num_layers else [int(i in moe) for i in range(model.num_layers)],
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tp_size,
    )


def transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    impl: str = "local",
    perform_initialization: bool = True,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """megatron ``TransformerConfig`` for ``model`` under ``parallel``.

    Dropout is 0 (fine-tuning Llama-family models). Fusions that need CUDA kernels are
    on only with TransformerEngine. Activation recompute comes from ``model.recompute_*``.
    ``overrides`` sets any other TransformerConfig field and wins over everything here.
    """
    from megatron.core.transformer import TransformerConfig

    parallel = parallel or ParallelConfig()
    dtype = _DTYPES[model.params_dtype]
    gpu_kernels = impl == "transformer_engine"
    kwargs: dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        # TransformerEngine's CP attention reads it; the local CP attention always all-gathers K/V.
        cp_comm_type=parallel.cp_comm_type if parallel.context_parallel_size > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=perform_initialization,
        bias_activation_fusion=False,  # there is no bias to fuse
        bias_dropout_fusion=False,
        masked_softmax_fusion=gpu_kernels,
        apply_rope_fusion=gpu_kernels,
        gradient_accumulation_fusion=False,
        persist_layer_norm=gpu_kernels,
        # Activation recompute (model.recompute_*; validated in ModelConfig.validate). With selective,
        # megatron recomputes its default module list: the core attention.
        recompute_granularity=model.recompute_granularity,
        recompute_method=model.recompute_method,
        recompute_num_layers=model.recompute_num_layers,
        qk_layernorm=model.qk_layernorm,
        **_moe_kwargs(model, parallel, impl),
    )
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


def _set_rope_scaling(chunk: Any, model: ModelConfig) -> None:
    """Recompute RoPE inverse frequencies with all four llama3 scaling values (see module doc)."""
    rope = getattr(chunk, "rotary_pos_emb", None)
    if rope is None or model.rope_scaling is None:
        return
    rs = model.rope_scaling
    dim = model.kv_channels
    base = 1.0 / (model.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    scaled = rope._apply_scaling(
        base,
        factor=rs.factor,
        low_freq_factor=rs.low_freq_factor,
        high_freq_factor=rs.high_freq_factor,
        original_max_position_embeddings=rs.original_max_position_embeddings,
    )
    rope.inv_freq = scaled.to(rope.inv_freq.device)


def _gpt_chunk(
    model: ModelConfig, config: Any, spec: Any, vocab: int, pre: bool, post: bool, vp_stage: int | None,
    fused_output_layer: bool = False,
) -> Any:
    chunk = PSFTGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta) if float(model.rope_theta).is_integer() else model.rope_theta,
        vp_stage=vp_stage,
        fused_output_layer=fused_output_layer,
    )
    _set_rope_scaling(chunk, model)
    return chunk


def _chunk_layers(chunk: Any) -> list[int]:
    # layer_number is 1-based and global in megatron.
    return [int(layer.layer_number) - 1 for layer in chunk.decoder.layers]


def build_model(
    model: ModelConfig,
    parallel: ParallelConfig | None = None,
    *,
    config_overrides: dict[str, Any] | None = None,
    fused_output_layer: bool = False,
) -> BuiltModel:
    """Build this rank's model chunks (one per virtual pipeline stage).

    With ``model.lora`` the targeted linears carry LoRA adapters (A random, B zero: the base model
    until trained) and only the adapters require gradients.

    ``fused_output_layer``: the last stage, called with labels, returns the hidden states
    for the fused output layer + loss (see :mod:`psft_megatron.model.gpt`) instead of logits.

    Needs megatron's parallel state (``init_model_parallel``) and, for reproducible
    init, ``set_seed``. ``model`` is resolved (``ModelConfig.resolve``); it is validated first. The
    chunks are in ``model.params_dtype``, on the GPU when CUDA is available and
    on the CPU otherwise (``use_cpu_initialization``).
    """
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig()
    model.validate(parallel)
    impl = select_transformer_impl(model.transformer_impl)
    if model.is_moe and impl == "local":
        apply_moe_without_te()  # megatron's router needs it without TransformerEngine (see cpu_compat)
    config = transformer_config(model, parallel, impl=impl, overrides=config_overrides)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != parallel.tensor_model_parallel_size:
        raise RuntimeError(
            f"megatron parallel state has TP={tp} but the config asks for "
            f"{parallel.tensor_model_parallel_size}: call init_model_parallel(parallel) first"
        )
    vocab = model.padded_vocab_size

    vp = parallel.virtual_pipeline_model_parallel_size
    stages: list[int | None] = list(range(vp)) if vp else [None]
    chunks = []
    for vp_stage in stages:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=vp is None, vp_stage=vp_stage)
        spec = model_layer_spec(model, impl, parallel.context_parallel_size, config, vp_stage)
        chunk = _gpt_chunk(model, config, spec, vocab, pre, post, vp_stage, fused_output_layer)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    if model.lora is not None:  # only the adapters train: the base gets no gradients and no optimizer state
        freeze_base(chunks)

    built = BuiltModel(
        chunks=chunks,
        transformer_impl=impl,
        padded_vocab_size=vocab,
        layers_per_chunk=[_chunk_layers(c) for c in chunks],
        num_parameters=sum(p.numel() for c in chunks for p in c.parameters()),
    )
    log.info("built model: %s", built.description)
    return built


def build_meta_model(model: ModelConfig, impl: str = "local") -> Any:
    """A single-chunk TP=1/PP=1 GPTModel whose tensors live on the ``meta`` device.

    Costs no memory whatever the model size: the checkpoint converters use it for
    the exact dist-checkpoint keys, shapes and shardings megatron would use,
    without holding weights. Needs megatron's parallel state at TP=PP=1.
    """
    model.validate(ParallelConfig())
    config = transformer_config(model, ParallelConfig(), impl=impl, perform_initialization=False)
    vocab = model.padded_vocab_size
    with torch.device("meta"):
        chunk = _gpt_chunk(model, config, model_layer_spec(model, impl, 1, config), vocab, True, True, None)
    # Norms are created in fp32 whatever params_dtype says; one dtype throughout, as a
    # Float16Module-wrapped training model saves.
    return chunk.to(_DTYPES[model.params_dtype])


def unwrap_model(chunk: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers (anything with a ``.module``)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk
