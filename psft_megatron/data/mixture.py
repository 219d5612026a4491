"""Weighted data mixtures: which source each training row of an epoch comes from.

Weights act on packed rows, not on samples
    With weights, each source is packed into rows of its own (a row never mixes sources), and
    the weight is the source's share of the training rows, so of the trained positions (up to
    each source's padding). That is what Megatron's ``--data-path 0.3 A 0.7 B`` means: a blended
    sample there is a ``seq_length`` window of one source. Weighting samples before packing
    would instead make a source of long conversations take far more of the compute than its
    weight says. Without weights the sources are one concatenated data set, packed together
    (rows then mix sources), exactly as before weights existed.

An epoch of a mixture
    is one pass over the source that runs out first: ``N = floor(min_s rows_s / w_s)`` rows,
    of which source ``s`` supplies ``q_s`` (``N * w_s`` rounded by largest remainder, so the
    ``q_s`` add up to ``N``). No row repeats inside an epoch, and a larger source continues where
    it stopped in the next epoch: it goes through its rows once before any repeats. Peers
    differ: Megatron's blended dataset defines no epoch (it is built for the requested number of
    samples, each source cycling through its own epochs); Hugging Face ``interleave_datasets``
    stops at the first source exhausted by default (``first_exhausted``) or the last
    (``all_exhausted``). We take ``first_exhausted``: the usual mixture is a small task set with a
    share of a large general set, and ``training.epochs: 2`` should mean two passes over the task
    data, not over the general set (``all_exhausted`` would repeat the task data many times).

Sampled by weight, deterministic, resumable
    Epoch ``e`` lays its ``N`` slots out as ``q_s`` copies of each source, shuffled with
    ``(seed, epoch)``, and fills source ``s``'s slots from a pass over its rows: a permutation
    seeded by ``(seed, s, pass)`` holds ``m_s = rows_s // q_s`` epochs' worth, taken in turn
    (epoch ``e`` uses pass ``e // m_s`` at offset ``(e % m_s) * q_s``); the fewer than ``q_s``
    rows a pass has left over are skipped in that pass (a fresh permutation leaves others out
    next time). Any epoch's order is then a pure function of ``(seed, epoch)``: the loader's
    ``(epoch, index_in_epoch)`` is the whole state.
    A window of an epoch holds each source in proportion to its weight up to sampling noise
    (hypergeometric: a draw without replacement from the epoch's slots, narrower than the
    binomial of independent draws); a whole epoch holds exactly ``q_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Distinct streams (see loader._PACK_STREAM / _EPOCH_STREAM): slot layout and source passes.
_MIX_STREAM = 0x4D495846  # "MIXF"
_SOURCE_STREAM = 0x53524345  # "SRCE"


@dataclass(frozen=True)
class Sources:
    """The training sources as the sample store holds them: back to back, in recipe order."""

    names: tuple[str, ...]
    sample_counts: tuple[int, ...]  # samples of each source in the store
    weights: tuple[float, ...] | None = None  # normalised to sum 1; None: one concatenated data set

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sample_counts):
            raise ValueError(f"{len(self.names)} source names for {len(self.sample_counts)} sample counts")
        if self.weights is not None:
            if len(self.weights) != len(self.names):
                raise ValueError(f"{len(self.weights)} weights for {len(self.names)} sources")
            if any(not w > 0 for w in self.weights) or abs(sum(self.weights) - 1.0) > 1e-9:
                raise ValueError(f"weights must be > 0 and sum to 1, got {self.weights}")

    @classmethod
    def single(cls, num_samples: int, name: str = "train") -> Sources:
        """One unweighted source holding every sample."""
        return cls((name,), (num_samples,))

    def sample_source(self) -> np.ndarray:
        """int64 ``[num_samples]``: the source index of every sample in the store."""
        return np.repeat(np.arange(len(self.names), dtype=np.int64), np.asarray(self.sample_counts, dtype=np.int64))

    def sample_ranges(self) -> list[np.ndarray]:
        """The store's sample indices of each source."""
        starts = np.concatenate([[0], np.cumsum(self.sample_counts)]).astype(np.int64)
        return [np.arange(starts[s], starts[s + 1], dtype=np.int64) for s in range(len(self.names))]


def epoch_rows(rows_per_source: Sequence[int], weights: Sequence[float]) -> int:
    """Rows in one epoch of the mixture: one pass over the source that runs out first."""
    return int(min(np.floor(r / w + 1e-9) for r, w in zip(rows_per_source, weights)))


def quotas(total: int, weights: Sequence[float]) -> np.ndarray:
    """int64 ``[S]``: each source's rows in an epoch of ``total`` rows, ``total * w`` rounded by
    largest remainder (ties to the earlier source), so they sum to ``total``."""
    exact = total * np.asarray(weights, dtype=np.float64)
    q = np.floor(exact + 1e-9).astype(np.int64)
    rest = total - int(q.sum())
    order = np.argsort(-(exact - q), kind="stable")
    q[order[:rest]] += 1
    return q


def source_rows(seed: int, source: int, num_rows: int, quota: int, epoch: int) -> np.ndarray:
    """The ``quota`` rows (0..num_rows-1, distinct) one source gives ``epoch``: the next
    ``quota`` of the current pass, a permutation seeded by ``(seed, source, pass)`` that holds
    ``num_rows // quota`` epochs' worth, so a row is used once before any is used twice."""
    if not 0 < quota <= num_rows:
        raise ValueError(f"a source of {num_rows} rows cannot give {quota} rows per epoch")
    per_pass = num_rows // quota
    p, k = divmod(epoch, per_pass)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SOURCE_STREAM, source, p])))
    return rng.permutation(num_rows)[k * quota : (k + 1) * quota]


def mixture_epoch_order(seed: int, epoch: int, rows_per_source: Sequence[int], quota: np.ndarray) -> np.ndarray:
    """The row order of ``epoch``: int64 ``[sum(quota)]`` indices into the sources' rows laid back
    to back (source ``s``'s rows start at ``sum(rows_per_source[:s])``)."""
    base = np.concatenate([[0], np.cumsum(rows_per_source)]).astype(np.int64)
    slots = np.repeat(np.arange(len(quota), dtype=np.int64), quota)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _MIX_STREAM, epoch])))
    rng.shuffle(slots)
    order = np.empty(len(slots), dtype=np.int64)
    for s, q in enumerate(quota.tolist()):
        where = np.flatnonzero(slots == s)
        order[where] = base[s] + source_rows(seed, s, int(rows_per_source[s]), q, epoch)
    return order
