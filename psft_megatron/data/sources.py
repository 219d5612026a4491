"""Read raw records from JSONL / JSON / Parquet files or ``datasets`` (hub or local).

Every record comes out as a :class:`RawRecord` with its :class:`Provenance` (file and
1-based line for JSONL; 1-based row for JSON arrays, Parquet and ``datasets`` rows).
Bad lines (invalid UTF-8, malformed JSON, a non-object) go through the
:class:`ErrorPolicy`: raised as a :class:`DataError` or counted and skipped. Problems that
make a whole file unreadable (missing file, a JSON document that does not parse, a corrupt
Parquet file, a hub dataset that cannot be loaded) always raise.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .config import DataSourceConfig, SourceFormat
from .errors import (
    INVALID_UTF8,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    SOURCE,
    DataError,
    ErrorPolicy,
)
from .types import Provenance, RawRecord

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
_JSON_SUFFIXES = (".json", ".json.gz")
_PARQUET_SUFFIXES = (".parquet",)
_FILE_SUFFIXES = _JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES


def resolve_format(cfg: DataSourceConfig) -> SourceFormat:
    """The reader for ``cfg``: by explicit format, then file suffix; else ``datasets``."""
    if cfg.format != "auto":
        return cfg.format
    if cfg.data_files is not None:
        return "datasets"
    name = cfg.path.lower()
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "datasets"  # a local dataset directory or a hub name


def iter_records(cfg: DataSourceConfig, policy: ErrorPolicy | None = None) -> Iterator[RawRecord]:
    """Stream the raw records of a source, honouring ``cfg.limit``."""
    policy = policy if policy is not None else ErrorPolicy(cfg.on_error)
    fmt = resolve_format(cfg)
    if fmt == "datasets":
        it = iter_datasets(
            cfg.path,
            subset=cfg.subset,
            split=cfg.split,
            data_files=cfg.data_files,
            streaming=cfg.streaming,
            cache_dir=cfg.cache_dir,
        )
    else:
        path = Path(cfg.path)
        if not path.is_file():
            raise DataError(str(path), None, None, SOURCE, "file not found")
        if fmt == "jsonl":
            it = iter_jsonl(path, policy)
        elif fmt == "json":
            it = iter_json(path, policy)
        else:
            it = iter_parquet(path)
    for n, rec in enumerate(it):
        if cfg.limit is not None and n >= cfg.limit:
            break
        yield rec


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def iter_jsonl(path: str | os.PathLike, policy: ErrorPolicy) -> Iterator[RawRecord]:
    """One JSON object per line; blank lines are ignored (they hold no record).

    Lines are decoded one by one so that one undecodable line is reported with its
    number instead of failing the whole file.
    """
    path = Path(path)
    where = str(path)
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # UTF-8 byte order mark written by some editors
                if not raw.strip():
                    continue
                rec = _parse_json_line(raw, where, lineno, policy)
                if rec is not None:
                    yield rec
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # e.g. a truncated .gz
        raise DataError(where, lineno + 1, None, SOURCE, f"cannot read file: {e}") from None


def _parse_json_line(raw: bytes, where: str, lineno: int, policy: ErrorPolicy) -> RawRecord | None:
    prov = Provenance(where, lineno)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        policy.handle(
            DataError.at(prov, None, INVALID_UTF8, f"invalid UTF-8 byte 0x{bad} at byte {e.start + 1} of the line")
        )
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        policy.handle(DataError.at(prov, None, MALFORMED_JSON, f"malformed JSON: {e.msg} at column {e.colno}"))
        return None
    if not isinstance(obj, dict):
        policy.handle(
            DataError.at(prov, None, NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
        )
        return None
    return RawRecord(obj, prov)


def iter_json(path: str | os.PathLike, policy: ErrorPolicy) -> Iterator[RawRecord]:
    """A JSON array of objects, or an object whose ``"data"`` key holds that array.

    Provenance lines are 1-based positions in the array. A ``.json`` file that is really
    JSON Lines (common on the hub) is read as JSONL.
    """
    path = Path(path)
    where = str(path)
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        bad = data[e.start : e.start + 1].hex()
        raise DataError(where, line, None, INVALID_UTF8, f"invalid UTF-8 byte 0x{bad}; cannot parse the JSON document") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            yield from iter_jsonl(path, policy)  # several objects: JSON Lines named .json
            return
        raise DataError(where, e.lineno, None, MALFORMED_JSON, f"malformed JSON: {e.msg} at column {e.colno}") from None
    if isinstance(doc, dict):
        if "data" not in doc:
            raise DataError(where, None, "data", SOURCE, "a JSON object file must hold its records in a 'data' array")
        doc = doc["data"]
        if not isinstance(doc, list):
            raise DataError(where, None, "data", SOURCE, f"'data' must be an array, got {type(doc).__name__}")
    elif not isinstance(doc, list):
        raise DataError(where, None, None, SOURCE, f"expected a JSON array of objects, got {type(doc).__name__}")
    for row, obj in enumerate(doc, 1):
        prov = Provenance(where, row)
        if not isinstance(obj, dict):
            policy.handle(
                DataError.at(prov, None, NOT_AN_OBJECT, f"array element {row} is a {type(obj).__name__}, not an object")
            )
            continue
        yield RawRecord(obj, prov)


def iter_parquet(path: str | os.PathLike, batch_size: int = 1024) -> Iterator[RawRecord]:
    """Rows of a Parquet file, read in record batches to bound memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(where, None, None, SOURCE, f"not a readable Parquet file: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        for obj in batch.to_pylist():
            row += 1
            yield RawRecord(obj, Provenance(where, row))


def iter_datasets(
    name: str,
    subset: str | None = None,
    split: str = "train",
    data_files: str | list[str] | dict[str, Any] | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Iterator[RawRecord]:
    """Rows of ``datasets.load_dataset(name, subset, split=split, ...)``.

    ``name`` is a hub dataset (``openai/gsm8k``), a local dataset directory, or a builder
    (``"json"``, ``"parquet"``) with ``data_files``. Provenance is ``name[/subset][split]``
    with the 1-based row number.
    """
    import datasets

    label = name if subset is None else f"{name}/{subset}"
    where = f"{label}[{split}]"
    call = f"datasets.load_dataset({name!r}, {subset!r}, split={split!r})"
    try:
        ds = datasets.load_dataset(
            name, subset, split=split, data_files=data_files, streaming=streaming, cache_dir=cache_dir
        )
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise DataError(where, None, None, SOURCE, f"{call} failed: {type(e).__name__}: {e}") from None
    for row, obj in enumerate(ds, 1):
        yield RawRecord(dict(obj), Provenance(where, row))
