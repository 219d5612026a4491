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

import torch.distributed as dist

from psft_megatron.checkpoint.model_checkpoint import TOKENIZER_SUBDIR, read_meta
from psft_megatron.data.errors import SOURCE, DataError
from psft_megatron.data.tokenizer import load_tokenizer
from psft_megatron.evaluation.heldout import replica_token_stats
from psft_megatron.evaluation.session import ScoringModel, load_scoring_model
from psft_megatron.runtime.config import ParallelConfig
from psft_megatron.runtime.distributed import init_model_parallel, set_seed

log = logging.getLogger(__name__)

__all__ = ["Example", "encode_examples", "response_mask", "score_examples", "score_file"]


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


def response_mask(example: Example) -> list[int]:
    """1 on the example's response tokens (after its prompt), 0 on the prompt: a held-out loss mask."""
    return [int(i >= example.prompt_len) for i in range(len(example.ids))]


def score_examples(
    model: ScoringModel, examples: list[Example], *, batch_size: int = 8, pad_id: int = 0
) -> list[tuple[int, float | None, int]]:
    """``(index into examples, mean response NLL, response tokens)`` for this data-parallel replica's
    share, on the rank that holds its results; [] elsewhere.

    Collective over every rank of the job: each passes the same examples. An example with no
    response token scores None.
    """
    samples = [(e.ids, response_mask(e)) for e in examples]
    return [(i, nll / n if n else None, n)
            for i, nll, _, n in replica_token_stats(model, samples, batch_size, pad_id)]


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
    parallel = parallel or ParallelConfig()
    meta = read_meta(ckpt_dir)
    tok_path = tokenizer_path or Path(ckpt_dir) / TOKENIZER_SUBDIR
    if not Path(tok_path).exists() and meta.get("tokenizer"):
        tok_path = meta["tokenizer"]
    tokenizer = load_tokenizer(tok_path)
    records = _read_jsonl(data_path)  # before the model is built: a bad file fails in a second

    init_model_parallel(parallel)
    set_seed(0)
    model = load_scoring_model(ckpt_dir, parallel, params_dtype=params_dtype)
    examples = encode_examples(
        records, tokenizer, prompt_key=prompt_key, response_key=response_key, add_bos=add_bos, max_length=max_length
    )
    scores = score_examples(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_id)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, scores)
    if dist.get_rank() != 0:
        return None
    by_index = {i: (nll, n) for part in gathered for i, nll, n in part}
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
