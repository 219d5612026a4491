"""The HF config fields every family here shares: a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA).

Reads the files written by transformers 4.x (``rope_theta`` / ``rope_scaling`` at the top
level, ``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``). Anything the Megatron GPT
model cannot reproduce exactly (a non-SiLU MLP, MLP biases, unsupported RoPE scaling) is
refused with a message rather than converted into a silently different model. A family
module calls :func:`decoder_fields` and :func:`decoder_hf_config` and adds what is its own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # model.config imports this package; the functions here return plain fields
    from psft_megatron.model.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["decoder_fields", "decoder_hf_config", "warn_sliding_window"]


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters")  # transformers 5.x
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = params
    else:
        theta = float(cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "llama3":
        return theta, {
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
        }
    raise ValueError(
        f"unsupported RoPE scaling {rope_type!r} (supported: none, 'llama3'); "
        "the converted model would compute different positions than the HF one"
    )


def _dtype(cfg: dict[str, Any]) -> str:
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    return "bf16" if dtype in ("bfloat16", "float16") else "fp32"


def warn_sliding_window(cfg: dict[str, Any], used: bool) -> None:
    """Log that a sliding window the model ``used`` is not reproduced (attention is full causal)."""
    window = cfg.get("sliding_window")
    if window and used:
        log.warning(
            "sliding_window=%s is not reproduced: attention is full causal, identical to HF only for "
            "sequences of at most %s tokens",
            window,
            window,
        )


def decoder_fields(cfg: dict[str, Any], family: str, *, qkv_bias: bool) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments of a Llama-style HF config; ``qkv_bias`` is the family's call.

    Raises ValueError for a feature that would not convert exactly, KeyError for a missing size.
    """
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (the Megatron model uses SwiGLU with SiLU)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported: the MLP linears are built without bias")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        log.warning("pretraining_tp=%s is ignored (it only changes how HF splits matmuls)", cfg["pretraining_tp"])
    theta, scaling = _rope(cfg)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) == hidden // heads:
        head_dim = None  # the default; keep configs minimal
    return dict(
        family=family,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim) if head_dim is not None else None,
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        # The config classes here default to untied.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        params_dtype=_dtype(cfg),
    )


def decoder_hf_config(model: "ModelConfig", model_type: str, hf_class: str, dtype: str = "float32") -> dict[str, Any]:
    """The config.json fields of ``model`` every Llama-style family shares (transformers-loadable)."""
    cfg: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.kv_channels,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rope_theta,
        "tie_word_embeddings": model.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    if model.rope_scaling is not None:
        rs = model.rope_scaling
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return cfg
