"""One module per HF model family, and the registry of them: the single place a family is known.

Belongs here: each family's HF config mapping (config.json <-> ``ModelConfig`` fields), its
weight-mapping table (plain data naming HF and Megatron tensors), its own tensor transforms and
the HF model types it claims (``llama.py``, ``qwen2.py``, ``mistral.py``, ``qwen3.py``,
``qwen3_moe.py``); the shapes they share (``base``) and the config fields every Llama-style
decoder shares (``decoder``).
Not here: reading or writing tensors, the generic transforms (QKV interleave, gate/up, vocabulary
padding) and the streaming converters (``psft_megatron.conversion``, which consumes the tables).

Adding a family: a module here that defines ``ARCHITECTURE`` (see ``base.Architecture``), its
name in :data:`FAMILY_MODULES`, and its test in ``tests/test_architectures.py``.
"""

from __future__ import annotations

from typing import Any

from psft_megatron.model.architectures import llama, mistral, qwen2, qwen3, qwen3_moe
from psft_megatron.model.architectures.base import Architecture

__all__ = ["ARCHITECTURES", "FAMILIES", "FAMILY_MODULES", "architecture", "architecture_of_hf"]

FAMILY_MODULES = (llama, qwen2, mistral, qwen3, qwen3_moe)


def _index(pairs: list[tuple[str, Architecture]], what: str) -> dict[str, Architecture]:
    """``{key: architecture}``; two families claiming one key would make lookups depend on their order."""
    out: dict[str, Architecture] = {}
    for key, arch in pairs:
        if key in out:
            raise RuntimeError(f"{what} {key!r} is claimed by both {out[key].family} and {arch.family}")
        out[key] = arch
    return out


ARCHITECTURES = _index([(m.ARCHITECTURE.family, m.ARCHITECTURE) for m in FAMILY_MODULES], "family")
_BY_MODEL_TYPE = _index([(t, a) for a in ARCHITECTURES.values() for t in a.model_types], "HF model_type")
_BY_HF_CLASS = _index([(a.hf_class, a) for a in ARCHITECTURES.values()], "transformers class")

# ModelConfig.family's choices.
FAMILIES: tuple[str, ...] = tuple(ARCHITECTURES)


def architecture(family: str) -> Architecture:
    """The registered family ``family`` (``ModelConfig.family``); KeyError naming the known ones."""
    if family not in ARCHITECTURES:
        raise KeyError(f"no architecture {family!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[family]


def architecture_of_hf(cfg: dict[str, Any]) -> Architecture:
    """The family of an HF config dict: by ``model_type``, else by a class in ``architectures``.

    Raises ValueError (one line) naming the model types this project supports.
    """
    model_type = cfg.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    for hf_class in cfg.get("architectures") or []:
        if hf_class in _BY_HF_CLASS:
            return _BY_HF_CLASS[hf_class]
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r}, architectures={cfg.get('architectures')}; "
        f"supported model types: {sorted(_BY_MODEL_TYPE)}"
    )
