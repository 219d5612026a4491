"""The Megatron log-likelihood backend: rows of token ids -> (sum log p(targets), all greedy).

A *row* is ``(input_ids, [target_ids, ...])``: the model reads ``input_ids`` and every target
list is scored on the LAST ``len(target)`` predictions of the row (position t predicts token
t+1). Several one-token continuations that share their input (MMLU's " A"/" B"/" C"/" D")
are one row with several targets, as HFLM's logits cache does, so they cost one forward.

Per row and target: the sum of the targets' log-probs (from the vocab-parallel logits with
:func:`~psft_megatron.loss.token_stats.vocab_parallel_token_stats`, the vocabulary padding
left out) and whether every target token is the argmax
(:func:`~psft_megatron.loss.argmax.vocab_parallel_argmax`, ties to the lowest id as
``torch.argmax``). Only the scored positions go through the softmax.

Layout: the rows of one command are split over the data-parallel replicas
(``rows[dp_rank::dp]``); each replica runs right-padded batches of ``batch_size`` rows through
:func:`~psft_megatron.model.forward.pipeline_forward` (``PP`` batches at a time, so the
pipeline fills); the last stage's tensor-parallel rank 0 returns its results to rank 0
through the :class:`~psft_megatron.evaluation.driver.Driver`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from megatron.core import parallel_state as ps

from psft_megatron.evaluation.driver import Driver
from psft_megatron.evaluation.session import ScoringModel
from psft_megatron.loss.argmax import vocab_parallel_argmax
from psft_megatron.loss.token_stats import vocab_parallel_token_stats
from psft_megatron.model.build import unwrap_model
from psft_megatron.model.forward import pipeline_forward

log = logging.getLogger(__name__)

__all__ = [
    "LOGLIK",
    "MegatronScorer",
    "Row",
    "batch_groups",
    "dp_share",
    "holds_results",
    "length_multiple",
    "loglik_handler",
    "score_rows",
]

Row = tuple[list[int], list[list[int]]]
LOGLIK = "loglik"


def dp_share(n: int) -> list[int]:
    """Indices of ``n`` items this data-parallel replica handles (strided, so lengths stay balanced)."""
    return list(range(ps.get_data_parallel_rank(), n, ps.get_data_parallel_world_size()))


def holds_results() -> bool:
    """True on the rank that returns its replica's results: last pipeline stage, tensor-parallel rank 0."""
    return ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0


def length_multiple(model: ScoringModel) -> int:
    # Under sequence parallelism every activation is split along the sequence over TP.
    cfg = unwrap_model(model.chunks[0]).config
    return ps.get_tensor_model_parallel_world_size() if getattr(cfg, "sequence_parallel", False) else 1


@dataclass
class Group:
    """Micro-batches run by one pipeline_forward call (same [b, s] each)."""

    microbatches: list[dict[str, torch.Tensor]]  # input_ids [b, s]; rows [b]: item index or -1 for filler


def batch_groups(seqs: Sequence[Sequence[int]], order: Sequence[int], batch_size: int, per_group: int,
                 pad_id: int, multiple: int = 1, fill: bool = False) -> list[Group]:
    """Right-padded micro-batches of the items ``order`` (indices into ``seqs``), ``per_group`` per call.

    Items are taken in ``order`` (longest first keeps padding small). Within a group every
    micro-batch has ``batch_size`` rows (filler rows: index -1) and the group's longest length,
    rounded up to ``multiple``. ``fill``: every group holds exactly ``per_group`` micro-batches
    (the last one topped up with filler micro-batches), as the interleaved pipeline schedule needs.
    """
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    groups = []
    for g in range(0, len(batches), per_group):
        part = batches[g : g + per_group]
        if fill:
            part = part + [[] for _ in range(per_group - len(part))]
        s = max(len(seqs[i]) for b in part for i in b)
        s = -(-s // multiple) * multiple
        mbs = []
        for b in part:
            ids = torch.full((batch_size, s), pad_id, dtype=torch.long)
            rows = torch.full((batch_size,), -1, dtype=torch.long)
            for r, i in enumerate(b):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                rows[r] = i
            mbs.append({"input_ids": ids, "rows": rows})
        groups.append(Group(mbs))
    return groups


def _row_scores(logits: torch.Tensor, mb: dict[str, torch.Tensor], rows: Sequence[Row], vocab_size: int
                ) -> list[tuple[int, list[tuple[float, bool]]]]:
    """(row index, [(sum logp, greedy) per target]) for the real rows of one micro-batch (last stage)."""
    if bool((mb["rows"] < 0).all()):  # an all-filler micro-batch (a topped-up interleaved group)
        return []
    b_idx, p_idx, labels, seg = [], [], [], []
    owners: list[tuple[int, int]] = []  # (row index, number of targets)
    n_seg = 0
    for r, i in enumerate(mb["rows"].tolist()):
        if i < 0:
            continue
        ids, targets = rows[i]
        for tgt in targets:
            first = len(ids) - len(tgt)
            b_idx += [r] * len(tgt)
            p_idx += range(first, len(ids))
            labels += tgt
            seg += [n_seg] * len(tgt)
            n_seg += 1
        owners.append((i, len(targets)))
    dev = logits.device
    sel = logits[torch.tensor(b_idx, device=dev), torch.tensor(p_idx, device=dev)]  # [N, V/TP]
    lab = torch.tensor(labels, dtype=torch.long, device=dev)
    logp = vocab_parallel_token_stats(sel, lab, vocab_size=vocab_size, with_entropy=False).logp
    greedy = vocab_parallel_argmax(sel, vocab_size=vocab_size) == lab
    seg_t = torch.tensor(seg, dtype=torch.long, device=dev)
    sums = torch.zeros(n_seg, dtype=torch.float64, device=dev).index_add_(0, seg_t, logp.double())
    misses = torch.zeros(n_seg, dtype=torch.long, device=dev).index_add_(0, seg_t, (~greedy).long())
    out, k = [], 0
    sums_l, misses_l = sums.tolist(), misses.tolist()
    for i, n in owners:
        out.append((i, [(sums_l[k + j], misses_l[k + j] == 0) for j in range(n)]))
        k += n
    return out


def score_rows(model: ScoringModel, rows: Sequence[Row], batch_size: int, pad_id: int
               ) -> list[tuple[int, list[tuple[float, bool]]]]:
    """Score ``rows`` on this model replica (collective over its TP/PP group).

    Returns ``(index into rows, per-target results)`` on the last pipeline stage, [] elsewhere.
    """
    for i, (ids, targets) in enumerate(rows):  # before any collective: a bad row fails on every rank alike
        if not ids or any(not t or len(t) > len(ids) for t in targets):
            raise ValueError(f"row {i}: every target must be 1..{len(ids)} tokens (the input's length)")
    seqs = [ids for ids, _ in rows]
    order = sorted(range(len(rows)), key=lambda i: -len(seqs[i]))
    pp = ps.get_pipeline_model_parallel_world_size()
    out: list[tuple[int, list[tuple[float, bool]]]] = []
    # Several chunks per rank (virtual pipeline, a trainer's model): the interleaved schedule runs
    # whole groups of PP micro-batches.
    interleaved = len(model.chunks) > 1
    for group in batch_groups(seqs, order, batch_size, pp, pad_id, length_multiple(model), fill=interleaved):
        parts = pipeline_forward(model.chunks, group.microbatches,
                                 lambda logits, mb: _row_scores(logits, mb, rows, model.vocab_size))
        for part in parts:
            out.extend(part)
    return out


def loglik_handler(model: ScoringModel, batch_size: int, pad_id: int) -> Callable[[Sequence[Row]], Any]:
    """The driver command: this replica's share of the rows, results returned by :func:`holds_results` ranks."""

    def handle(rows: Sequence[Row]) -> list[tuple[int, list[tuple[float, bool]]]]:
        mine = dp_share(len(rows))
        scored = score_rows(model, [rows[i] for i in mine], batch_size, pad_id)
        return [(mine[k], res) for k, res in scored] if holds_results() else []

    return handle


class MegatronScorer:
    """What the lm-eval model calls on rank 0: ``score(rows)`` through the driver, in chunks."""

    def __init__(self, driver: Driver, rows_per_call: int) -> None:
        self.driver = driver
        self.rows_per_call = max(1, rows_per_call)

    def score(self, rows: Sequence[Row]) -> list[list[tuple[float, bool]]]:
        """Per row, per target: (sum log p, greedy)."""
        out: list[list[tuple[float, bool]] | None] = [None] * len(rows)
        start = time.monotonic()
        for c0 in range(0, len(rows), self.rows_per_call):
            chunk = list(rows[c0 : c0 + self.rows_per_call])
            for part in self.driver.call(LOGLIK, chunk):
                for i, res in part:
                    out[c0 + i] = res
            done = min(len(rows), c0 + self.rows_per_call)
            if done < len(rows):
                log.info("scored %d/%d rows (%.0fs)", done, len(rows), time.monotonic() - start)
        missing = [i for i, r in enumerate(out) if r is None]
        if missing:  # a layout bug, not a user error
            raise RuntimeError(f"no result came back for rows {missing[:8]}")
        return out  # type: ignore[return-value]
