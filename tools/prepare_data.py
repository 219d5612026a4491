"""Tokenise data sources into a token cache ahead of a run, so no training rank has to.

    python tools/prepare_data.py --tokenizer PATH --out CACHE_DIR \
        (--source source.yaml | --path data.jsonl --adapter gsm8k) [--max-length N] [--template chatml]

``source.yaml`` holds one source mapping (``DataSourceConfig`` keys), a list of
them, or ``{"sources": [...]}``; JSON works too. The run then points its data
config at ``CACHE_DIR`` with the same sources/tokenizer/template: a mismatch is
reported as a stale cache, not silently used. Prints the manifest summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psft_megatron.data.cache import CacheError  # noqa: E402
from psft_megatron.data.config import DataSourceConfig  # noqa: E402
from psft_megatron.data.prepare import prepare_dataset  # noqa: E402


def load_sources(args: argparse.Namespace) -> list[DataSourceConfig]:
    """Sources from ``--source`` (YAML/JSON file) or the inline ``--path`` options."""
    if args.source:
        text = Path(args.source).read_text()
        if args.source.endswith(".json"):
            data: Any = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
        if isinstance(data, dict) and "sources" in data:
            data = data["sources"]
        items = data if isinstance(data, list) else [data]
    elif args.path:
        items = [{"path": args.path, "adapter": args.adapter}]
    else:
        raise SystemExit("give --source FILE or --path DATA (with --adapter)")
    sources = []
    for d in items:
        d = dict(d)
        if args.max_length is not None:
            d["max_length"] = args.max_length
        if args.on_error is not None:
            d["on_error"] = args.on_error
        sources.append(DataSourceConfig.from_dict(d))
    return sources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    args = ap.parse_args(argv)

    sources = load_sources(args)
    t = time.perf_counter()
    try:
        cache = prepare_dataset(
            args.out, sources, args.tokenizer, args.template, is_writer=True, pad=args.pad, rebuild_stale=args.rebuild_stale
        )
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
