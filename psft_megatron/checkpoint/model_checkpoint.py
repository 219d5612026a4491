"""The model checkpoint directory shared by the converters and the trainer.

Layout::

    <dir>/
      psft_meta.json    {"format": "psft-megatron", "format_version": 1,
                         "model": ModelConfig fields, "dtype": "float32" | "bfloat16",
                         "saved_layout": {"world_size", "tp", "pp", "vp", "cp", "dp"}, "step": int | null,
                         "created_by": str, ...any extra keys the saver adds}
      model/            megatron-core dist checkpoint (torch_dist format, written by
                        dist_checkpointing.save of the model's sharded_state_dict():
                        TP/PP-independent global tensors, loads at any layout)
      hf_config.json    the HF config.json the weights came from (optional)
      tokenizer/        tokenizer files (optional)

Every writer builds the directory under ``<dir>.partial`` and renames it at the
end, so a directory named ``<dir>`` is always complete; a crash leaves only
``<dir>.partial``, which the next save replaces.

A model built with ``model.lora`` saves only its adapters, with ``lora_base`` in the meta naming
the full checkpoint they adapt (:mod:`psft_megatron.checkpoint.lora`); :func:`load_model_checkpoint`
follows it.

``init_from`` in the trainer calls :func:`load_model_checkpoint` (model weights only).
The trainer's checkpoints (:mod:`psft_megatron.checkpoint.train_checkpoint`) are this
directory plus optimizer and training state, so every reader of model checkpoints
(``init_from``, the exporter, the scorer) reads them too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from psft_megatron.checkpoint.lora import LORA_BASE, base_checkpoint, is_lora_meta
from psft_megatron.errors import UserError
from psft_megatron.model.build import unwrap_model
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.hf_config import load_hf_config_dict
from psft_megatron.model.lora.spec import lora_plans
from psft_megatron.model.lora.state import has_adapters, is_adapter_key, lora_layers
from psft_megatron.runtime.distributed import parallel_layout

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_dir",
    "load_model_checkpoint",
    "model_config_of",
    "model_sharded_state_dict",
    "saved_part",
    "read_meta",
    "save_model_checkpoint",
    "write_hf_config",
    "write_meta",
    "write_model_checkpoint",
]

FORMAT = "psft-megatron"
FORMAT_VERSION = 1
META_FILE = "psft_meta.json"
MODEL_SUBDIR = "model"
HF_CONFIG_FILE = "hf_config.json"
TOKENIZER_SUBDIR = "tokenizer"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read as asked (wrong layout, model or format)."""


def global_rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """A barrier over all ranks (no-op without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield ``<final>.partial`` to write into; rename it to ``final`` when the block succeeds.

    Collective when torch.distributed is initialised (every rank enters, rank 0
    manages the directories). On an exception the partial directory is removed.
    """
    final = Path(final)
    tmp = final.with_name(final.name + ".partial")
    if global_rank() == 0:
        if final.exists() and not overwrite:
            raise FileExistsError(f"{final} exists; choose another output path or pass overwrite")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    try:
        yield tmp
    except BaseException:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    if global_rank() == 0:
        old = final.with_name(final.name + ".old")
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    barrier()


def write_meta(dir: str | Path, model: ModelConfig, dtype: torch.dtype, **extra: Any) -> None:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.to_dict(),
        "dtype": str(dtype).replace("torch.", ""),
        **extra,
    }
    with open(Path(dir) / META_FILE, "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(dir: str | Path) -> dict[str, Any]:
    """The checkpoint's psft_meta.json, checked for format and version."""
    path = Path(dir) / META_FILE
    if not path.is_file():
        if not Path(dir).exists():
            partial = Path(str(dir) + ".partial").exists()
            raise CheckpointError(
                f"{dir} does not exist"
                + (" (only an unfinished .partial directory does: the save did not complete)" if partial else "")
            )
        if not Path(dir).is_dir():
            raise CheckpointError(f"{dir} is a file, not a checkpoint directory (which holds {META_FILE} and model/)")
        hint = ""
        if (Path(dir) / "metadata.json").is_file():
            hint = " (this looks like a bare megatron dist checkpoint: point at its parent directory)"
        raise CheckpointError(f"{dir} is not a psft_megatron model checkpoint: no {META_FILE}{hint}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, or not JSON (e.g. cut short by a full disk)
        raise CheckpointError(f"{path} is unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path} has no model config ('model')")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta['format_version']} is newer than this code reads ({FORMAT_VERSION})"
        )
    return meta


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    """The checkpoint's :class:`ModelConfig`, resolved (a recipe may have stored only ``hf_config``)."""
    cfg = ModelConfig.from_dict(meta["model"])
    if cfg.hf_config and not cfg.num_layers:  # saved before resolving: read its hf_config now
        return cfg.resolve()
    cfg.resolved = True  # saved resolved: its hf_config only records where it came from
    return cfg


def model_sharded_state_dict(model_chunks: list[Any], part: str = "all") -> dict[str, Any]:
    """The chunks' sharded state dicts (DDP wrappers removed), e.g. to key an optimizer's state.

    ``part``: ``all``, or for a model with LoRA adapters ``adapters`` (what its checkpoints hold)
    or ``base`` (what the base checkpoint holds).
    """
    # Per-chunk sub-dicts: chunk-local module names repeat across virtual stages,
    # while the dist-checkpoint keys inside are global.
    out = {f"model{i}": unwrap_model(c).sharded_state_dict() for i, c in enumerate(model_chunks)}
    if part == "all":
        return out
    keep = part == "adapters"
    return {name: {k: v for k, v in sd.items() if is_adapter_key(k) == keep} for name, sd in out.items()}


def saved_part(model_chunks: list[Any]) -> str:
    """What a checkpoint of these chunks holds: ``adapters`` for a LoRA model, else ``all``."""
    return "adapters" if has_adapters(model_chunks) else "all"


def save_model_checkpoint(
    model_chunks: list[Any],
    dir: str | Path,
    meta: dict[str, Any],
    *,
    hf_config: dict[str, Any] | str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Save this rank's model chunks as a complete model checkpoint directory (collective).

    ``meta`` must hold ``"model"``: the :class:`ModelConfig` (or its dict); other keys
    (``step``, ...) are stored as given. ``hf_config`` (dict or config.json path)
    travels with the weights when given.
    """
    meta = dict(meta)
    model_cfg = meta.pop("model")
    with atomic_dir(dir, overwrite=overwrite) as tmp:
        write_model_checkpoint(model_chunks, tmp, model_cfg, meta, hf_config=hf_config)
    return Path(dir)


def write_model_checkpoint(
    model_chunks: list[Any],
    dir: Path,
    model_cfg: ModelConfig | dict[str, Any],
    meta: dict[str, Any],
    *,
    hf_config: dict[str, Any] | str | Path | None = None,
) -> None:
    """Write ``model/``, the meta file and ``hf_config.json`` into the existing, empty ``dir``
    (collective, not atomic by itself: callers write into an :func:`atomic_dir`)."""
    from megatron.core import dist_checkpointing

    if isinstance(model_cfg, dict):
        model_cfg = ModelConfig.from_dict(model_cfg)
    meta = dict(meta)
    meta.setdefault("saved_layout", parallel_layout())
    meta.setdefault("created_by", "psft_megatron")
    part = saved_part(model_chunks)
    if part == "adapters" and not meta.get(LORA_BASE):
        raise ValueError(f"a LoRA model's checkpoint holds its adapters only: meta needs {LORA_BASE!r}, the base "
                         "checkpoint they adapt")
    dtype = next(unwrap_model(model_chunks[0]).parameters()).dtype
    model_dir = dir / MODEL_SUBDIR
    if global_rank() == 0:
        model_dir.mkdir()
    barrier()
    dist_checkpointing.save(model_sharded_state_dict(model_chunks, part), str(model_dir))
    if global_rank() == 0:
        write_meta(dir, model_cfg, dtype, **meta)
        if hf_config is not None:
            write_hf_config(dir, hf_config)


def write_hf_config(dir: Path, hf_config: dict[str, Any] | str | Path) -> None:
    """Store the HF ``config.json`` (a dict, or a path to one) the weights came from as ``hf_config.json``."""
    if not isinstance(hf_config, dict):
        hf_config = load_hf_config_dict(hf_config)
    with open(dir / HF_CONFIG_FILE, "w") as f:
        json.dump(hf_config, f, indent=2)


# TransformerConfig field -> ModelConfig attribute, checked before loading.
_ARCH_FIELDS = (
    ("num_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "query_groups"),
    ("kv_channels", "kv_channels"),
    ("add_qkv_bias", "qkv_bias"),
    ("qk_layernorm", "qk_layernorm"),
    ("num_moe_experts", "num_experts"),
    ("moe_ffn_hidden_size", "moe_ffn_hidden_size"),
)


def check_compatible(model_chunks: list[Any], ckpt_model: ModelConfig, dir: str | Path) -> None:
    """Raise :class:`CheckpointError` naming every architecture field where model and checkpoint differ."""
    chunk = unwrap_model(model_chunks[0])
    cfg = chunk.config
    diffs = [
        f"{attr}: checkpoint {getattr(ckpt_model, attr)}, model {getattr(cfg, field)}"
        for field, attr in _ARCH_FIELDS
        if getattr(cfg, field) != getattr(ckpt_model, attr)
    ]
    if bool(chunk.share_embeddings_and_output_weights) != ckpt_model.tie_word_embeddings:
        diffs.append(
            f"tie_word_embeddings: checkpoint {ckpt_model.tie_word_embeddings}, "
            f"model {chunk.share_embeddings_and_output_weights}"
        )
    if diffs:
        raise CheckpointError(f"{dir} holds a different architecture than the model built: " + "; ".join(diffs))


def _adapter_layout(model_chunks: list[Any]) -> tuple[int, dict[str, tuple[str, ...]]] | None:
    """(rank, {linear: adapted units}) of the chunks' adapters, or None without any."""
    layers = lora_layers(model_chunks)
    if not layers:
        return None
    return layers[0].lora_plan.rank, {m.lora_plan.target.module: m.lora_plan.units for m in layers}


def _check_adapters(model_chunks: list[Any], meta: dict[str, Any], dir: str | Path) -> None:
    """Raise :class:`CheckpointError` when the checkpoint's adapters are not the model's (rank, targets)."""
    saved_cfg = model_config_of(meta)
    saved = (saved_cfg.lora.rank, {m: p.units for m, p in lora_plans(saved_cfg.family, saved_cfg.lora).items()})
    built = _adapter_layout(model_chunks)
    if built is None:
        raise CheckpointError(
            f"{dir} holds LoRA adapters (over the base {meta[LORA_BASE]}) but the model was built without them: "
            "build it from the checkpoint's own model config (its model.lora), or export it merged with "
            "psft-export-hf and load that"
        )
    if built != saved:
        raise CheckpointError(f"{dir} holds rank-{saved[0]} adapters on {saved[1]}, the model was built with "
                              f"rank-{built[0]} adapters on {built[1]}: set model.lora as the checkpoint has it")


def _load_part(model_chunks: list[Any], dir: str | Path, part: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    sharded = model_sharded_state_dict(model_chunks, part)
    loaded, _missing, unexpected = dist_checkpointing.load(
        sharded, str(Path(dir) / MODEL_SUBDIR), strict=StrictHandling.RETURN_UNEXPECTED
    )
    absent = sorted(k for k in unexpected if not k.split("/")[0].endswith("_extra_state"))
    if absent:
        raise CheckpointError(f"{dir} lacks tensors the model needs: {absent[:8]}{' ...' if len(absent) > 8 else ''}")
    for i, chunk in enumerate(model_chunks):
        result = unwrap_model(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        wanted = set(sharded[f"model{i}"])
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and k in wanted]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"loading {dir}: missing {missing}, unexpected {result.unexpected_keys}")


def load_model_checkpoint(model_chunks: list[Any], dir: str | Path, *, base: str | Path | None = None) -> dict[str, Any]:
    """Load the weights of the checkpoint at ``dir`` into this rank's chunks, at any TP/PP (collective).

    Checks the architecture first. ``_extra_state`` entries (TransformerEngine's FP8
    metadata) that the checkpoint lacks are left as they are; any missing weight
    raises. Returns the checkpoint's meta.

    LoRA: a LoRA checkpoint (adapters only) loads its base's weights from the full checkpoint its
    meta points at (``base`` overrides the pointer), then the adapters; the model must have been
    built with the same adapters. A full checkpoint loaded into a model with adapters fills the base
    and leaves the adapters as they are (:func:`psft_megatron.model.lora.state.init_adapters`).
    """
    meta = read_meta(dir)
    lora_ckpt = is_lora_meta(meta)
    if lora_ckpt:
        _check_adapters(model_chunks, meta, dir)
        base_dir = base_checkpoint(dir, meta, base)
        base_meta = read_meta(base_dir)
        if is_lora_meta(base_meta):
            raise CheckpointError(f"{dir}: its base {base_dir} is itself a LoRA checkpoint; point at the full one")
    else:
        base_dir, base_meta = Path(dir), meta
    check_compatible(model_chunks, model_config_of(base_meta), base_dir)
    _load_part(model_chunks, base_dir, "base" if has_adapters(model_chunks) else "all")
    if lora_ckpt:
        _load_part(model_chunks, dir, "adapters")
    return meta
