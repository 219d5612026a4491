"""Held-out response NLL and mean token entropy over a file of conversations, at any TP/PP/DP.

The file goes through the same pipeline as training data: a source (``.jsonl``, ``.json``,
``.parquet`` or a hub name), an adapter (gsm8k, math, hh_rlhf, messages, generic), the chat
template and the tokenizer (:func:`psft_megatron.data.encode.iter_tokenized`), so the scored
tokens are exactly the trained ones (the loss mask: assistant content and its end-of-turn).

Per sample: the sum of ``-log p`` of its response tokens under teacher forcing and the sum of
the entropy of the predicted distribution at those positions (the paper's entropy metric),
both from the vocab-parallel logits (:func:`~psft_megatron.loss.token_stats.vocab_parallel_token_stats`,
padding excluded). Reported means are token-weighted: ``nll = sum nll / tokens``.

Samples are split over data-parallel replicas and scored in right-padded batches; rank 0
(the driver) reads the file and collects the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from megatron.core import parallel_state as ps

from psft_megatron.data.config import DataSourceConfig
from psft_megatron.data.encode import iter_tokenized
from psft_megatron.data.templates import ChatTemplate
from psft_megatron.data.tokenizer import Tokenizer
from psft_megatron.data.types import SkipReport
from psft_megatron.evaluation.driver import Driver
from psft_megatron.evaluation.scoring import batch_groups, dp_share, holds_results, length_multiple
from psft_megatron.evaluation.session import ScoringModel
from psft_megatron.loss.token_stats import vocab_parallel_token_stats
from psft_megatron.model.forward import pipeline_forward

__all__ = [
    "HeldoutSample",
    "TOKEN_STATS",
    "heldout_scores",
    "labelled_groups",
    "read_heldout",
    "replica_token_stats",
    "summarize",
    "token_stats_handler",
    "write_rows",
]

TOKEN_STATS = "token_stats"


@dataclass
class HeldoutSample:
    ids: list[int]
    loss_mask: list[int]  # 1 on response tokens (predicted from the previous position)
    source: str  # file:line


def read_heldout(source: DataSourceConfig, tokenizer: Tokenizer, template: ChatTemplate) -> tuple[list[HeldoutSample], SkipReport]:
    """Tokenised samples of ``source`` (rank 0), and what was skipped (length drops, ``on_error: skip``)."""
    report = SkipReport()
    samples = [
        HeldoutSample(s.input_ids.tolist(), s.loss_mask.tolist(), str(s.provenance))
        for s in iter_tokenized(source, tokenizer, template, report)
    ]
    return samples, report


def labelled_groups(samples: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                    multiple: int) -> list[Any]:
    """:func:`batch_groups` of ``(ids, loss_mask)`` samples with ``labels`` (next token) and ``mask``
    (the label is a response token) added to each micro-batch, both ``[b, s]``."""
    seqs = [ids for ids, _ in samples]
    order = sorted(range(len(samples)), key=lambda i: -len(seqs[i]))
    groups = batch_groups(seqs, order, batch_size, ps.get_pipeline_model_parallel_world_size(), pad_id, multiple)
    for group in groups:
        for k, mb in enumerate(group.microbatches):
            labels = torch.full_like(mb["input_ids"], pad_id)
            mask = torch.zeros(mb["input_ids"].shape, dtype=torch.bool)
            for r, i in enumerate(mb["rows"].tolist()):
                if i < 0:
                    continue
                ids, loss_mask = samples[i]
                n = len(ids) - 1  # position t predicts token t + 1
                labels[r, :n] = torch.tensor(ids[1:])
                mask[r, :n] = torch.tensor(loss_mask[1:], dtype=torch.bool)
            mb.update(labels=labels, mask=mask, mb=torch.tensor(k))
    return groups


def replica_token_stats(model: ScoringModel, samples: Sequence[tuple[list[int], list[int]]], batch_size: int,
                        pad_id: int) -> list[tuple[int, float, float, int]]:
    """``(index, nll_sum, entropy_sum, tokens)`` for this data-parallel replica's share of ``(ids, loss_mask)``
    samples, on the rank that holds its results (:func:`holds_results`; [] elsewhere).

    Collective over every rank of the job: each passes the same samples.
    """

    def on_last_stage(logits: torch.Tensor, mb: dict[str, torch.Tensor]) -> list[tuple[int, float, float, int]]:
        labels, mask = mb["labels"].to(logits.device), mb["mask"].to(logits.device)
        st = vocab_parallel_token_stats(logits, labels, vocab_size=model.vocab_size, with_entropy=True)
        nll = -(st.logp.double() * mask).sum(1)
        ent = (st.entropy.double() * mask).sum(1)
        n = mask.sum(1)
        rows = mb["rows"].tolist()
        return [(rows[r], float(nll[r]), float(ent[r]), int(n[r])) for r in range(len(rows)) if rows[r] >= 0]

    mine = dp_share(len(samples))
    local = [samples[i] for i in mine]
    out: list[tuple[int, float, float, int]] = []
    for group in labelled_groups(local, batch_size, pad_id, length_multiple(model)):
        for part in pipeline_forward(model.chunks, group.microbatches, on_last_stage):
            out.extend(part)
    return [(mine[i], nll, ent, n) for i, nll, ent, n in out] if holds_results() else []


def token_stats_handler(model: ScoringModel, batch_size: int, pad_id: int) -> Callable[[Any], Any]:
    """The driver command: :func:`replica_token_stats` of the samples it is sent."""

    def handle(samples: Sequence[tuple[list[int], list[int]]]) -> list[tuple[int, float, float, int]]:
        return replica_token_stats(model, samples, batch_size, pad_id)

    return handle


def heldout_scores(driver: Driver, samples: Sequence[HeldoutSample]) -> list[dict[str, Any]]:
    """Per sample ``{"index", "source", "nll", "entropy", "num_tokens"}`` (means over its response tokens; rank 0)."""
    payload = [(s.ids, s.loss_mask) for s in samples]
    by_index: dict[int, tuple[float, float, int]] = {}
    for part in driver.call(TOKEN_STATS, payload):
        for i, nll, ent, n in part:
            by_index[i] = (nll, ent, n)
    rows = []
    for i, s in enumerate(samples):
        nll, ent, n = by_index[i]
        rows.append({"index": i, "source": s.source, "nll": nll / n if n else None,
                     "entropy": ent / n if n else None, "num_tokens": n, "_sums": (nll, ent)})
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Token-weighted means over all samples: ``{"nll", "entropy", "tokens", "samples"}``."""
    tokens = sum(r["num_tokens"] for r in rows)
    nll = sum(r["_sums"][0] for r in rows)
    ent = sum(r["_sums"][1] for r in rows)
    return {"nll": nll / tokens if tokens else None, "entropy": ent / tokens if tokens else None,
            "tokens": tokens, "samples": len(rows)}


def write_rows(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """One JSON line per sample, in input order (written atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
    tmp.replace(path)
