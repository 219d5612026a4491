"""HF folder -> psft_megatron model checkpoint (see :mod:`psft_megatron.checkpoint.model_checkpoint`),
streamed tensor by tensor.

Every check (architecture, missing / unexpected tensors, shapes, truncated files, a
writable output folder) runs on the config and the safetensors headers before a byte
is written; the output appears under its final name only once complete. Every problem
with the input or the output raises :class:`ConversionError` naming the file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from psft_megatron.checkpoint.model_checkpoint import (
    MODEL_SUBDIR,
    TOKENIZER_SUBDIR,
    atomic_dir,
    write_hf_config,
    write_meta,
)
from psft_megatron.conversion.checks import check_free_space, check_hf_folder, check_output_dir
from psft_megatron.conversion.errors import ConversionError, writing_to
from psft_megatron.conversion.hf_io import HFCheckpointReader, copy_tokenizer_files
from psft_megatron.conversion.registry import IGNORED_HF_SUFFIXES, expand
from psft_megatron.conversion.session import single_process_megatron
from psft_megatron.conversion.streaming import slots_of, stream_save
from psft_megatron.model.architectures.base import TensorTransform
from psft_megatron.model.build import build_meta_model
from psft_megatron.model.config import ModelConfig

log = logging.getLogger(__name__)

# ConversionError is defined in .errors (the torch-free checks raise it too) and exported here as before.
__all__ = ["ConversionError", "convert_hf_to_megatron", "plan_hf_to_megatron"]


def _checkpoint_dtype(reader: HFCheckpointReader) -> str:
    floats = {reader.dtype(n) for n in reader.names() if reader.dtype(n).is_floating_point}
    # bf16 stays bf16; fp16 and fp32 are stored as fp32, which holds them exactly.
    return "bf16" if floats == {torch.bfloat16} else "fp32"


def expected_hf_shapes(cfg: ModelConfig, slots: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, derived by running each export transform on meta tensors."""
    shapes = {}
    for name, hf_names, fn in expand(cfg):
        outs = fn.to_hf(torch.empty(slots[name].shape, device="meta"), cfg)
        shapes.update({h: tuple(t.shape) for h, t in zip(hf_names, outs)})
    return shapes


def plan_hf_to_megatron(
    cfg: ModelConfig, slots: dict[str, Any], reader: HFCheckpointReader
) -> dict[str, tuple[tuple[str, ...], TensorTransform]]:
    """Megatron name -> (HF names, transform), after checking the HF tensors fit exactly.

    Raises :class:`ConversionError` listing missing, unexpected or mis-shaped tensors.
    """
    plan = {name: (hf, fn) for name, hf, fn in expand(cfg)}
    if set(plan) != set(slots):
        raise ConversionError(
            f"weight mapping for {cfg.family} does not cover the megatron model: "
            f"unmapped {sorted(set(slots) - set(plan))[:5]}, unknown {sorted(set(plan) - set(slots))[:5]}"
        )
    expected = expected_hf_shapes(cfg, slots)
    present = set(reader.names())
    missing = sorted(set(expected) - present)
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(
        n for n in present - set(expected) - allowed_extra if not n.endswith(IGNORED_HF_SUFFIXES)
    )
    wrong = [
        f"{n}: expected {expected[n]}, found {reader.shape(n)}"
        for n in sorted(set(expected) & present)
        if tuple(reader.shape(n)) != expected[n]
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:8]}")
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): {unexpected[:8]} "
            "(a different architecture, or weights this converter would drop)"
        )
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {wrong[:8]}")
    if problems:
        raise ConversionError(f"{reader.folder} does not match its config.json ({cfg.family}): " + "; ".join(problems))
    return plan


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Convert the HF model folder ``hf_dir`` into a model checkpoint at ``out_dir``.

    Weights keep their precision (bf16 stays bf16; fp16/fp32 are stored as fp32).
    ``config.json`` travels as ``hf_config.json`` and the tokenizer files into
    ``tokenizer/``. Returns a small report (seconds, tensors, dtype).
    """
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    cfg = check_hf_folder(hf_dir)
    check_output_dir(out_dir, overwrite)
    reader = HFCheckpointReader(hf_dir)
    cfg = dataclasses.replace(
        cfg,
        params_dtype=_checkpoint_dtype(reader),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        transformer_impl="local",
    )
    padded = cfg.padded_vocab_size
    with single_process_megatron():
        meta_model = build_meta_model(cfg)
        slots = slots_of(meta_model)
        plan = plan_hf_to_megatron(cfg, slots, reader)

        def produce(name: str) -> torch.Tensor:
            hf_names, fn = plan[name]
            return fn.to_megatron([reader.get(h) for h in hf_names], cfg, padded)

        dtype = next(iter(slots.values())).dtype
        need = sum(s.dtype.itemsize * math.prod(s.shape) for s in slots.values())
        check_free_space(out_dir, need)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp, writing_to(out_dir, need):
            model_dir = tmp / MODEL_SUBDIR
            model_dir.mkdir()
            stream_save(meta_model, model_dir, produce)
            write_meta(
                tmp,
                dataclasses.replace(cfg, transformer_impl="auto"),
                dtype,
                created_by="convert_hf_to_megatron",
                source=str(hf_dir.resolve()),
                saved_layout={"world_size": 1, "tp": 1, "pp": 1, "vp": None, "cp": 1, "dp": 1},
                step=None,
            )
            write_hf_config(tmp, hf_dir / "config.json")
            tokenizer = copy_tokenizer_files(hf_dir, tmp / TOKENIZER_SUBDIR)
    report = {
        "seconds": time.perf_counter() - start,
        "tensors": len(plan),
        "dtype": str(dtype),
        "family": cfg.family,
        "padded_vocab_size": padded,
        "tokenizer_files": tokenizer,
    }
    log.info("converted %s -> %s: %s", hf_dir, out_dir, report)
    return report
