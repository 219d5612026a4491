"""Read a Hugging Face ``config.json`` into ModelConfig fields (and write one back).

Handles the files written by transformers 4.x (``rope_theta`` / ``rope_scaling`` at the
top level, ``torch_dtype``) and 5.x (``rope_parameters``, ``dtype``).
Supported: Llama 2/3/3.1/3.2 (``llama``), Qwen2/2.5 (``qwen2``), Mistral (``mistral``).
Anything these models do that the Megatron GPT model cannot reproduce exactly
(biases on other linears, a non-SiLU MLP, unsupported RoPE scaling) is refused
with a message rather than converted into a silently different model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # model.config imports this module; the reader returns plain fields
    from psft_megatron.model.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["HF_ARCHITECTURES", "load_hf_config_dict", "model_fields_from_hf", "hf_config_from_model_config"]

# model_type -> the transformers class that loads it.
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
_ARCH_TO_FAMILY = {v: k for k, v in HF_ARCHITECTURES.items()}


def load_hf_config_dict(config_json: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The parsed config: a dict as is, a path to config.json, or a folder holding one."""
    if isinstance(config_json, dict):
        return dict(config_json)
    path = Path(config_json)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no HF config.json at {path}")
    with open(path) as f:
        return json.load(f)


def _family(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    if model_type in HF_ARCHITECTURES:
        return model_type
    for arch in cfg.get("architectures") or []:
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r}, architectures={cfg.get('architectures')}; "
        f"supported model types: {sorted(HF_ARCHITECTURES)}"
    )


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


def model_fields_from_hf(config_json: str | Path | dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig`` keyword arguments from an HF config (dict, config.json path, or model folder).

    Use :meth:`psft_megatron.model.config.ModelConfig.from_hf` for the config itself.
    Raises ValueError for an unknown architecture or a feature that would not convert exactly.
    """
    cfg = load_hf_config_dict(config_json)
    family = _family(cfg)
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (the Megatron model uses SwiGLU with SiLU)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported: the MLP linears are built without bias")
    attention_bias = bool(cfg.get("attention_bias", False))
    if family == "llama" and attention_bias:
        raise ValueError(
            "attention_bias=true (bias on q/k/v and o_proj) is not supported: only QKV bias (Qwen2 style) is"
        )
    if cfg.get("pretraining_tp", 1) not in (1, None):
        log.warning("pretraining_tp=%s is ignored (it only changes how HF splits matmuls)", cfg["pretraining_tp"])
    window = cfg.get("sliding_window")
    uses_window = family == "mistral" or cfg.get("use_sliding_window", False)
    if window and uses_window:
        log.warning(
            "sliding_window=%s is not reproduced: attention is full causal, identical to HF only for "
            "sequences of at most %s tokens",
            window,
            window,
        )
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
        # Qwen2 always has q/k/v biases and no other linear bias.
        qkv_bias=family == "qwen2" or attention_bias,
        # The three config classes default to untied.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        params_dtype=_dtype(cfg),
    )


def hf_config_from_model_config(model: "ModelConfig", dtype: str = "float32") -> dict[str, Any]:
    """A minimal transformers-loadable config.json for ``model`` (used when no original config travelled)."""
    cfg: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURES[model.family]],
        "model_type": model.family,
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
    if model.family == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if model.family == "mistral":
        cfg["sliding_window"] = None
    return cfg
