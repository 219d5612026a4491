"""Glue between the ingest half (sources -> TokenizedSample) and the token cache.

:func:`prepare_dataset` is what both ``tools/prepare_data.py`` (ahead of a run)
and the trainer (on every rank at start-up) call: the writer rank tokenises the
sources into the cache once, every other rank waits and maps it.

The cache identity names everything that changes the tokens: each source's
sample-affecting settings (``DataSourceConfig.fingerprint``) and, for local
files, their size and modification time; the tokenizer's fingerprint and pad
id; the chat template's fingerprint. It deliberately avoids hashing source
bytes, so waiting ranks can compute it instantly from file metadata.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from psft_megatron.data.cache import CachedSamples, prepare_cache
from psft_megatron.data.config import DataSourceConfig
from psft_megatron.data.encode import iter_tokenized
from psft_megatron.data.errors import SOURCE, DataError
from psft_megatron.data.templates import ChatTemplate, load_template
from psft_megatron.data.tokenizer import Tokenizer, load_tokenizer
from psft_megatron.data.types import SkipReport, TokenizedSample


def source_identity(cfg: DataSourceConfig) -> dict[str, Any]:
    """Settings fingerprint plus, for a local file or directory, size and mtime of its files.

    Local paths are resolved first, so ranks or tools started from another working
    directory compute the same identity.
    """
    p = Path(cfg.path)
    if p.exists():
        cfg = replace(cfg, path=str(p.resolve()))
    ident: dict[str, Any] = {"path": cfg.path, "settings": cfg.fingerprint()}
    if p.is_file():
        st = p.stat()
        ident["files"] = [[p.name, st.st_size, st.st_mtime_ns]]
    elif p.is_dir():
        ident["files"] = [
            [str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(p.rglob("*")) if f.is_file()
        ]
    return ident


def cache_identity(sources: Sequence[DataSourceConfig], tokenizer: Tokenizer, template: ChatTemplate) -> dict[str, Any]:
    """The identity a cache of ``sources`` tokenised with ``tokenizer``/``template`` is stored under.

    The tokenizer is identified by its content fingerprint and pad id, not by the
    path it was loaded from.
    """
    return {
        "sources": [source_identity(s) for s in sources],
        "tokenizer": {"fingerprint": tokenizer.fingerprint(), "pad_id": int(tokenizer.pad_id)},
        "template": template.fingerprint(),
    }


def iter_sources(
    sources: Sequence[DataSourceConfig], tokenizer: Tokenizer, template: ChatTemplate, report: SkipReport,
    counts: list[int] | None = None,
) -> Iterator[TokenizedSample]:
    """Samples of every source, in the given order, skips counted in ``report``; ``counts`` (when
    given) gets the number of samples of each source as it is exhausted."""
    for cfg in sources:
        n = 0
        for sample in iter_tokenized(cfg, tokenizer, template, report):
            n += 1
            yield sample
        if counts is not None:
            counts.append(n)


def _not_empty(
    samples: Iterator[TokenizedSample], sources: Sequence[DataSourceConfig], report: SkipReport
) -> Iterator[TokenizedSample]:
    """``samples``, raising a :class:`DataError` naming the sources when there are none: a cache
    of no samples would only fail later, far from its cause (an empty file, or every sample dropped)."""
    n = 0
    for s in samples:
        n += 1
        yield s
    if n == 0:
        why = f"every sample was dropped: {report.summary()}" if report.total else "no records in it (an empty file?)"
        raise DataError(", ".join(s.path for s in sources), None, None, SOURCE, f"no samples to cache, {why}")


def prepare_dataset(
    cache_dir: str | os.PathLike[str],
    sources: Sequence[DataSourceConfig],
    tokenizer: str | Path | Tokenizer,
    template: str | None = None,
    *,
    is_writer: bool,
    pad: str | int | None = None,
    template_vars: dict[str, Any] | None = None,
    rebuild_stale: bool = False,
    timeout: float = 3600.0,
) -> CachedSamples:
    """Build (writer) or wait for (others) the token cache of ``sources``, and map it.

    ``template``: as :func:`psft_megatron.data.templates.load_template` (None = the
    tokenizer's own). Use ``is_writer = (global rank == 0)`` on a shared filesystem,
    ``local_rank == 0`` with node-local cache directories. The loader's ``pad_id``
    should be ``cached.manifest.identity["tokenizer"]["pad_id"]``. Sources that yield no
    sample at all raise :class:`~psft_megatron.data.errors.DataError` and no cache is written.
    """
    if not sources:
        raise ValueError("prepare_dataset needs at least one data source")
    tok = load_tokenizer(tokenizer, pad=pad) if isinstance(tokenizer, (str, Path)) else tokenizer
    tpl = load_template(template, tok, template_vars)
    identity = cache_identity(sources, tok, tpl)
    counts: list[int] = []  # samples per source, for weighted mixtures and per-source token counts

    def make() -> tuple[Iterator[TokenizedSample], SkipReport]:
        report = SkipReport()
        counts.clear()
        return _not_empty(iter_sources(sources, tok, tpl, report, counts), sources, report), report

    info = {"tokenizer": str(tok.name), "template": getattr(tpl, "name", None), "sources": [s.path for s in sources]}
    return prepare_cache(
        cache_dir, identity, make, is_writer=is_writer, rebuild_stale=rebuild_stale, timeout=timeout, info=info,
        source_samples=counts, num_sources=len(sources),
    )
