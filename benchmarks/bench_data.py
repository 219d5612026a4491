"""Data pipeline throughput on real data, as ratios against a plain ``datasets.map`` tokenisation.

    python benchmarks/bench_data.py            # GSM8K train + SmolLM2 tokenizer from ../shared

Measures, each as the median of ``--repeats`` runs, in samples/s:

* ``datasets.map``: ``Dataset.from_list(records).map(tokenise, batched=True)`` with the
  same ChatML tokenisation, no packing, no cache (the usual "plain" pipeline);
* ``ingest only``: our ingest API (``iter_tokenized``: source -> gsm8k adapter ->
  the tokenizer's Jinja ChatML template -> ids + loss mask), just iterated;
* ``tokenise+pack``: :func:`prepare_dataset` (ingest into a fresh cache), then a
  :class:`PackedLoader` over the cache materialising every micro-batch of one epoch;
* ``cached load``: what every rank does when the cache exists: map it, plan the
  packing and materialise one epoch of micro-batches.

Prints a table and a JSON line; docs/benchmarks.md ("## Data") records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from psft_megatron.data.cache import open_cache
from psft_megatron.data.config import DataSourceConfig
from psft_megatron.data.encode import iter_tokenized
from psft_megatron.data.loader import LoaderConfig, PackedLoader
from psft_megatron.data.packing import packing_efficiency
from psft_megatron.data.prepare import prepare_dataset
from psft_megatron.data.templates import load_template
from psft_megatron.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml_parts(question: str, answer: str) -> tuple[str, str]:
    """Prompt text (not trained) and response text (trained) in SmolLM2's ChatML layout."""
    prompt = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    return prompt, f"{answer}<|im_end|>"


def load_records(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def make_direct_tokenise(tokenizer_dir: Path) -> Callable[[list[dict[str, Any]]], list[tuple[list[int], list[int]]]]:
    """Batch ChatML tokenisation with the ``tokenizers`` library (both pipelines' primitive)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

    def tokenise(batch: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
        parts = [chatml_parts(r["question"], r["answer"]) for r in batch]
        prompts = tok.encode_batch([p for p, _ in parts], add_special_tokens=False)
        responses = tok.encode_batch([a for _, a in parts], add_special_tokens=False)
        return [(p.ids, a.ids) for p, a in zip(prompts, responses)]

    return tokenise


def baseline_datasets_map(records: list[dict[str, Any]], tokenise: Callable) -> int:
    """The plain pipeline: datasets.map producing input_ids + loss_mask per sample."""
    import datasets

    datasets.disable_progress_bars()

    def fn(batch: dict[str, list]) -> dict[str, list]:
        rows = [{"question": q, "answer": a} for q, a in zip(batch["question"], batch["answer"])]
        out = tokenise(rows)
        return {
            "input_ids": [p + a for p, a in out],
            "loss_mask": [[0] * len(p) + [1] * len(a) for p, a in out],
        }

    ds = datasets.Dataset.from_list(records).map(fn, batched=True, remove_columns=["question", "answer"])
    return len(ds)


def consume_epoch(cache_dir: Path, cfg: LoaderConfig) -> tuple[int, PackedLoader]:
    """Map the cache, plan, and build every micro-batch of one epoch; returns samples yielded."""
    store = open_cache(cache_dir)
    loader = PackedLoader(store, cfg, 0, 1)
    n = 0
    for _ in range(loader.steps_per_epoch):
        gb = next(loader)
        for mini in gb.mini_batches:
            for mb in mini.micro_batches:
                n += sum(len(r) for r in mb.sample_ids)
    return n, loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/gsm8k/train.jsonl")
    ap.add_argument("--tokenizer", type=Path, default=ROOT.parent / "shared/tokenizers/smollm2")
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--global-batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    records = load_records(args.data)
    n = len(records)
    tokenise = make_direct_tokenise(args.tokenizer)
    source = DataSourceConfig(path=str(args.data), adapter="gsm8k", max_length=args.seq_length)
    tok = load_tokenizer(args.tokenizer)
    template = load_template(None, tok)
    cfg = LoaderConfig(
        seq_length=args.seq_length, global_batch_size=args.global_batch_size, mini_batch_size=args.global_batch_size // 4,
        micro_batch_size=4, seed=0, pad_id=tok.pad_id,
    )
    tmp = Path(tempfile.mkdtemp(prefix="psft_bench_data_"))
    try:

        def tokenise_and_pack() -> tuple[int, PackedLoader]:
            shutil.rmtree(tmp / "cache", ignore_errors=True)
            prepare_dataset(tmp / "cache", [source], tok, None, is_writer=True)
            return consume_epoch(tmp / "cache", cfg)

        stages: dict[str, Callable[[], Any]] = {
            "map": lambda: baseline_datasets_map(records, tokenise),
            "ingest": lambda: sum(1 for _ in iter_tokenized(source, tok, template)),
            "tokenise_pack": tokenise_and_pack,
            "cached": lambda: consume_epoch(tmp / "cache", cfg),
        }
        # Round-robin repeats, so drift in the (shared) machine's load hits every stage alike.
        times: dict[str, list[float]] = {k: [] for k in stages}
        results: dict[str, Any] = {}
        for _ in range(args.repeats):
            for k, fn in stages.items():
                t = time.perf_counter()
                results[k] = fn()
                times[k].append(time.perf_counter() - t)
        t_map, t_tok, t_tp, t_cached = (statistics.median(times[k]) for k in stages)
        assert results["map"] == n and results["ingest"] == n
        _, loader = results["tokenise_pack"]
        n_cached = results["cached"][0]
        lengths = np.asarray(loader.store.lengths)
        rows = [loader.row_samples(r) for r in range(loader.num_rows)]
        eff = packing_efficiency(rows, lengths, cfg.seq_length)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    res = {
        "records": n,
        "tokens": int(lengths.sum()),
        "rows": loader.num_rows,
        "packing_efficiency": round(eff, 4),
        "seq_length": cfg.seq_length,
        "datasets_map_samples_per_s": round(n / t_map, 1),
        "ingest_only_samples_per_s": round(n / t_tok, 1),
        "tokenise_pack_samples_per_s": round(n / t_tp, 1),
        "cached_load_samples_per_s": round(n_cached / t_cached, 1),
        "ratio_tokenise_pack_vs_map": round(t_map / t_tp, 2),
        "ratio_cached_load_vs_map": round((n_cached / t_cached) / (n / t_map), 2),
        "samples_per_epoch_yielded": n_cached,
        "pack_cache_overhead_s": round(t_tp - t_tok, 3),
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}",
    }
    w = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{w}}  {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
