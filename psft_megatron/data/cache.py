"""Tokenise once, map everywhere: an on-disk cache of tokenised samples.

Layout of a cache directory (all flat, little-endian, memory-mappable)::

    tokens.bin        int32  [n_tokens]   all samples' input_ids back to back
    loss_mask.bin     uint8  [n_tokens]   matching response masks
    offsets.npy       int64  [n + 1]      sample i is tokens[offsets[i]:offsets[i+1]]
    loss_tokens.npy   int64  [n]          trained label positions per sample (loss_mask[1:].sum())
    manifest.json     identity (tokenizer, source, encode settings), counts (also the
                      samples of each source, stored back to back in source order),
                      skip report, content fingerprint; written last

Writes are atomic: everything goes to a sibling temp directory which is renamed
into place, so a reader either finds no cache or a complete one. One writer
(rank 0, or ``tools/prepare_data.py`` ahead of the run) builds it; every other
rank calls :func:`wait_for_cache` and maps it read-only. No collective is used,
so this works across nodes on a shared filesystem (use ``local_rank == 0`` as the
writer when each node has its own disk).

``identity`` is any JSON-able dict naming what the cache was built from; a cache
whose identity differs is *stale*: it is refused with a message naming the
differing keys, or rebuilt when ``rebuild_stale=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from psft_megatron.data.store import combine_digests, content_fingerprint
from psft_megatron.data.types import SkipReport, TokenizedSample
from psft_megatron.errors import UserError

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
_FLUSH_TOKENS = 1 << 20  # bound the writer's memory: flush every ~1M tokens


class CacheError(UserError, RuntimeError):
    """Base class for cache problems."""


class CacheMissingError(CacheError):
    """No complete cache at the path (yet)."""


class StaleCacheError(CacheError):
    """A cache exists but was built from a different tokenizer/source/settings."""


@dataclass
class CacheManifest:
    """What ``manifest.json`` holds."""

    identity: dict[str, Any]
    identity_hash: str
    n_samples: int
    n_tokens: int
    n_loss_tokens: int
    max_length: int
    content_fingerprint: str
    skip_report: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # for humans (paths as given); not compared
    created_unix: float = 0.0
    format: int = CACHE_FORMAT
    # Samples of each source, in the order the sources were given (empty: a cache written before
    # this was recorded; see source_sample_counts).
    source_samples: list[int] = field(default_factory=list)


def source_sample_counts(m: CacheManifest, num_sources: int) -> list[int] | None:
    """Samples of each of ``num_sources`` sources in a cache, or None when it does not record them
    (a cache of several sources written before they were counted: rebuild it)."""
    if len(m.source_samples) == num_sources:
        return list(m.source_samples)
    if num_sources == 1 and not m.source_samples:
        return [m.n_samples]
    return None


def _usable(m: CacheManifest, want: str, num_sources: int | None) -> bool:
    """``m`` has the wanted identity and, when ``num_sources`` is given, counts them."""
    return m.identity_hash == want and (num_sources is None or source_sample_counts(m, num_sources) is not None)


def identity_hash(identity: dict[str, Any]) -> str:
    """Stable hash of a JSON-able identity dict (key order does not matter)."""
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()


def read_manifest(cache_dir: str | os.PathLike[str]) -> CacheManifest | None:
    """The manifest of a complete cache at ``cache_dir``, or None when there is none."""
    path = Path(cache_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable ({type(e).__name__}: {e}); delete the cache to rebuild it") from None
    return CacheManifest(**data)


def write_cache(
    cache_dir: str | os.PathLike[str],
    samples: Iterable[TokenizedSample],
    identity: dict[str, Any],
    skip_report: SkipReport | None = None,
    *,
    rebuild_stale: bool = False,
    info: dict[str, Any] | None = None,
    source_samples: Sequence[int] | None = None,
    num_sources: int | None = None,
) -> CacheManifest:
    """Stream ``samples`` into a new cache at ``cache_dir`` and publish it atomically.

    ``skip_report`` and ``source_samples`` (samples per source) are read after ``samples`` is
    exhausted, so pass what the ingest iterator fills. If a cache with the same identity already
    exists (built meanwhile by someone else), it is kept and its manifest returned, unless it does
    not count the ``num_sources`` sources (written before they were counted): then it is replaced.
    If one with a different identity exists, raises :class:`StaleCacheError` unless
    ``rebuild_stale``, in which case it is replaced (readers holding maps keep them).
    """
    final = Path(cache_dir)
    want = identity_hash(identity)
    existing = read_manifest(final)
    if existing is not None:
        if _usable(existing, want, num_sources):
            return existing
        if existing.identity_hash != want and not rebuild_stale:
            raise StaleCacheError(_stale_message(final, existing.identity, identity))

    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # read-only or missing permission: one line naming the cache, not a traceback
        raise CacheError(f"cannot write the cache {final}: {_unwritable(final, tmp, e)}") from None
    try:
        manifest = _write_arrays(tmp, samples, identity, want, skip_report, info or {}, source_samples)
        _publish(tmp, final, want, rebuild_stale, num_sources)
    except OSError as e:  # e.g. the disk filled up; the sources' own read errors arrive as DataError
        raise CacheError(f"could not write the cache {final}: {_os_line(e)}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    result = read_manifest(final)
    assert result is not None
    return result if result.identity_hash == want else manifest


def _write_arrays(
    tmp: Path,
    samples: Iterable[TokenizedSample],
    identity: dict[str, Any],
    want: str,
    skip_report: SkipReport | None,
    info: dict[str, Any],
    source_samples: Sequence[int] | None = None,
) -> CacheManifest:
    h_tok, h_mask = hashlib.sha256(), hashlib.sha256()
    lengths: list[int] = []
    loss_tokens: list[int] = []
    buf_ids: list[np.ndarray] = []
    buf_mask: list[np.ndarray] = []
    buffered = 0

    with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "loss_mask.bin", "wb") as fm:

        def flush() -> None:
            if not buf_ids:
                return
            t = np.concatenate(buf_ids).astype("<i4", copy=False).tobytes()
            m = np.concatenate(buf_mask).astype(np.uint8, copy=False).tobytes()
            ft.write(t)
            fm.write(m)
            h_tok.update(t)
            h_mask.update(m)
            buf_ids.clear()
            buf_mask.clear()

        for s in samples:
            ids = np.asarray(s.input_ids, dtype=np.int32)
            mask = np.asarray(s.loss_mask, dtype=np.uint8)
            if ids.shape != mask.shape or ids.ndim != 1:
                raise ValueError(f"sample {len(lengths)}: input_ids {ids.shape} and loss_mask {mask.shape} must be equal 1-D")
            lengths.append(len(ids))
            loss_tokens.append(int(mask[1:].sum()))
            buf_ids.append(ids)
            buf_mask.append(mask)
            buffered += len(ids)
            if buffered >= _FLUSH_TOKENS:
                flush()
                buffered = 0
        flush()
        for f in (ft, fm):
            f.flush()
            os.fsync(f.fileno())

    offsets = np.zeros(len(lengths) + 1, dtype="<i8")
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    _save_npy(tmp / "offsets.npy", offsets)
    _save_npy(tmp / "loss_tokens.npy", np.asarray(loss_tokens, dtype="<i8"))
    h_off = hashlib.sha256(offsets.tobytes()).digest()

    manifest = CacheManifest(
        identity=json.loads(_canonical(identity)),
        identity_hash=want,
        n_samples=len(lengths),
        n_tokens=int(offsets[-1]),
        n_loss_tokens=int(sum(loss_tokens)),
        max_length=max(lengths, default=0),
        content_fingerprint=combine_digests([h_tok.digest(), h_mask.digest(), h_off]),
        skip_report=_skip_dict(skip_report),
        info=json.loads(_canonical(info)),
        created_unix=time.time(),
        source_samples=[int(n) for n in source_samples] if source_samples is not None else [len(lengths)],
    )
    # The manifest is written last inside the temp dir; the rename publishes everything at once.
    with open(tmp / MANIFEST, "w") as f:
        json.dump(asdict(manifest), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    return manifest


def _publish(tmp: Path, final: Path, want: str, rebuild_stale: bool, num_sources: int | None = None) -> None:
    try:
        os.rename(tmp, final)
    except OSError:
        # `final` appeared meanwhile (another writer) or is a stale cache to replace.
        current = read_manifest(final)
        if current is None:
            raise CacheError(f"{final} exists and is not a cache (no {MANIFEST}); refusing to replace it")
        if _usable(current, want, num_sources):
            return  # someone else published the same content first; ours is discarded
        if current.identity_hash != want and not rebuild_stale:
            raise StaleCacheError(_stale_message(final, current.identity, {}))
        old = final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)  # readers briefly see no cache and keep waiting
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)  # open maps stay valid (POSIX unlink semantics)
    _fsync_dir(final.parent)


class CachedSamples:
    """A read-only, memory-mapped :class:`~psft_megatron.data.store.SampleStore` over a cache."""

    def __init__(self, cache_dir: str | os.PathLike[str], manifest: CacheManifest | None = None, verify: bool = False):
        self.path = Path(cache_dir)
        m = manifest or read_manifest(self.path)
        if m is None:
            raise CacheMissingError(f"no complete cache at {self.path} (no {MANIFEST})")
        if m.format != CACHE_FORMAT:
            raise StaleCacheError(f"cache {self.path} has format {m.format}, this code reads {CACHE_FORMAT}; rebuild it")
        self.manifest = m
        self.offsets = np.load(self.path / "offsets.npy", mmap_mode="r")
        self.loss_tokens = np.asarray(np.load(self.path / "loss_tokens.npy"), dtype=np.int64)
        self.tokens = _map(self.path / "tokens.bin", np.int32, m.n_tokens)
        self.loss_mask = _map(self.path / "loss_mask.bin", np.uint8, m.n_tokens)
        self.lengths = np.diff(np.asarray(self.offsets)).astype(np.int64)
        self.fingerprint = m.content_fingerprint
        if len(self.lengths) != m.n_samples:
            raise CacheError(f"cache {self.path}: offsets hold {len(self.lengths)} samples, manifest says {m.n_samples}")
        if verify:
            got = content_fingerprint(self.tokens, self.loss_mask, np.asarray(self.offsets))
            if got != m.content_fingerprint:
                raise CacheError(f"cache {self.path} is corrupt: content fingerprint {got[:12]} != manifest {m.content_fingerprint[:12]}")

    def __len__(self) -> int:
        return len(self.lengths)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tokens[a:b], self.loss_mask[a:b]

    def sample(self, i: int) -> TokenizedSample:
        ids, mask = self.get(i)
        return TokenizedSample(np.array(ids), np.array(mask))


def open_cache(
    cache_dir: str | os.PathLike[str], identity: dict[str, Any] | None = None, verify: bool = False
) -> CachedSamples:
    """Map a complete cache; with ``identity``, refuse one built from something else.

    Raises :class:`CacheMissingError` when absent, :class:`StaleCacheError` on an
    identity mismatch, :class:`CacheError` on a failed ``verify``.
    """
    m = read_manifest(cache_dir)
    if m is None:
        raise CacheMissingError(f"no complete cache at {cache_dir}; run tools/prepare_data.py or let rank 0 build it")
    if identity is not None and m.identity_hash != identity_hash(identity):
        raise StaleCacheError(_stale_message(Path(cache_dir), m.identity, identity))
    return CachedSamples(cache_dir, m, verify=verify)


def wait_for_cache(
    cache_dir: str | os.PathLike[str],
    identity: dict[str, Any] | None = None,
    *,
    timeout: float = 3600.0,
    poll: float = 1.0,
    accept_stale_while_waiting: bool = False,
) -> CachedSamples:
    """Poll until a complete cache (with ``identity``) appears, then map it.

    A stale cache raises at once, unless ``accept_stale_while_waiting`` (set when
    the writer was told to rebuild stale caches), in which case waiting goes on
    until the rebuilt one is published. Raises :class:`CacheMissingError` after
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_cache(cache_dir, identity)
        except CacheMissingError:
            pass
        except StaleCacheError:
            if not accept_stale_while_waiting:
                raise
        if time.monotonic() > deadline:
            raise CacheMissingError(f"timed out after {timeout:.0f}s waiting for the cache at {cache_dir} to be written")
        time.sleep(poll)


def prepare_cache(
    cache_dir: str | os.PathLike[str],
    identity: dict[str, Any],
    make_samples: Callable[[], tuple[Iterable[TokenizedSample], SkipReport | None]],
    *,
    is_writer: bool,
    rebuild_stale: bool = False,
    timeout: float = 3600.0,
    info: dict[str, Any] | None = None,
    source_samples: Sequence[int] | None = None,
    num_sources: int | None = None,
) -> CachedSamples:
    """The per-rank entry point: the writer builds the cache if needed, everyone maps it.

    ``make_samples`` is called only on the writer and only when no valid cache
    exists; it returns the sample iterator and the skip report it fills, and fills
    ``source_samples`` (samples per source) when given. ``info`` is stored in the
    manifest for people reading it and never compared. With ``num_sources``, a cache of
    the same identity that does not count its sources is rebuilt by the writer.
    """
    if is_writer:
        m = read_manifest(cache_dir)
        if m is None or not _usable(m, identity_hash(identity), num_sources):
            samples, report = make_samples()
            write_cache(cache_dir, samples, identity, report, rebuild_stale=rebuild_stale, info=info,
                        source_samples=source_samples, num_sources=num_sources)
        return open_cache(cache_dir, identity)
    return wait_for_cache(cache_dir, identity, timeout=timeout, accept_stale_while_waiting=rebuild_stale)


def _stale_message(path: Path, have: dict[str, Any], want: dict[str, Any]) -> str:
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k)) if want else []
    detail = "; ".join(f"{k}: cache has {have.get(k)!r}, run wants {want.get(k)!r}" for k in keys)
    return (
        f"stale cache at {path}: it was built from a different tokenizer/source/settings"
        + (f" ({detail})" if detail else "")
        + ". Delete it, point the run at a new cache directory, or rebuild with --rebuild-stale / rebuild_stale=True."
    )


def _os_line(e: OSError) -> str:
    return " ".join(str(e).split())


def _unwritable(final: Path, tmp: Path, e: OSError) -> str:
    """Why the cache's folder could not be made, naming a folder the user knows (not the temp name)."""
    probe = final.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    where = final.parent if e.filename == str(tmp) else e.filename
    return f"[Errno {e.errno}] {e.strerror}: '{where}'"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _skip_dict(report: SkipReport | None) -> dict[str, Any]:
    if report is None:
        return {}
    return {"total": report.total, "counts": dict(report.counts), "examples": {k: list(v) for k, v in report.examples.items()}}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())


def _map(path: Path, dtype: Any, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=dtype)
    size = path.stat().st_size
    if size != n * np.dtype(dtype).itemsize:
        raise CacheError(f"{path} has {size} bytes, expected {n} x {np.dtype(dtype).itemsize}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
