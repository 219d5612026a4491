"""Build megatron-core ``GPTModel`` chunks for this rank from a :class:`ModelConfig`.

One chunk per virtual pipeline stage (one chunk without interleaving), each with
``pre_process`` (embedding) / ``post_process`` (final norm + output layer) set the
way megatron's schedules expect. Llama-family features map to megatron as:
RMSNorm -> ``normalization="RMSNorm"``, SwiGLU -> ``gated_linear_unit`` + SiLU,
GQA -> ``num_query_groups``, Qwen2's QKV bias -> ``add_qkv_bias`` with
``add_bias_linear=False``, tied embeddings -> ``share_embeddings_and_output_weights``.

Llama-3.1 RoPE scaling: megatron-core 0.16's ``GPTModel(rope_scaling=True)`` applies
HF's llama3 formula but only passes ``factor``; ``low_freq_factor``,
``high_freq_factor`` and ``original_max_position_embeddings`` stay at 1 / 4 / 8192.
Llama 3.1 uses exactly those, but Llama 3.2 and custom configs do not, so we
recompute ``inv_freq`` with megatron's own ``_apply_scaling`` and all four values.

The trainer wraps the chunks in megatron's DistributedDataParallel; this module only builds.
"""

from __future__ import annotations

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


def model_layer_spec(model: ModelConfig, impl: str, context_parallel_size: int = 1) -> Any:
    """The layer spec of ``model``: :func:`layer_spec`, with LoRA adapters in the targeted linears
    when ``model.lora`` is set (:mod:`psft_megatron.model.lora.spec`)."""
    spec = layer_spec(impl, context_parallel_size)
    return lora_layer_spec(spec, model.family, model.lora) if model.lora is not None else spec


def layer_spec(impl: str, context_parallel_size: int = 1) -> Any:
    """megatron-core's GPT layer spec for ``impl``.

    Both specs save under the same dist-checkpoint keys (the local spec maps
    ``input_layernorm`` to ``self_attention.linear_qkv.layer_norm_weight`` through
    ``sharded_state_dict_keys_map``), so checkpoints move between them. With context
    parallelism the local spec's core attention is
    :class:`~psft_megatron.model.cp_attention.ContextParallelDotProductAttention` (megatron's
    own refuses CP; it has no parameters, so checkpoints are unchanged); TE's handles CP itself.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if context_parallel_size > 1:
        spec.submodules.self_attention.submodules.core_attention = ContextParallelDotProductAttention
    return spec


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
    config = transformer_config(model, parallel, impl=impl, overrides=config_overrides)
    spec = model_layer_spec(model, impl, parallel.context_parallel_size)
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
        chunk = _gpt_chunk(model, config, model_layer_spec(model, impl), vocab, True, True, None)
    # Norms are created in fp32 whatever params_dtype says; one dtype throughout, as a
    # Float16Module-wrapped training model saves.
    return chunk.to(_DTYPES[model.params_dtype])


def unwrap_model(chunk: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers (anything with a ``.module``)."""
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    return chunk
