"""Per-example mean NLL of response tokens under a model checkpoint, at any TP/PP/DP (tools/score.py).

Each JSONL record's ``prompt`` and ``response`` are tokenized separately (no special
tokens added; ``add_bos`` prepends BOS) and concatenated; the score is the mean of
``-log p(response token | everything before it)`` under teacher forcing, computed
from vocab-parallel logits with the vocabulary padding masked out. Data-parallel
replicas score disjoint examples; rank 0 writes one JSONL line per input record,
in input order: ``{"index", "nll", "num_tokens", "truncated"}`` (+ ``"id"`` if present).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from psft_megatron.checkpoint import model_checkpoint as layout
from psft_megatron.data.errors import SOURCE, DataError
from psft_megatron.data.tokenizer import load_tokenizer
from psft_megatron.loss.token_stats import vocab_parallel_token_stats
from psft_megatron.model.build import build_model
from psft_megatron.model.forward import pipeline_forward
from psft_megatron.runtime.config import ParallelConfig
from psft_megatron.runtime.distributed import init_model_parallel, set_seed

log = logging.getLogger(__name__)

__all__ = ["Example", "encode_examples", "score_examples", "score_file"]


@dataclasses.dataclass
class Example:
    ids: list[int]
    prompt_len: int
    truncated: bool = False


def encode_examples(
    records: list[dict[str, Any]],
    tokenizer: Any,
    *,
    prompt_key: str = "prompt",
    response_key: str = "response",
    add_bos: bool = False,
    max_length: int | None = None,
) -> list[Example]:
    """Tokenize prompt and response separately; truncate the response to ``max_length`` tokens in all."""
    out = []
    for i, rec in enumerate(records):
        if prompt_key not in rec or response_key not in rec:
            raise ValueError(f"record {i} lacks {prompt_key!r} or {response_key!r}: keys {sorted(rec)}")
        prompt = tokenizer.encode(rec[prompt_key])
        if add_bos and tokenizer.bos_id is not None:
            prompt = [tokenizer.bos_id] + prompt
        ids = prompt + tokenizer.encode(rec[response_key])
        truncated = max_length is not None and len(ids) > max_length
        out.append(Example(ids[:max_length] if truncated else ids, len(prompt), truncated))
    return out


def score_examples(
    chunks: list[Any], examples: list[Example], vocab_size: int, *, batch_size: int = 8, pad_id: int = 0
) -> list[tuple[float | None, int]]:
    """(mean response NLL, response tokens) per example on the last pipeline stage; [] elsewhere.

    Collective over the model-parallel group: every rank of it passes the same examples.
    An example with no response token scores None.
    """
    results: list[tuple[float | None, int]] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        seq = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
        for row, e in enumerate(batch):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
        labels = torch.cat([ids[:, 1:], torch.full((len(batch), 1), pad_id, dtype=torch.long)], dim=1)
        # Position t predicts token t+1: response tokens are t+1 in [prompt_len, len).
        mask = torch.zeros(len(batch), seq, dtype=torch.bool)
        for row, e in enumerate(batch):
            mask[row, max(e.prompt_len - 1, 0) : len(e.ids) - 1] = True

        def nll(logits: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
            labels = mb["labels"].to(logits.device)
            logp = vocab_parallel_token_stats(logits, labels, vocab_size=vocab_size, with_entropy=False).logp
            return -(logp.cpu() * mb["mask"]).sum(1)

        out = pipeline_forward(chunks, [{"input_ids": ids, "labels": labels, "mask": mask}], nll)
        if out:
            sums = out[0]
            for row in range(len(batch)):
                n = int(mask[row].sum())
                results.append((float(sums[row]) / n if n else None, n))
    return results


def _read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The file's records; a missing file or a bad line raises :class:`DataError` naming file:line."""
    if not Path(path).is_file():
        raise DataError(str(path), None, None, SOURCE, "file not found")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(str(path), lineno, None, "malformed_json", f"malformed JSON: {e}") from None
            if not isinstance(rec, dict):
                raise DataError(str(path), lineno, None, "not_an_object", "not a JSON object")
            records.append(rec)
    return records


def score_file(
    ckpt_dir: str | Path,
    data_path: str | Path,
    out_path: str | Path,
    *,
    parallel: ParallelConfig | None = None,
    tokenizer_path: str | Path | None = None,
    prompt_key: str = "prompt",
    response_key: str = "response",
    add_bos: bool = False,
    max_length: int | None = None,
    batch_size: int = 8,
    params_dtype: str = "fp32",
) -> list[dict[str, Any]] | None:
    """Score ``data_path`` under the checkpoint; rank 0 writes ``out_path`` and returns the rows.

    Needs an initialised job (torchrun + ``init_distributed``); sets up the model-parallel
    state for ``parallel`` itself.
    """
    from megatron.core import parallel_state

    parallel = parallel or ParallelConfig()
    meta = layout.read_meta(ckpt_dir)
    cfg = dataclasses.replace(layout.model_config_of(meta), params_dtype=params_dtype)
    tok_path = tokenizer_path or Path(ckpt_dir) / layout.TOKENIZER_SUBDIR
    if not Path(tok_path).exists() and meta.get("tokenizer"):
        tok_path = meta["tokenizer"]
    tokenizer = load_tokenizer(tok_path)
    records = _read_jsonl(data_path)  # before the model is built: a bad file fails in a second

    init_model_parallel(parallel)
    set_seed(0)
    built = build_model(cfg, parallel)
    layout.load_model_checkpoint(built.chunks, ckpt_dir)
    for c in built.chunks:
        c.eval()

    examples = encode_examples(
        records, tokenizer, prompt_key=prompt_key, response_key=response_key, add_bos=add_bos, max_length=max_length
    )
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = list(range(dp_rank, len(examples), dp))
    scores = score_examples(built.chunks, [examples[i] for i in mine], cfg.vocab_size,
                            batch_size=batch_size, pad_id=tokenizer.pad_id)
    contribute = bool(scores) and parallel_state.get_tensor_model_parallel_rank() == 0
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(zip(mine, scores)) if contribute else [])
    if dist.get_rank() != 0:
        return None
    by_index = {i: s for part in gathered for i, s in part}
    rows = []
    for i, rec in enumerate(records):
        nll, n = by_index[i]
        row: dict[str, Any] = {"index": i, "nll": nll, "num_tokens": n, "truncated": examples[i].truncated}
        if "id" in rec:
            row["id"] = rec["id"]
        rows.append(row)
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".partial")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(out_path)
    log.info("scored %d examples -> %s", len(rows), out_path)
    return rows
