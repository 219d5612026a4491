"""A LoRA checkpoint out to HF: the adapters' tensors, merged into the base, or as a PEFT folder.

Reading: the adapters are small (rank x width per projection), so each one's whole stacked
``[layers, ...]`` tensor is read from the LoRA checkpoint's ``model/`` at once, as the global
(TP=1) tensor whatever the saved layout.

Merged export (:func:`psft_megatron.conversion.megatron_to_hf.convert_megatron_to_hf` on a LoRA
checkpoint): the base streams from the checkpoint ``lora_base`` points at, and each adapted HF
weight ``W`` is written as ``W + (alpha / r) B A`` (in fp32, then cast).

PEFT export (:func:`export_peft_adapter`): ``adapter_config.json`` and ``adapter_model.safetensors``
named as PEFT saves a ``LoraConfig`` adapter of a causal LM
(``base_model.model.<HF module>.lora_A.weight`` ``[r, in]``, ``lora_B.weight`` ``[out, r]``),
which ``peft.PeftModel.from_pretrained`` loads onto the HF base and vLLM serves (``--enable-lora``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from psft_megatron.checkpoint import model_checkpoint as layout
from psft_megatron.checkpoint.lora import base_checkpoint, is_lora_meta
from psft_megatron.conversion.checks import check_output_dir
from psft_megatron.conversion.errors import ConversionError, describe
from psft_megatron.conversion.session import single_process_megatron
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.lora.count import unit_shapes
from psft_megatron.model.lora.spec import lora_plans

__all__ = ["AdapterWeights", "export_peft_adapter", "read_adapters"]

PEFT_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AdapterWeights:
    """Every adapter of a LoRA checkpoint as global tensors: ``tensors[(hf module, "A" | "B")]``."""

    config: ModelConfig  # the checkpoint's model config (``lora`` set)
    tensors: dict[tuple[str, str], torch.Tensor]  # ("model.layers.3.self_attn.q_proj", "A") -> [r, in]

    @property
    def scale(self) -> float:
        return self.config.lora.scale

    def delta(self, hf_weight: str) -> torch.Tensor | None:
        """``scale * B @ A`` (fp32) for an HF weight name (``...q_proj.weight``), or None if not adapted."""
        module = hf_weight.removesuffix(".weight")
        if (module, "A") not in self.tensors:
            return None
        a, b = self.tensors[(module, "A")].float(), self.tensors[(module, "B")].float()
        return self.scale * (b @ a)


def _ckpt_key(parent: str, module: str, ab: str, unit: str) -> str:
    return f"decoder.layers.{parent}.{module}.lora_{ab}.{unit}"


def read_adapters(ckpt_dir: str | Path, meta: dict[str, Any] | None = None) -> AdapterWeights:
    """The adapters of the LoRA checkpoint at ``ckpt_dir`` (any saved layout) as global tensors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    meta = meta or layout.read_meta(ckpt_dir)
    if not is_lora_meta(meta):
        raise ConversionError(f"{ckpt_dir} is a full checkpoint, not a LoRA one: it has no adapters to export")
    cfg = layout.model_config_of(meta)
    model_dir = Path(ckpt_dir) / layout.MODEL_SUBDIR
    try:
        stored = FileSystemReader(str(model_dir)).read_metadata().state_dict_metadata
    except Exception as e:  # pickle raises many types on a damaged file
        raise ConversionError(f"{model_dir}/.metadata is unreadable (corrupt or truncated?): {describe(e)}") from None
    shapes = unit_shapes(cfg)
    r, n = cfg.lora.rank, cfg.num_layers
    request, names = {}, {}
    for module, plan in lora_plans(cfg.family, cfg.lora).items():
        for unit, hf_module in zip(plan.target.units, plan.target.hf_modules):
            if unit not in plan.units:
                continue
            fan_in, fan_out = shapes[unit]
            for ab, shape in (("A", (n, r, fan_in)), ("B", (n, fan_out, r))):
                key = _ckpt_key(plan.target.parent, module, ab, unit)
                if key not in stored or tuple(stored[key].size) != shape:
                    found = tuple(stored[key].size) if key in stored else "nothing"
                    raise ConversionError(f"{model_dir}: {key} should be {shape} for the model config in "
                                          f"psft_meta.json, the checkpoint has {found}")
                data = torch.empty(shape, dtype=stored[key].properties.dtype)
                request[key] = ShardedTensor.from_rank_offsets(key, data)
                names[key] = (hf_module, ab)
    try:
        loaded = dist_checkpointing.load(request, str(model_dir), validate_access_integrity=False)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's CheckpointException (a BaseException) wraps the reader's error
        raise ConversionError(f"cannot read the adapters in {model_dir} (a file is corrupt or truncated?): "
                              f"{describe(e)}") from None
    tensors = {}
    for key, stacked in loaded.items():
        hf_module, ab = names[key]
        for layer in range(n):
            tensors[(hf_module.format(layer=layer), ab)] = stacked[layer]
    return AdapterWeights(config=cfg, tensors=tensors)


def peft_config(cfg: ModelConfig, base_model: str | None) -> dict[str, Any]:
    """``adapter_config.json`` for ``cfg``'s adapters, as PEFT's ``LoraConfig.save_pretrained`` writes it."""
    units = sorted({u for p in lora_plans(cfg.family, cfg.lora).values() for u in p.units})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.lora.rank,
        "lora_alpha": cfg.lora.alpha,
        "lora_dropout": cfg.lora.dropout,
        "target_modules": units,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def export_peft_adapter(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    base_model: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the LoRA checkpoint at ``ckpt_dir`` as an HF PEFT adapter folder at ``out_dir``.

    ``dtype``: ``auto`` (as stored) or float32 / bfloat16 / float16. ``base_model``: what
    ``adapter_config.json`` names as the base (an HF hub name or the merged/base export's folder);
    default: the base checkpoint's HF config ``_name_or_path`` when it has one, else None.
    Returns a small report.
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    meta = layout.read_meta(ckpt_dir)
    check_output_dir(out_dir, overwrite)
    with single_process_megatron():
        adapters = read_adapters(ckpt_dir, meta)
    if base_model is None:
        base_model = _base_name(ckpt_dir, meta)
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    tensors = {}
    for (module, ab), t in sorted(adapters.tensors.items()):
        t = t if dtype == "auto" else t.to(_DTYPES[dtype])
        tensors[f"{PEFT_PREFIX}{module}.lora_{ab}.weight"] = t.contiguous()
    with layout.atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_model.safetensors").chmod(0o644)  # readable by a server running as another user
        with open(tmp / "adapter_config.json", "w") as f:
            json.dump(peft_config(adapters.config, base_model), f, indent=2)
    report = {"seconds": time.perf_counter() - start, "tensors": len(tensors), "rank": adapters.config.lora.rank,
              "target_modules": peft_config(adapters.config, None)["target_modules"], "base_model": base_model}
    return report


def _base_name(ckpt_dir: str | Path, meta: dict[str, Any]) -> str | None:
    """The HF name the base came from, when its hf_config.json records one."""
    try:
        base = base_checkpoint(ckpt_dir, meta)
    except Exception:  # the base may be elsewhere on the machine that serves the adapter
        return None
    path = base / layout.HF_CONFIG_FILE
    if path.is_file():
        try:
            name = json.loads(path.read_text()).get("_name_or_path")
        except (OSError, ValueError):
            return None
        return name or None
    return None
