"""Tensor-by-tensor reading and writing of HF checkpoint folders.

Reading: ``*.safetensors`` (one file or sharded with ``model.safetensors.index.json``)
or ``pytorch_model*.bin``. Safetensors files are read by seeking to one tensor's
bytes and reading only those, so memory holds the tensors being converted and no
more. (``safetensors.safe_open`` maps the whole file; every page it touches counts
toward the process's resident memory until the file is closed.) ``.bin`` files are
opened with ``torch.load(mmap=True)``, which pages tensors in lazily.

Writing: ``safetensors.torch.save_file`` needs a whole shard in memory, so
:class:`SafetensorsWriter` lays out every shard's header up front (names, dtypes
and shapes are known before any data) and then writes each tensor's bytes at its
offset as soon as it is produced. Output: ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json``, as ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from psft_megatron.conversion.checks import read_safetensors_header, weight_files
from psft_megatron.conversion.errors import ConversionError, describe

__all__ = ["HFCheckpointReader", "SafetensorsWriter", "TOKENIZER_FILES", "copy_tokenizer_files"]

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file (safetensors only)
    end: int


class HFCheckpointReader:
    """Names, shapes and dtypes of an HF folder's tensors without reading them; ``get`` reads one."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._entries: dict[str, _Entry] = {}
        self._bin: dict[str, dict[str, torch.Tensor]] = {}
        self.format, files = weight_files(self.folder)
        for path in files:
            if self.format == "safetensors":
                self._add_safetensors(path)
            else:
                self._add_bin(path)

    def _add_safetensors(self, path: Path) -> None:
        header, base = read_safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            dtype, shape = _ST_DTYPES[info["dtype"]], tuple(info["shape"])
            b, e = info["data_offsets"]
            if e - b != _nbytes(shape, dtype):
                raise ConversionError(
                    f"{path} has a corrupt safetensors header: tensor {name} {shape} {info['dtype']} "
                    f"needs {_nbytes(shape, dtype)} bytes, its offsets span {e - b}"
                )
            self._entries[name] = _Entry(path, dtype, shape, base + b, base + e)

    def _add_bin(self, path: Path) -> None:
        try:
            try:
                sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise ConversionError(f"{path} is not a readable PyTorch weights file (corrupt or truncated?): {describe(e)}") from None
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise ConversionError(f"{path} does not hold a state dict of tensors")
        self._bin[str(path)] = sd
        for name, t in sd.items():
            self._entries[name] = _Entry(path, t.dtype, tuple(t.shape), 0, 0)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory."""
        e = self._entries[name]
        if self.format == "bin":
            return self._bin[str(e.file)][name].clone()
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        try:
            with open(e.file, "rb") as f:
                f.seek(e.start)
                n = f.readinto(buf.numpy())
        except OSError as err:
            raise ConversionError(f"cannot read {e.file}: {describe(err)}") from None
        if n != e.end - e.start:  # the file shrank after its header was checked
            raise ConversionError(f"{e.file} is truncated: tensor {name} ends past the end of the file")
        return buf.view(e.dtype).reshape(e.shape)


class SafetensorsWriter:
    """Streams tensors into HF-style safetensors shards whose layout is fixed up front.

    ``plan`` lists (name, shape, dtype) in write order; shards are cut at
    ``max_shard_bytes``. :meth:`write` accepts the tensors in any order;
    :meth:`close` checks every planned tensor was written and writes the index.
    """

    def __init__(self, folder: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int = 5 * 2**30):
        self.folder = Path(folder)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            nbytes = _nbytes(item[1], item[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += nbytes
        n = len(shards)
        self._where: dict[str, tuple[Path, int, tuple[int, ...], torch.dtype]] = {}
        self._files: dict[Path, object] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path = self.folder / fname
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype in shard:
                nbytes = _nbytes(shape, dtype)
                header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
            f = open(path, "wb")
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)
            self._files[path] = f
            base = 8 + len(raw)
            for name, shape, dtype in shard:
                b = header[name]["data_offsets"][0]  # type: ignore[index]
                self._where[name] = (path, base + b, tuple(shape), dtype)
                self.weight_map[name] = fname
            self.total_size += offset
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise KeyError(f"tensor {name} is not in the output plan")
        path, offset, shape, dtype = self._where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: planned {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        f = self._files[path]
        f.seek(offset)  # type: ignore[attr-defined]
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        f.write(memoryview(data.numpy()))  # type: ignore[attr-defined]
        self._written.add(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[:5]}")
        with open(self.folder / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}, f, indent=2)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty((), dtype=dtype).element_size()


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer (and generation config) files present in ``src`` to ``dst``; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
