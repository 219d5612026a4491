"""The ``model`` section of a recipe: which decoder-only transformer to build.

A recipe either lists the fields or points ``hf_config`` at a Hugging Face
``config.json`` (or the folder holding it); :meth:`ModelConfig.resolve` fills the
fields from it, keeping any field the recipe sets explicitly. A launch resolves once
(``RecipeConfig.resolved_model``) and passes the resolved config on: nothing that builds,
plans or checks a model reads the file again.

:meth:`ModelConfig.validate` checks every constraint against the parallel layout
before any weight is built, so a bad recipe fails in a second with a message naming
the field to change rather than deep inside megatron-core on hundreds of ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from psft_megatron.config.load import FieldError, build_dataclass, check_choices, to_dict
from psft_megatron.model.architectures import FAMILIES
from psft_megatron.model.hf_config import model_fields_from_hf
from psft_megatron.model.lora.config import LoRAConfig
from psft_megatron.runtime.config import ParallelConfig

__all__ = ["Family", "ModelConfig", "RopeScaling"]

# The registered families (psft_megatron.model.architectures): the one list of them.
Family = Literal[FAMILIES]  # type: ignore[valid-type]

# Training choices, never read from an HF config.
_RECIPE_ONLY = ("params_dtype", "transformer_impl", "make_vocab_size_divisible_by", "hf_config",
                "recompute_granularity", "recompute_method", "recompute_num_layers", "lora")


@dataclass
class RopeScaling:
    """Llama-3.1 style RoPE frequency scaling (HF ``rope_type: llama3``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """Architecture of a Llama-style decoder; ``family`` is one registered in
    :mod:`psft_megatron.model.architectures` (Llama 2/3/3.1, Qwen2/2.5, Mistral, Qwen3, Qwen3-MoE).

    All of these share RMSNorm, SwiGLU MLP, RoPE and grouped-query attention; they
    differ in QKV bias (Qwen2), per-head query/key norms (Qwen3), tied embeddings, RoPE
    scaling and, with ``num_experts`` set, mixture-of-experts MLPs (Qwen3-MoE).
    """

    family: Family = "llama"
    num_layers: int = 0
    hidden_size: int = 0
    ffn_hidden_size: int = 0
    num_attention_heads: int = 0
    # Number of key/value heads (GQA). None = multi-head attention (= num_attention_heads).
    num_query_groups: int | None = None
    # Per-head size; None = hidden_size / num_attention_heads (HF ``head_dim``).
    head_dim: int | None = None
    vocab_size: int = 0
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False
    # Per-head RMSNorm of queries and keys before RoPE (Qwen3's q_norm / k_norm; megatron's qk_layernorm).
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    # Mixture of experts (Qwen3-MoE): megatron's MoE layer, a TopKRouter over num_experts experts.
    # null: every layer has a dense MLP of ffn_hidden_size.
    num_experts: int | None = None
    # Each expert's SwiGLU width (HF moe_intermediate_size); ffn_hidden_size stays the dense layers' width.
    moe_ffn_hidden_size: int | None = None
    # Experts per token (HF num_experts_per_tok). The router takes the softmax over all experts, then
    # the top k; with moe_norm_topk_prob the k weights are renormalised to sum to 1 (HF norm_topk_prob).
    moe_router_topk: int = 2
    moe_norm_topk_prob: bool = True
    # The router's load-balancing loss coefficient (HF router_aux_loss_coef); null: the HF config's,
    # else 0. Added to the objective, never inside the PSFT ratio (see psft_megatron.training.moe_metrics).
    moe_aux_loss_coeff: float | None = None
    # Layers (0-based) that keep a dense MLP instead of experts: HF mlp_only_layers and the layers
    # decoder_sparse_step skips.
    moe_dense_layers: list[int] = field(default_factory=list)
    params_dtype: Literal["fp32", "bf16"] = "bf16"
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    # HF config.json (or its folder) to take the architecture from.
    hf_config: str | None = None
    # The embedding and output rows are padded to a multiple of this (TP must divide it);
    # the same at every layout, so checkpoints load at any TP.
    make_vocab_size_divisible_by: int = 128
    # Activation recompute, passed to megatron's TransformerConfig (psft_megatron.plan says what
    # each choice keeps). null: keep every activation for backward. selective: recompute the core
    # attention (drops the [s, s] scores of the local spec; TransformerEngine's flash attention
    # never keeps them, so there it saves almost nothing). full: keep only the input of each
    # group of layers and recompute the group in backward (one more forward of the layers).
    recompute_granularity: Literal["selective", "full"] | None = None
    # full only. uniform: groups of recompute_num_layers layers, each group recomputed as a whole;
    # block: the first recompute_num_layers layers of every model chunk recomputed, one at a time,
    # the rest keep everything.
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    # LoRA adapters on the layers' linears, the base frozen (psft_megatron.model.lora.config); null: full
    # fine-tuning. A checkpoint saved with it holds the adapters only and points at its base.
    lora: LoRAConfig | None = None
    # Set by resolve(): the fields already hold hf_config's architecture, so resolving again reads
    # nothing. Derived state, not a recipe key (not saved; a dataclasses.replace copy drops it).
    resolved: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # straight from YAML or an HF config
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if isinstance(self.lora, dict):  # from a checkpoint's psft_meta.json
            self.lora = LoRAConfig(**self.lora)
        check_choices(self)

    @property
    def kv_channels(self) -> int:
        """Per-head size."""
        return self.head_dim if self.head_dim else self.hidden_size // max(self.num_attention_heads, 1)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        """Whether the model has mixture-of-experts layers."""
        return bool(self.num_experts)

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the layers whose MLP is experts (none for a dense model)."""
        if not self.is_moe:
            return []
        dense = set(self.moe_dense_layers)
        return [i for i in range(self.num_layers) if i not in dense]

    @property
    def dense_layers(self) -> list[int]:
        """0-based indices of the layers with a dense MLP (all of a dense model's)."""
        moe = set(self.moe_layers)
        return [i for i in range(self.num_layers) if i not in moe]

    @property
    def aux_loss_coeff(self) -> float:
        """The load-balancing loss coefficient in use (0 for a dense model or when unset)."""
        return float(self.moe_aux_loss_coeff or 0.0) if self.is_moe else 0.0

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer: ``vocab_size`` rounded up to ``make_vocab_size_divisible_by``.

        Unlike Megatron-LM (a multiple of ``divisible_by * TP``) this does not depend on the
        layout, so a checkpoint's embedding and output shapes are the same at every TP size
        and it loads into any layout. :meth:`validate` checks that TP divides it evenly.
        """
        d = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // d) * d

    def attention_parameters(self) -> int:
        """Parameters of one layer's attention (QKV, its bias, the output projection, q/k norms)."""
        h, kv, heads, groups = self.hidden_size, self.kv_channels, self.num_attention_heads, self.query_groups
        qkv = h * kv * (heads + 2 * groups) + (kv * (heads + 2 * groups) if self.qkv_bias else 0)
        return qkv + heads * kv * h + (2 * kv if self.qk_layernorm else 0)

    def expert_parameters(self) -> int:
        """Parameters of one expert (SwiGLU gate, up, down of moe_ffn_hidden_size); 0 for a dense model."""
        return 3 * self.hidden_size * (self.moe_ffn_hidden_size or 0) if self.is_moe else 0

    def num_parameters(self, active: bool = False) -> int:
        """Parameters of the whole model (embedding and output rows padded; the output counted once
        when tied), from the architecture alone. ``active``: only the experts one token runs through
        (``moe_router_topk`` of ``num_experts`` per MoE layer), for FLOPs."""
        h = self.hidden_size
        dense_mlp = 3 * h * self.ffn_hidden_size  # gate, up, down (SwiGLU)
        experts = (self.moe_router_topk if active else (self.num_experts or 0)) * self.expert_parameters()
        moe_mlp = experts + (self.num_experts or 0) * h  # + the router
        mlps = len(self.dense_layers) * dense_mlp + len(self.moe_layers) * moe_mlp
        layers = self.num_layers * (self.attention_parameters() + 2 * h) + mlps  # two RMSNorm weights per layer
        embeddings = self.padded_vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers + embeddings + h  # + the final norm

    @classmethod
    def from_hf(cls, config_json: str | Path | dict[str, Any]) -> "ModelConfig":
        """The architecture of an HF config (dict, config.json path, or model folder).

        Raises ValueError for an unknown architecture or a feature that would not convert exactly.
        """
        return cls(**model_fields_from_hf(config_json))

    def resolve(self) -> "ModelConfig":
        """Return a copy with the architecture filled from ``hf_config`` (if set), marked resolved.

        Architecture fields the recipe set to a non-default value win over the HF
        file; the training choices (params_dtype, transformer_impl,
        make_vocab_size_divisible_by) always come from the recipe. Reads the file once;
        a config this returned is resolved already, and resolving it again reads nothing.
        """
        if self.hf_config and not self.resolved:
            return self.filled_from(ModelConfig.from_hf(self.hf_config))
        out = dataclasses.replace(self)
        out.resolved = True
        return out

    def filled_from(self, from_hf: "ModelConfig") -> "ModelConfig":
        """A copy whose architecture fields left at their defaults take ``from_hf``'s values (no I/O).

        ``from_hf`` is the architecture read from ``hf_config`` (:meth:`from_hf`); the training
        choices always stay this config's.
        """
        defaults = ModelConfig()
        merged = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            mine = getattr(self, f.name)
            take_hf = f.name not in _RECIPE_ONLY and mine == getattr(defaults, f.name)
            merged[f.name] = getattr(from_hf, f.name) if take_hf else mine
        out = ModelConfig(**merged)
        out.resolved = True
        return out

    def validate(self, parallel: ParallelConfig | None = None) -> None:
        """Check every architecture and layout constraint; raise :class:`FieldError` naming the field.

        Call on a resolved config (see :meth:`resolve`) before building weights.
        """
        parallel = parallel or ParallelConfig()
        parallel.validate()
        check_choices(self)
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                     "max_position_embeddings", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                if not self.hf_config:
                    hint = " (or set model.hf_config to take it from a config.json)"
                elif not self.resolved:  # e.g. recipe.model passed where recipe.resolved_model belongs
                    hint = " (model.hf_config is set but this config was not resolved: pass ModelConfig.resolve()'s copy)"
                else:
                    hint = ""
                raise FieldError(f"model.{name}", f"must be a positive integer, got {value!r}{hint}")
        if self.norm_epsilon <= 0:
            raise FieldError("model.norm_epsilon", f"must be > 0, got {self.norm_epsilon}")
        if self.rope_theta <= 0:
            raise FieldError("model.rope_theta", f"must be > 0, got {self.rope_theta}")

        heads, groups = self.num_attention_heads, self.query_groups
        if groups < 1 or heads % groups != 0:
            raise FieldError(
                "model.num_query_groups",
                f"({groups}) must divide model.num_attention_heads ({heads}): "
                "each key/value head serves a whole number of query heads",
            )
        if self.head_dim is None and self.hidden_size % heads != 0:
            raise FieldError(
                "model.hidden_size",
                f"({self.hidden_size}) must be divisible by model.num_attention_heads ({heads}), "
                "or set model.head_dim explicitly",
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise FieldError("model.head_dim", f"must be a positive integer or null, got {self.head_dim}")

        rs = self.rope_scaling
        if rs is not None:
            if rs.factor <= 0:
                raise FieldError("model.rope_scaling.factor", f"must be > 0, got {rs.factor}")
            if not 0 < rs.low_freq_factor < rs.high_freq_factor:
                raise FieldError(
                    "model.rope_scaling",
                    f"needs 0 < low_freq_factor < high_freq_factor, got {rs.low_freq_factor} and {rs.high_freq_factor}",
                )
            if rs.original_max_position_embeddings < 1:
                raise FieldError("model.rope_scaling.original_max_position_embeddings", "must be a positive integer")

        tp = parallel.tensor_model_parallel_size
        pp = parallel.pipeline_model_parallel_size
        vp = parallel.virtual_pipeline_model_parallel_size or 1
        if heads % tp != 0:
            raise FieldError(
                "model.num_attention_heads",
                f"({heads}) must be divisible by parallel.tensor_model_parallel_size ({tp}): "
                f"pick a TP size that divides {heads}",
            )
        if groups % tp != 0:
            raise FieldError(
                "model.num_query_groups",
                f"({groups}) must be divisible by parallel.tensor_model_parallel_size ({tp}): each TP rank holds "
                f"whole key/value heads; pick a TP size that divides {groups}",
            )
        if self.ffn_hidden_size % tp != 0:
            raise FieldError(
                "model.ffn_hidden_size",
                f"({self.ffn_hidden_size}) must be divisible by parallel.tensor_model_parallel_size ({tp})",
            )
        if self.make_vocab_size_divisible_by % tp:
            raise FieldError(
                "model.make_vocab_size_divisible_by",
                f"({self.make_vocab_size_divisible_by}) must be a multiple of parallel.tensor_model_parallel_size "
                f"({tp}) so every TP rank gets an equal vocabulary slice: use {self.make_vocab_size_divisible_by * tp}",
            )
        if self.num_layers % (pp * vp) != 0:
            raise FieldError(
                "model.num_layers",
                f"({self.num_layers}) must be divisible by parallel.pipeline_model_parallel_size x "
                f"virtual_pipeline_model_parallel_size ({pp} x {vp} = {pp * vp}): every model chunk gets the same "
                "number of layers",
            )
        cp = parallel.context_parallel_size
        # TransformerEngine's a2a exchange gives each CP rank whole heads (megatron/TE assert it deep inside).
        if cp > 1 and parallel.cp_comm_type == "a2a" and (heads // tp % cp or groups // tp % cp):
            raise FieldError(
                "parallel.cp_comm_type",
                f"a2a needs the attention heads ({heads}) and key/value heads ({groups}) per TP rank (TP={tp}) to "
                f"divide by context_parallel_size ({cp}); use cp_comm_type: p2p or another CP size",
            )

        self._validate_recompute(pp, vp)
        self._validate_moe(parallel)
        if self.lora is not None:
            self.lora.validate(self.family)

    def _validate_moe(self, parallel: ParallelConfig) -> None:
        """The mixture-of-experts fields against each other and the expert layout (megatron's own
        checks, and the ones it makes only at the first training step, made up front)."""
        ep, etp, tp = parallel.expert_model_parallel_size, parallel.expert_tp_size, parallel.tensor_model_parallel_size
        if not self.is_moe:
            for name, value, default in (("moe_ffn_hidden_size", self.moe_ffn_hidden_size, None),
                                         ("moe_dense_layers", self.moe_dense_layers, [])):
                if value != default:
                    raise FieldError(f"model.{name}", f"({value}) needs a mixture-of-experts model: set model.num_experts "
                                     f"or remove model.{name}")
            if ep > 1 or parallel.expert_tensor_parallel_size not in (None, tp):
                raise FieldError("parallel.expert_model_parallel_size",
                                 f"(EP {ep}, expert TP {etp}) needs a mixture-of-experts model (model.num_experts); "
                                 "remove the expert layout for a dense model")
            return
        e, k = self.num_experts, self.moe_router_topk
        if not isinstance(e, int) or e < 2:
            raise FieldError("model.num_experts", f"must be an integer >= 2 or null (a dense model), got {e!r}")
        if not isinstance(self.moe_ffn_hidden_size, int) or self.moe_ffn_hidden_size < 1:
            raise FieldError("model.moe_ffn_hidden_size", f"must be a positive integer with num_experts set, got "
                             f"{self.moe_ffn_hidden_size!r} (HF moe_intermediate_size)")
        if not 1 <= k <= e:
            raise FieldError("model.moe_router_topk", f"({k}) must be between 1 and model.num_experts ({e})")
        if k == 1 and self.moe_norm_topk_prob:
            raise FieldError("model.moe_norm_topk_prob", "with moe_router_topk 1 would give every token weight 1, which "
                             "megatron's router does not compute (it takes the softmax probability): set it to false")
        bad = sorted({i for i in self.moe_dense_layers if not 0 <= i < self.num_layers})
        if bad or len(set(self.moe_dense_layers)) != len(self.moe_dense_layers):
            raise FieldError("model.moe_dense_layers", f"({self.moe_dense_layers}) must list distinct layer indices in "
                             f"0..{self.num_layers - 1}" + (f"; {bad} are outside" if bad else ""))
        if not self.moe_layers:
            raise FieldError("model.moe_dense_layers", "lists every layer: no layer would have experts; set "
                             "model.num_experts: null for a dense model")
        if self.moe_aux_loss_coeff is not None and self.moe_aux_loss_coeff < 0:
            raise FieldError("model.moe_aux_loss_coeff", f"must be >= 0, got {self.moe_aux_loss_coeff}")
        if e % ep:
            divisors = [d for d in range(1, e + 1) if e % d == 0]
            raise FieldError("parallel.expert_model_parallel_size",
                             f"({ep}) must divide model.num_experts ({e}): every EP rank holds the same number of "
                             f"experts; use one of {divisors}")
        if self.moe_ffn_hidden_size % etp:
            raise FieldError("parallel.expert_tensor_parallel_size",
                             f"({etp}) must divide model.moe_ffn_hidden_size ({self.moe_ffn_hidden_size}): each expert's "
                             "MLP is split over expert TP ranks" + ("" if parallel.expert_tensor_parallel_size else
                                                                    " (null means tensor_model_parallel_size)"))
        if tp > 1 and not parallel.sequence_parallel:
            raise FieldError("parallel.sequence_parallel",
                             f"must be true with a mixture-of-experts model at tensor_model_parallel_size {tp}: megatron's "
                             "MoE layer refuses TP without SP in training (each TP rank routes its own slice of the "
                             "sequence)")

    def _validate_recompute(self, pp: int, vp: int) -> None:
        """The recompute fields against each other and the layers of one model chunk (megatron's
        checks, made before anything is built and naming the field)."""
        granularity, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity != "full":
            for name, value in (("recompute_method", method), ("recompute_num_layers", n)):
                if value is not None:
                    raise FieldError(
                        f"model.{name}",
                        f"({value}) only applies to recompute_granularity: full (it is {granularity or 'null'}); "
                        f"remove model.{name} or set model.recompute_granularity: full",
                    )
            return
        if method is None:
            raise FieldError(
                "model.recompute_method",
                "must be uniform or block with recompute_granularity: full (uniform with recompute_num_layers: 1 "
                "keeps the least)",
            )
        per_chunk = self.num_layers // (pp * vp)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise FieldError(
                "model.recompute_num_layers",
                f"must be a positive integer with recompute_granularity: full, got {n!r} (1 keeps the least)",
            )
        if n > per_chunk:
            raise FieldError(
                "model.recompute_num_layers",
                f"({n}) exceeds the {per_chunk} layers of one model chunk (num_layers {self.num_layers} / "
                f"pipeline x virtual pipeline {pp} x {vp}); use at most {per_chunk}",
            )
        if method == "uniform" and per_chunk % n:
            divisors = [d for d in range(1, per_chunk + 1) if per_chunk % d == 0]
            raise FieldError(
                "model.recompute_num_layers",
                f"({n}) must divide the {per_chunk} layers of one model chunk with recompute_method: uniform "
                f"(megatron recomputes whole groups); use one of {divisors}",
            )

    def to_dict(self) -> dict[str, Any]:
        """The recipe keys (derived state such as ``resolved`` left out)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys and wrong types raise, naming them."""
        return build_dataclass(cls, data, "model")
