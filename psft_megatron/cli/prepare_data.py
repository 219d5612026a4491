"""Tokenise data sources into a token cache ahead of a run, so no training rank has to.

    psft-prepare-data --tokenizer PATH --out CACHE_DIR \
        (--source source.yaml | --path data.jsonl --adapter gsm8k) [--max-length N] [--template chatml]
    python tools/prepare_data.py ...        (the same, by path)

``source.yaml`` holds one source mapping (``DataSourceConfig`` keys), a list of
them, or ``{"sources": [...]}``; JSON works too. The run then points its data
config at ``CACHE_DIR`` with the same sources/tokenizer/template: a mismatch is
reported as a stale cache, not silently used. Prints the manifest summary.

Exit status: 0 done; 2 bad input or output (a missing or malformed source or source
file, a bad record under on_error: raise, sources that leave no sample, a missing
tokenizer, an unwritable or stale --out): one "error: ..." line on stderr names the file
(and line, field) and what to change, no traceback; 2 also for bad usage (argparse prints
the usage first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from psft_megatron.cli.shell import run_command
from psft_megatron.errors import UserError

__all__ = ["SourceFileError", "load_sources", "main", "parser"]


class SourceFileError(UserError, ValueError):
    """A bad ``--source`` file or source option; the message names the file and the source."""


def load_sources(args: argparse.Namespace) -> list:  # -> list[DataSourceConfig]
    """Sources from ``--source`` (YAML/JSON file) or the inline ``--path`` options.

    Raises :class:`SourceFileError` naming the ``--source`` file (and source) for anything wrong in it.
    """
    import yaml

    from psft_megatron.data.config import DataSourceConfig

    if args.source:
        try:
            text = Path(args.source).read_text()
        except OSError as e:
            raise SourceFileError(f"cannot read --source {args.source}: {e.strerror}") from None
        try:
            data: Any = json.loads(text) if args.source.endswith(".json") else yaml.safe_load(text)
        except json.JSONDecodeError as e:
            raise SourceFileError(f"{args.source} is not valid JSON: {e}") from None
        except yaml.YAMLError as e:
            raise SourceFileError(f"{args.source} is not valid YAML: {' '.join(str(e).split())}") from None
        if isinstance(data, dict) and "sources" in data:
            data = data["sources"]
        items = data if isinstance(data, list) else [data]
        if not items:
            raise SourceFileError(f"{args.source} lists no sources")
    else:
        items = [{"path": args.path, "adapter": args.adapter}]
    sources = []
    for i, d in enumerate(items):
        if not isinstance(d, dict):
            raise SourceFileError(f"{args.source}: source {i} must be a mapping (path, adapter, ...), got {type(d).__name__}")
        d = dict(d)
        if args.max_length is not None:
            d["max_length"] = args.max_length
        if args.on_error is not None:
            d["on_error"] = args.on_error
        try:
            sources.append(DataSourceConfig.from_dict(d))
        except ValueError as e:  # ConfigError, or a value __post_init__ rejects
            raise SourceFileError(f"{args.source}: source {i}: {e}" if args.source else f"bad option: {e}") from None
    return sources


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="YAML/JSON file with one source, a list, or {sources: [...]}")
    ap.add_argument("--path", help="a single source path (instead of --source)")
    ap.add_argument("--adapter", default="generic", help="adapter for --path (gsm8k, math, hh_rlhf, messages, generic)")
    ap.add_argument("--tokenizer", required=True, help="tokenizer directory, tokenizer.json, .model, or hub name")
    ap.add_argument("--template", default=None, help="chat template: tokenizer's own (default), chatml, llama3, llama2, plain, or a .jinja file")
    ap.add_argument("--pad", default=None, help="pad token (default: tokenizer's pad, else EOS)")
    ap.add_argument("--max-length", type=int, default=None, help="override every source's max_length (must be <= the run's seq_length)")
    ap.add_argument("--on-error", choices=["raise", "skip"], default=None, help="override every source's on_error")
    ap.add_argument("--out", required=True, help="cache directory to create")
    ap.add_argument("--rebuild-stale", action="store_true", help="replace a cache built from different sources/tokenizer")
    return ap


def prepare(args: argparse.Namespace) -> int:
    from psft_megatron.data.prepare import prepare_dataset

    t = time.perf_counter()
    sources = load_sources(args)
    cache = prepare_dataset(
        args.out, sources, args.tokenizer, args.template, is_writer=True, pad=args.pad, rebuild_stale=args.rebuild_stale
    )
    m = cache.manifest
    skipped = m.skip_report.get("total", 0)
    print(
        f"{args.out}: {m.n_samples} samples, {m.n_tokens} tokens ({m.n_loss_tokens} trained), "
        f"max length {m.max_length}, {skipped} skipped, fingerprint {m.content_fingerprint[:16]} "
        f"[{time.perf_counter() - t:.1f}s]"
    )
    if skipped:
        print("skip report:", json.dumps(m.skip_report["counts"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``psft-prepare-data``: the exit status (see the module docstring)."""
    ap = parser()
    args = ap.parse_args(argv)
    if not (args.source or args.path):
        ap.error("give --source FILE or --path DATA (with --adapter)")
    # DataError names the file, line and field; CacheError the cache directory; OSError an unwritable --out.
    return run_command(lambda: prepare(args), user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
