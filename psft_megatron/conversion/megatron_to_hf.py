"""psft_megatron model checkpoint (any saved TP/PP) -> HF folder, streamed layer by layer.

The checkpoint's tensors are checked against the model config in ``psft_meta.json``
(keys and global shapes, from the dist-checkpoint metadata) before anything is
written, and every file is checked to be as long as the checkpoint's ``.metadata`` says (a
truncated copy fails there, naming the file); the output appears under its final name only
once complete. Problems raise :class:`ConversionError` (or ``CheckpointError`` from reading
``psft_meta.json``) naming the file.

A LoRA checkpoint (adapters only) exports merged: the base streams from the full checkpoint it
points at and each adapted weight gets ``(alpha / r) B A`` added (:mod:`.lora_export`, which also
writes the adapters as a PEFT folder instead).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from psft_megatron.checkpoint import model_checkpoint as layout
from psft_megatron.checkpoint.lora import base_checkpoint, is_lora_meta
from psft_megatron.conversion.checks import check_free_space, check_output_dir
from psft_megatron.conversion.errors import ConversionError, describe, writing_to
from psft_megatron.conversion.hf_io import SafetensorsWriter, copy_tokenizer_files
from psft_megatron.conversion.lora_export import read_adapters
from psft_megatron.conversion.registry import expand
from psft_megatron.conversion.session import single_process_megatron
from psft_megatron.conversion.streaming import load_groups, slots_of
from psft_megatron.model.build import build_meta_model
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.hf_config import hf_config_from_model_config

log = logging.getLogger(__name__)

__all__ = ["convert_megatron_to_hf"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _check_checkpoint(model_dir: Path, slots: dict[str, Any], cfg: ModelConfig) -> torch.dtype:
    """Compare the dist checkpoint's tensor keys and global shapes with the model's; return its weights' dtype."""
    from megatron.core.dist_checkpointing import load_common_state_dict
    from megatron.core.dist_checkpointing.core import maybe_load_config
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (model_dir / ".metadata").is_file():
        raise ConversionError(f"{model_dir} holds no torch_dist checkpoint (.metadata missing)")
    # megatron's own readers of its two small files, so a damaged one is named here, not deep in a load.
    try:
        config = maybe_load_config(str(model_dir))
    except Exception as e:  # json or a field the config class does not know
        raise ConversionError(f"{model_dir / 'metadata.json'} is unreadable (corrupt?): {describe(e)}") from None
    if config is None:
        raise ConversionError(f"{model_dir} is not a megatron dist checkpoint (metadata.json missing)")
    try:
        load_common_state_dict(str(model_dir))
    except Exception as e:  # torch.load raises many types on a damaged file
        raise ConversionError(f"{model_dir / 'common.pt'} is unreadable (corrupt or truncated?): {describe(e)}") from None
    try:
        metadata = FileSystemReader(str(model_dir)).read_metadata()
    except Exception as e:  # pickle raises many types on a damaged file
        raise ConversionError(f"{model_dir / '.metadata'} is unreadable (corrupt or truncated?): {describe(e)}") from None
    _check_file_sizes(model_dir, metadata.storage_data or {})
    md = metadata.state_dict_metadata
    tensors = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
    expected: dict[str, tuple[int, ...]] = {}
    for s in slots.values():  # the stored shape: stacked layer and expert axes, then the tensor
        expected[s.ckpt_key] = s.stored_shape
    missing = sorted(set(expected) - set(tensors))
    wrong = []
    for key in sorted(set(expected) & set(tensors)):
        found, want = tuple(tensors[key].size), expected[key]
        if key in _VOCAB_KEYS:  # padded differently per saved TP size: only need >= vocab rows
            ok = found[1:] == want[1:] and found[0] >= cfg.vocab_size
        else:
            ok = found == want
        if not ok:
            wrong.append(f"{key}: model config implies {want}, checkpoint has {found}")
    if missing or wrong:
        raise ConversionError(
            f"{model_dir} does not match the model config in psft_meta.json "
            f"(saved from another model or layout?): missing {missing[:8]}; shape mismatches {wrong[:8]}"
        )
    # Norms may be stored in fp32 next to bf16 weights; the embedding's dtype names the checkpoint's.
    return tensors["embedding.word_embeddings.weight"].properties.dtype


def _check_file_sizes(model_dir: Path, storage: dict[Any, Any]) -> None:
    """Every stored item's bytes lie inside its file: an incomplete copy fails here, naming the file."""
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(need.items()):
        path = model_dir / name
        if not path.is_file():
            raise ConversionError(f"{path} is missing: the checkpoint's .metadata lists it")
        size = path.stat().st_size
        if size < end:
            raise ConversionError(
                f"{path} is truncated: the checkpoint's .metadata puts data up to byte {end}, the file holds "
                f"{size} bytes; copy the checkpoint again"
            )


def _travelled_hf_config(ckpt_dir: Path, cfg: ModelConfig) -> dict[str, Any] | None:
    """The HF config that came with the weights: ``hf_config.json``, else the model config's ``hf_config``."""
    candidates = [ckpt_dir / layout.HF_CONFIG_FILE]
    if cfg.hf_config:
        p = Path(cfg.hf_config)
        candidates.append(p / "config.json" if p.is_dir() else p)
    for path in candidates:
        if path.is_file():
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError) as e:
                raise ConversionError(f"{path} is not a readable HF config: {describe(e)}") from None
    return None


def _source_dtype(ckpt_dir: Path, cfg: ModelConfig) -> torch.dtype | None:
    """The dtype named by the HF config that travelled with the checkpoint, if any."""
    hf = _travelled_hf_config(ckpt_dir, cfg)
    if hf is None:
        return None
    return _DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "").replace("torch.", ""))


def _hf_config(ckpt_dir: Path, cfg: ModelConfig, out_dtype: torch.dtype) -> dict[str, Any]:
    name = str(out_dtype).replace("torch.", "")
    hf = _travelled_hf_config(ckpt_dir, cfg)
    if hf is None:
        hf = hf_config_from_model_config(cfg)
    hf["dtype" if "dtype" in hf else "torch_dtype"] = name
    return hf


def _tokenizer_source(ckpt_dir: Path, meta: dict[str, Any], explicit: str | Path | None,
                      base_dir: Path | None = None) -> Path | None:
    """Explicit folder, else the checkpoint's ``tokenizer/``, else the trainer's recorded tokenizer folder
    (else a LoRA checkpoint's base's ``tokenizer/``)."""
    base_tok = base_dir / layout.TOKENIZER_SUBDIR if base_dir else None
    for candidate in (explicit, ckpt_dir / layout.TOKENIZER_SUBDIR, meta.get("tokenizer"), base_tok):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def convert_megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    base: str | Path | None = None,
) -> dict[str, Any]:
    """Write the model checkpoint at ``ckpt_dir`` as an HF folder at ``out_dir``.

    A LoRA checkpoint is written merged into its base (``base`` overrides the base checkpoint it
    points at, e.g. after a move).

    ``dtype``: "auto" (the HF config's dtype when one travelled with the checkpoint,
    else the checkpoint's), or float32 / bfloat16 / float16. Vocabulary padding is
    trimmed. Tokenizer files come from the checkpoint's ``tokenizer/`` or ``tokenizer_dir``.
    Returns a small report.
    """
    start = time.perf_counter()
    ckpt_dir = Path(ckpt_dir)
    meta = layout.read_meta(ckpt_dir)
    cfg = layout.model_config_of(meta)
    check_output_dir(out_dir, overwrite)
    weights_dir = ckpt_dir
    if is_lora_meta(meta):  # the base's weights, plus the adapters merged in
        weights_dir = base_checkpoint(ckpt_dir, meta, base)
        cfg = dataclasses.replace(cfg, lora=None)
    model_dir = weights_dir / layout.MODEL_SUBDIR
    with single_process_megatron():
        adapters = read_adapters(ckpt_dir, meta) if weights_dir != ckpt_dir else None
        # Keys and shapes only: tensors are read in the dtype they were stored in.
        meta_model = build_meta_model(dataclasses.replace(cfg, params_dtype="fp32", transformer_impl="local"))
        slots = slots_of(meta_model)
        ckpt_dtype = _check_checkpoint(model_dir, slots, cfg)

        if dtype == "auto":
            out_dtype = _source_dtype(ckpt_dir, cfg) or _source_dtype(weights_dir, cfg) or ckpt_dtype
        elif dtype in _DTYPES:
            out_dtype = _DTYPES[dtype]
        else:
            raise ValueError(f"dtype must be auto or one of {sorted(_DTYPES)}, got {dtype!r}")

        entries = {name: (hf, fn) for name, hf, fn in expand(cfg)}
        if set(entries) != set(slots):
            raise ConversionError(f"weight mapping for {cfg.family} does not cover the megatron model")
        plan = []
        for name, (hf_names, fn) in entries.items():
            outs = fn.to_hf(torch.empty(slots[name].shape, device="meta"), cfg)
            plan += [(h, tuple(t.shape), out_dtype) for h, t in zip(hf_names, outs)]

        need = sum(out_dtype.itemsize * math.prod(shape) for _, shape, _ in plan)
        check_free_space(out_dir, need)
        with layout.atomic_dir(out_dir, overwrite=overwrite) as tmp, writing_to(out_dir, need):
            writer = SafetensorsWriter(tmp, plan, max_shard_bytes=max_shard_bytes)
            for group in load_groups(meta_model, model_dir):  # read errors arrive as ConversionError
                for name, tensor in group.items():
                    hf_names, fn = entries[name]
                    for h, t in zip(hf_names, fn.to_hf(tensor, cfg)):
                        delta = adapters.delta(h) if adapters is not None else None
                        if delta is not None:  # merged in fp32: W + (alpha / r) B A
                            t = t.float() + delta
                        writer.write(h, t.to(out_dtype))
                del group
            writer.close()
            with open(tmp / "config.json", "w") as f:
                json.dump(_hf_config(weights_dir, cfg, out_dtype), f, indent=2)
            tok_src = _tokenizer_source(ckpt_dir, meta, tokenizer_dir, weights_dir)
            tokenizer = copy_tokenizer_files(tok_src, tmp) if tok_src else []
            if not tokenizer:
                log.warning("no tokenizer files found for %s: pass tokenizer_dir to include them", ckpt_dir)
    report = {
        "seconds": time.perf_counter() - start,
        "tensors": len(plan),
        "dtype": str(out_dtype),
        "shards": len(set(writer.weight_map.values())),
        "tokenizer_files": tokenizer,
    }
    if adapters is not None:
        report["merged_adapters"] = len(adapters.tensors) // 2
    log.info("exported %s -> %s: %s", ckpt_dir, out_dir, report)
    return report
