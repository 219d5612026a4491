"""Deterministic, resumable, data-parallel loading of packed rows.

What is shuffled
    Samples are packed **once** (a seeded permutation of the samples is offered to
    :func:`~psft_megatron.data.packing.plan_packs`, so rows mix sources), then the
    **packed rows** are shuffled every epoch with ``(seed, epoch)``. The number of
    rows, and so ``steps_per_epoch``, is the same every epoch, which a learning-rate
    schedule needs; rows are recombined into different batches each epoch. With
    ``pack=False`` each row is one padded sample.

How a global batch is split
    ``global_batch_size`` rows form a global batch (the incomplete last one of an
    epoch is dropped). It holds ``k = global_batch_size / mini_batch_size``
    mini-batches (one optimizer step each); a mini-batch's ``mini_batch_size`` rows
    are split into ``dp_size`` contiguous, disjoint slices, and this rank's slice
    into ``mini_batch_size / (micro_batch_size * dp_size)`` micro-batches of
    ``micro_batch_size`` rows.

Resuming
    :meth:`PackedLoader.state_dict` is ``(epoch, index_in_epoch)`` plus what the
    order depends on; a loader restored from it yields exactly the batches the
    original would have yielded next. The order is defined over the whole global
    batch, so a run may resume with a different data-parallel size and still see
    the same global stream.

Weighted mixtures
    With ``Sources`` that carry weights, each source is packed into rows of its own and an
    epoch is the weighted, seeded interleaving of :mod:`psft_megatron.data.mixture` (its
    docstring defines the epoch and says why weights act on rows). Either way each mini-batch
    carries its response-token count per source (``MiniBatch.source_loss_tokens``).

Randomness comes only from ``numpy.random.Generator`` objects seeded from
``(seed, purpose, epoch)``; no global RNG is read or changed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from psft_megatron.config.load import FieldError
from psft_megatron.data.batches import GlobalBatch, MicroBatch, MiniBatch, collate
from psft_megatron.data.mixture import Sources, epoch_rows, mixture_epoch_order, quotas
from psft_megatron.data.packing import PackStrategy, check_lengths, pack_row, plan_packs
from psft_megatron.data.store import SampleStore

# Distinct streams so the packing order and the per-epoch order never share draws.
_PACK_STREAM = 0x5041434B  # "PACK"
_EPOCH_STREAM = 0x45504F43  # "EPOC"


@dataclass(frozen=True)
class LoaderConfig:
    """Batch geometry and ordering. Batch sizes count rows of ``seq_length`` tokens.

    With ``pack=True`` a row is a packed sequence of several samples; otherwise one sample.
    """

    seq_length: int
    global_batch_size: int
    mini_batch_size: int
    micro_batch_size: int
    seed: int = 1234
    pack: bool = True
    pack_strategy: PackStrategy = "best_fit"
    pad_id: int = 0

    def validate(self, dp_size: int) -> None:
        """Raise :class:`~psft_megatron.config.load.FieldError` naming what to change when the sizes do not divide."""
        if self.seq_length < 1:
            raise FieldError("seq_length", f"must be >= 1, got {self.seq_length}")
        check_batch_sizes(self.global_batch_size, self.mini_batch_size, self.micro_batch_size, dp_size)

    def num_mini_batches(self) -> int:
        """Mini-batches (optimizer steps) per global batch."""
        return self.global_batch_size // self.mini_batch_size

    def num_micro_batches(self, dp_size: int) -> int:
        """Micro-batches per mini-batch on each data-parallel rank (gradient accumulation steps)."""
        return self.mini_batch_size // (self.micro_batch_size * dp_size)


def _round_up(x: int, m: int) -> int:
    return max(m, -(-x // m) * m)


def check_batch_sizes(
    global_batch_size: int,
    mini_batch_size: int,
    micro_batch_size: int,
    dp_size: int | None = None,
    section: str = "",
) -> None:
    """The batch-geometry rule, the one place it is written: each global batch splits into whole
    mini-batches, and each mini-batch into whole micro-batches on every data-parallel rank.

    ``dp_size=None`` checks what needs no world size. ``section`` prefixes the field names
    in errors (``"training."`` for a recipe). Raises :class:`FieldError`.
    """
    sizes = {"global_batch_size": global_batch_size, "mini_batch_size": mini_batch_size,
             "micro_batch_size": micro_batch_size}
    for name, value in sizes.items():
        if value < 1:
            raise FieldError(f"{section}{name}", f"must be >= 1, got {value}")
    if global_batch_size % mini_batch_size:
        raise FieldError(
            f"{section}global_batch_size",
            f"({global_batch_size}) is not a multiple of {section}mini_batch_size ({mini_batch_size}): each global "
            f"batch splits into whole mini-batches; use e.g. {_round_up(global_batch_size, mini_batch_size)} or "
            "change mini_batch_size",
        )
    if dp_size is None:
        return
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    per_step = micro_batch_size * dp_size
    if mini_batch_size % per_step:
        raise FieldError(
            f"{section}mini_batch_size",
            f"({mini_batch_size}) is not a multiple of micro_batch_size x data-parallel size = "
            f"{micro_batch_size} x {dp_size} = {per_step}: use e.g. {_round_up(mini_batch_size, per_step)}, "
            "or lower micro_batch_size, or change the number of processes",
        )


class PackedLoader:
    """Yields this data-parallel rank's :class:`GlobalBatch` forever (epochs roll over).

    Build it on every rank with ``dp_rank = parallel_state.get_data_parallel_rank()``
    and ``dp_size = parallel_state.get_data_parallel_world_size()``: all PP stages and
    TP ranks of a replica then hold identical micro-batches without communication.
    """

    def __init__(self, store: SampleStore, config: LoaderConfig, dp_rank: int = 0, dp_size: int = 1,
                 sources: Sources | None = None):
        config.validate(dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
        self.store = store
        self.config = config
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.sources = sources or Sources.single(len(store))
        if sum(self.sources.sample_counts) != len(store):
            raise ValueError(f"the sources hold {sum(self.sources.sample_counts)} samples, the store {len(store)}")
        self._row_offsets, self._row_samples, self.rows_per_source = self._plan()
        self.num_rows = len(self._row_offsets) - 1
        self.row_loss_tokens = np.add.reduceat(
            np.asarray(store.loss_tokens, dtype=np.int64)[self._row_samples], self._row_offsets[:-1]
        ) if self.num_rows else np.zeros(0, np.int64)
        self.row_source_loss_tokens = self._loss_tokens_by_source()
        self.quota: np.ndarray | None = None  # rows per source in an epoch (weighted mixtures)
        self.epoch_length = self.num_rows  # rows one epoch orders
        if self.sources.weights is not None:
            self.epoch_length = epoch_rows(self.rows_per_source, self.sources.weights)
            self.quota = quotas(self.epoch_length, self.sources.weights)
            empty = [n for n, q in zip(self.sources.names, self.quota) if q == 0]
            if empty:
                raise ValueError(
                    f"source {empty[0]!r} gets none of the {self.epoch_length} rows of an epoch at its weight "
                    f"(rows per source: {dict(zip(self.sources.names, self.rows_per_source))}); raise its weight "
                    "or add data to the source that runs out first"
                )
        self.steps_per_epoch = self.epoch_length // config.global_batch_size
        if self.steps_per_epoch == 0:
            what = "packed rows" if config.pack else "samples"
            if self.quota is not None:
                what += " in one epoch of the mixture (one pass over the source that runs out first)"
            raise ValueError(
                f"the data give {self.epoch_length} {what} of seq_length={config.seq_length}, fewer than one "
                f"global batch ({config.global_batch_size}); lower global_batch_size or add data"
            )
        self.epoch = 0
        self.index_in_epoch = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ---- plan -------------------------------------------------------------
    def _plan(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Row offsets, the samples of the rows back to back, and rows per source (weighted:
        each source packed on its own, its rows after the previous source's)."""
        lengths = np.asarray(self.store.lengths, dtype=np.int64)
        n = len(lengths)
        cfg = self.config
        if not cfg.pack:
            check_lengths(lengths, np.arange(n), cfg.seq_length)
            per_source = [n] if self.sources.weights is None else list(self.sources.sample_counts)
            return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64), per_source
        if self.sources.weights is None:  # one data set: rows mix sources
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, _PACK_STREAM])))
            rows = plan_packs(lengths, cfg.seq_length, order=rng.permutation(n), strategy=cfg.pack_strategy)
            per_source = [len(rows)]
        else:
            rows, per_source = [], []
            for s, members in enumerate(self.sources.sample_ranges()):
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([cfg.seed, _PACK_STREAM, s])))
                mine = plan_packs(lengths, cfg.seq_length, order=rng.permutation(members),
                                  strategy=cfg.pack_strategy)
                rows.extend(mine)
                per_source.append(len(mine))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        flat = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
        return offsets, flat, per_source

    def _loss_tokens_by_source(self) -> np.ndarray:
        """int64 ``[num_rows, sources]``: each row's response tokens from each source."""
        n_src = len(self.sources.names)
        src = self.sources.sample_source()[self._row_samples]
        row = np.repeat(np.arange(self.num_rows, dtype=np.int64), np.diff(self._row_offsets))
        counts = np.asarray(self.store.loss_tokens, dtype=np.int64)[self._row_samples]
        flat = np.bincount(row * n_src + src, weights=counts, minlength=self.num_rows * n_src)
        return np.rint(flat).astype(np.int64).reshape(self.num_rows, n_src)

    def row_samples(self, row: int) -> np.ndarray:
        """Dataset indices packed in ``row``."""
        return self._row_samples[self._row_offsets[row] : self._row_offsets[row + 1]]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row indices of ``epoch`` in order: a permutation of the rows, or for a weighted
        mixture ``epoch_length`` rows drawn by weight (see :mod:`psft_megatron.data.mixture`)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.quota is not None:
                order = mixture_epoch_order(self.config.seed, epoch, self.rows_per_source, self.quota)
            else:
                rng = np.random.Generator(
                    np.random.PCG64(np.random.SeedSequence([self.config.seed, _EPOCH_STREAM, epoch]))
                )
                order = rng.permutation(self.num_rows)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def global_batch_rows(self, epoch: int, index_in_epoch: int) -> np.ndarray:
        """Row indices of a whole global batch (all DP ranks), in mini-batch order."""
        g = self.config.global_batch_size
        return self.epoch_order(epoch)[index_in_epoch * g : (index_in_epoch + 1) * g]

    def rank_rows(self, rows: np.ndarray) -> list[list[np.ndarray]]:
        """Split a global batch's rows into ``[mini][micro] -> row indices`` for this DP rank."""
        cfg = self.config
        per_rank = cfg.mini_batch_size // self.dp_size
        out = []
        for m in range(cfg.num_mini_batches()):
            mini = rows[m * cfg.mini_batch_size : (m + 1) * cfg.mini_batch_size]
            mine = mini[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
            out.append([mine[j : j + cfg.micro_batch_size] for j in range(0, per_rank, cfg.micro_batch_size)])
        return out

    # ---- iteration --------------------------------------------------------
    def __iter__(self) -> Iterator[GlobalBatch]:
        return self

    def __next__(self) -> GlobalBatch:
        epoch, index = self.epoch, self.index_in_epoch
        rows = self.global_batch_rows(epoch, index)
        cfg = self.config
        minis = []
        for m, micro_rows in enumerate(self.rank_rows(rows)):
            mini_all = rows[m * cfg.mini_batch_size : (m + 1) * cfg.mini_batch_size]
            micros = [self.build_micro_batch(r) for r in micro_rows]
            minis.append(
                MiniBatch(
                    micro_batches=micros,
                    num_loss_tokens=int(self.row_loss_tokens[mini_all].sum()),
                    local_num_loss_tokens=sum(mb.num_loss_tokens for mb in micros),
                    source_loss_tokens=tuple(int(x) for x in self.row_source_loss_tokens[mini_all].sum(axis=0)),
                )
            )
        self.index_in_epoch += 1
        if self.index_in_epoch == self.steps_per_epoch:
            self.epoch, self.index_in_epoch = self.epoch + 1, 0
        return GlobalBatch(minis, epoch, index, epoch * self.steps_per_epoch + index)

    def build_micro_batch(self, rows: np.ndarray) -> MicroBatch:
        """Materialise the packed rows ``rows`` (row indices) as a :class:`MicroBatch`."""
        cfg = self.config
        packed = []
        for r in rows:
            ids = self.row_samples(int(r))
            packed.append(pack_row([self.store.get(int(i)) for i in ids], cfg.seq_length, cfg.pad_id, ids))
        return collate(packed)

    # ---- checkpointing ----------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position and the settings the order depends on (JSON-able)."""
        state = {
            "epoch": self.epoch,
            "index_in_epoch": self.index_in_epoch,
            "num_rows": self.num_rows,
            "data_fingerprint": self.store.fingerprint,
            "config": {k: v for k, v in asdict(self.config).items() if k != "micro_batch_size"},
        }
        if self.sources.weights is not None:  # absent otherwise: older checkpoints keep resuming
            state["mixture"] = {"names": list(self.sources.names), "sample_counts": list(self.sources.sample_counts),
                                "weights": list(self.sources.weights)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; refuse if the data or ordering settings differ."""
        mine = self.state_dict()
        problems = [
            f"{k}: saved {state['config'].get(k)!r}, now {v!r}"
            for k, v in mine["config"].items()
            if state["config"].get(k) != v
        ]
        for k in ("num_rows", "data_fingerprint", "mixture"):
            if state.get(k) != mine.get(k):
                problems.append(f"{k}: saved {state.get(k)!r}, now {mine.get(k)!r}")
        if problems:
            raise ValueError(
                "cannot resume the data stream, the saved position was taken with different data or settings ("
                + "; ".join(problems)
                + "); resume with the same data cache, mixture weights and loader settings (micro_batch_size "
                "and dp_size may change)"
            )
        epoch, index = int(state["epoch"]), int(state["index_in_epoch"])
        if not 0 <= index < self.steps_per_epoch:
            raise ValueError(f"index_in_epoch={index} outside [0, {self.steps_per_epoch})")
        self.epoch, self.index_in_epoch = epoch, index
