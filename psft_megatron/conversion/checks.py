"""Checks of the converters' inputs and output location, run before anything is built.

The HF folder (``config.json`` readable and of a supported architecture, weight files
present, every safetensors header well formed and the file as long as its header
says) and the output path (not already there, its folder writable) are checked here.
Nothing in this module imports torch or megatron-core, so the command-line tools run
these checks first and a bad path fails in a second rather than after the imports.
Problems raise :class:`~psft_megatron.conversion.errors.ConversionError` (an existing
output: ``FileExistsError``) naming the file and what to change.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

from psft_megatron.conversion.errors import ConversionError, describe, size_text
from psft_megatron.model.config import ModelConfig

__all__ = [
    "check_checkpoint_dir",
    "check_free_space",
    "check_hf_folder",
    "check_output_dir",
    "hf_model_config",
    "read_safetensors_header",
    "weight_files",
]

_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def hf_model_config(hf_dir: str | Path) -> ModelConfig:
    """The :class:`ModelConfig` of the HF folder's ``config.json``; a missing, unreadable or
    unsupported config raises :class:`ConversionError` naming the file."""
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        raise ConversionError(f"{hf_dir} does not exist: give a Hugging Face model folder (config.json + weights)")
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is a file: give the Hugging Face model folder that holds it")
    config = hf_dir / "config.json"
    if not config.is_file():
        raise ConversionError(f"{config} does not exist: {hf_dir} is not a Hugging Face model folder")
    try:
        return ModelConfig.from_hf(config)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{config} is not valid JSON: {e}") from None
    except KeyError as e:
        raise ConversionError(f"{config} lacks the field {e}") from None
    except (ValueError, TypeError) as e:  # unsupported architecture or feature, a field of the wrong type
        raise ConversionError(f"{config}: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise ConversionError(f"cannot read {config}: {describe(e)}") from None


def weight_files(folder: str | Path) -> tuple[str, list[Path]]:
    """``("safetensors" | "bin", files)``: the weight files of an HF folder, from its index when it has one."""
    folder = Path(folder)
    st = sorted(folder.glob("*.safetensors"))
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if st:
        fmt, found, index = "safetensors", st, folder / "model.safetensors.index.json"
    elif bins:
        fmt, found, index = "bin", bins, folder / "pytorch_model.bin.index.json"
    else:
        raise ConversionError(f"{folder} holds no weights: no *.safetensors or pytorch_model*.bin file")
    if not index.exists():
        return fmt, found
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index} is not a readable weight index ({describe(e)}): re-download it") from None
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ConversionError(f"{index} lists shard(s) that do not exist: {missing}")
    return fmt, files


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset its data starts at.

    Checks what can be checked without reading the data: the header parses, every
    tensor entry has a dtype, a shape and byte offsets, and the file is as long as
    the offsets say (a truncated download fails here, naming the file).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ConversionError(f"{path} is not a safetensors file: only {size} bytes (truncated?)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise ConversionError(
                    f"{path} is corrupt or truncated: its header length field says {n} bytes, "
                    f"the file holds {size} bytes"
                )
            text = f.read(n)
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {describe(e)}") from None
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path} has a corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and isinstance(info.get("shape"), list)
            and all(isinstance(s, int) and s >= 0 for s in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) for o in info["data_offsets"])
            and 0 <= info["data_offsets"][0] <= info["data_offsets"][1]
        )
        if not ok:
            raise ConversionError(f"{path} has a corrupt safetensors header: bad entry for tensor {name!r}: {info!r:.200}")
        end = max(end, info["data_offsets"][1])
    base = 8 + n
    if base + end > size:
        raise ConversionError(
            f"{path} is truncated: its header describes {end} bytes of tensor data, the file holds "
            f"{size - base}; re-download or re-save it"
        )
    return header, base


def check_hf_folder(hf_dir: str | Path) -> ModelConfig:
    """Check an HF model folder as far as can be done without reading the weights; returns its config."""
    cfg = hf_model_config(hf_dir)
    fmt, files = weight_files(hf_dir)
    if fmt == "safetensors":
        for path in files:
            read_safetensors_header(path)
    return cfg


def check_checkpoint_dir(ckpt: str | Path) -> None:
    """Raise :class:`ConversionError` when ``ckpt`` does not exist or is a file, in the words
    ``read_meta`` uses (which needs megatron-core imported, ten seconds, to say the same)."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise ConversionError(f"{ckpt} does not exist")
    if not ckpt.is_dir():
        raise ConversionError(f"{ckpt} is a file, not a checkpoint directory (which holds psft_meta.json and model/)")


def check_output_dir(out: str | Path, overwrite: bool = False) -> None:
    """Raise unless ``out`` can be created: ``FileExistsError`` when it exists (without
    ``overwrite``), :class:`ConversionError` when its folder cannot be written.

    Writability is probed by creating (and removing) an empty folder beside the output,
    which also covers read-only file systems and ACLs, and root, for whom permission
    bits do not apply.
    """
    out = Path(out)
    try:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists: choose another output path or pass overwrite (--overwrite)")
        probe = _existing_parent(out.parent)
    except PermissionError as e:
        raise ConversionError(f"cannot write {out}: {describe(e)}") from None
    if not probe.is_dir():
        raise ConversionError(f"cannot write {out}: {probe} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.write-check-", dir=probe))
    except OSError as e:
        raise ConversionError(f"cannot write {out}: [Errno {e.errno}] {e.strerror}: '{probe}'") from None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_free_space(out: str | Path, need_bytes: int) -> None:
    """Raise :class:`ConversionError` when the disk ``out`` goes to has less free space than
    ``need_bytes`` (the tensor bytes to write), before writing any of them."""
    out = Path(out)
    free = shutil.disk_usage(_existing_parent(out)).free
    if free < need_bytes:
        raise ConversionError(
            f"not enough disk space for {out}: {size_text(free)} free, the tensors alone take "
            f"{size_text(need_bytes)}; free space or choose another output path"
        )
