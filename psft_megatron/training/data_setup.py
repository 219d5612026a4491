"""Turn the recipe's data section into this rank's loaders (train and held-out)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch.distributed as dist

from psft_megatron.data.batches import MicroBatch, MiniBatch
from psft_megatron.data.cache import CachedSamples, source_sample_counts
from psft_megatron.data.config import DataConfig, source_names
from psft_megatron.data.errors import SOURCE, DataError
from psft_megatron.data.loader import LoaderConfig, PackedLoader
from psft_megatron.data.mixture import Sources
from psft_megatron.data.prepare import prepare_dataset
from psft_megatron.data.types import SkipReport
from psft_megatron.errors import UserError
from psft_megatron.runtime.config import ParallelConfig
from psft_megatron.runtime.distributed import DistEnv
from psft_megatron.training.config import TrainingConfig

log = logging.getLogger("psft")


# The held-out rows (their packing and which eval_rows are scored) do not follow training.seed: runs
# that differ only in their seed are scored on the same rows. 1234 is training.seed's default, so runs
# at the default score the rows they always did.
HELD_OUT_SEED = 1234


class DataSetupError(UserError, RuntimeError):
    """Another rank (rank 0) failed to prepare the data; its message is included."""


@dataclass
class TrainData:
    """The training loader and, if configured, the held-out rows."""

    loader: PackedLoader
    # The held-out split packed into rows (its own geometry: one row per step, one rank), so
    # a small eval set never has to fill a training-size global batch.
    eval_loader: PackedLoader | None = None
    micro_batch_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    # The interleaved schedule needs a multiple of the pipeline size in micro-batches.
    eval_multiple: int = 1

    def source_fields(self, mini: MiniBatch) -> dict[str, int]:
        """``{"tokens/NAME": response tokens}`` of a mini-batch per training source (all DP ranks);
        empty with one source (its count is the record's ``tokens``)."""
        names = self.loader.sources.names
        if len(names) < 2:
            return {}
        return {f"tokens/{n}": int(c) for n, c in zip(names, mini.source_loss_tokens)}

    def eval_micro_batches(self, max_rows: int | None) -> list[MicroBatch]:
        """This DP rank's share of the first ``max_rows`` held-out rows (None = all), the same every call.

        Rows go out in batches of micro_batch_size x DP, one micro-batch per rank; the
        last batch is filled with copies whose loss mask is zero, so every chosen row is
        scored exactly once whatever the layout.
        """
        if self.eval_loader is None:
            return []
        order = self.eval_loader.epoch_order(0)
        if max_rows is not None:
            order = order[:max_rows]
        per_batch = self.micro_batch_size * self.dp_size
        n = -(-len(order) // per_batch)
        n = -(-n // self.eval_multiple) * self.eval_multiple  # extra batches are all filler
        out = []
        for b in range(n):
            start = b * per_batch + self.dp_rank * self.micro_batch_size
            rows = order[start : start + self.micro_batch_size]
            real = len(rows)
            filler = np.full(self.micro_batch_size - real, self.eval_loader.epoch_order(0)[0], dtype=order.dtype)
            mb = self.eval_loader.build_micro_batch(np.concatenate([rows, filler]))
            if real < self.micro_batch_size:
                mb.loss_mask[real:] = 0
                mb.num_loss_tokens = int(mb.loss_mask.sum())
            out.append(mb)
        return out


def _cache(data: DataConfig, env: DistEnv, split: str, seq_length: int) -> CachedSamples:
    # A source without max_length is limited to the row length: longer samples go through the
    # source's long_sample policy (dropped or cut, and counted) instead of failing the packer.
    sources = [s if s.max_length else replace(s, max_length=seq_length)
               for s in (data.train if split == "train" else data.eval)]
    # Rank 0 tokenises once into a shared cache (cache_dir must be on a filesystem every
    # node sees), then tells the others whether it worked: a bad data file then stops every
    # rank at once with rank 0's message, instead of leaving them polling for a cache.
    def prepare(is_writer: bool) -> CachedSamples:
        return prepare_dataset(
            Path(data.cache_dir) / split, sources, data.tokenizer, data.chat_template,
            is_writer=is_writer, pad=data.pad, rebuild_stale=True,
        )

    failure: list[str | None] = [None]
    if env.rank == 0:
        try:
            cached = prepare(is_writer=True)
        except Exception as e:
            failure[0] = f"{type(e).__name__}: {e}"
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise DataSetupError(f"rank 0 could not prepare the {split} data: {failure[0]}")
    if env.rank != 0:
        cached = prepare(is_writer=False)
    if env.rank == 0:
        m = cached.manifest
        log.info("%s data: %d samples, %d tokens (cache %s)", split, m.n_samples, m.n_tokens, cached.path)
        skipped = SkipReport(counts=dict(m.skip_report.get("counts", {})),
                             examples=dict(m.skip_report.get("examples", {})))
        if skipped.total:  # on every run, also when the cache was built by an earlier one
            log.warning("%s data: %s", split, skipped.summary())
    return cached


def _data_error(split: str, data: DataConfig, e: ValueError) -> DataError:
    paths = ", ".join(s.path for s in (data.train if split == "train" else data.eval))
    return DataError(paths, None, None, SOURCE, f"{split} data: {e}")


def _sources(data: DataConfig, cached: CachedSamples) -> Sources:
    """The training sources as the cache holds them, with their names and weights."""
    counts = source_sample_counts(cached.manifest, len(data.train))
    if counts is None:  # the writer rebuilds such a cache; a reader only meets one written elsewhere
        raise _data_error("train", data, ValueError(
            f"the cache {cached.path} does not count the samples of each source (written by an older version); "
            "delete it or rebuild it with tools/prepare_data.py --rebuild-stale"))
    weights = data.train_weights()
    if weights is not None:
        for i, n in enumerate(counts):
            if n == 0:
                raise DataError(data.train[i].path, None, None, SOURCE,
                                f"data.train[{i}] gives no samples: a weighted source needs some (see the skip report)")
    return Sources(tuple(source_names(data.train)), tuple(counts), None if weights is None else tuple(weights))


def _log_sources(loader: PackedLoader) -> None:
    """What the run trains on, per source (rank 0)."""
    src = loader.sources
    if len(src.names) < 2:
        return
    rows = loader.rows_per_source
    for s, name in enumerate(src.names):
        if loader.quota is None:
            log.info("train source %s: %d samples (concatenated with the others, rows mix sources)",
                     name, src.sample_counts[s])
        else:
            log.info("train source %s: weight %.4g, %d samples, %d rows, %d rows per epoch (%.2f passes)",
                     name, src.weights[s], src.sample_counts[s], rows[s], loader.quota[s], loader.quota[s] / rows[s])
    if loader.quota is not None:
        log.info("train mixture: an epoch is %d rows (%d global batches), one pass over the source that runs "
                 "out first", loader.epoch_length, loader.steps_per_epoch)


def build_data(data: DataConfig, t: TrainingConfig, parallel: ParallelConfig, env: DistEnv) -> TrainData:
    """Prepare (or map) the token caches and build the DP-sharded loaders."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    def loader(cached: CachedSamples, seed: int, one_row: bool = False, sources: Sources | None = None) -> PackedLoader:
        cfg = LoaderConfig(
            seq_length=t.seq_length,
            global_batch_size=1 if one_row else t.global_batch_size,
            mini_batch_size=1 if one_row else t.mini_batch_size,
            micro_batch_size=1 if one_row else t.micro_batch_size,
            seed=seed,
            pack=data.pack,
            pad_id=int(cached.manifest.identity["tokenizer"]["pad_id"]),
        )
        try:
            if one_row:  # eval: TrainData splits the rows over DP itself
                return PackedLoader(cached, cfg)
            return PackedLoader(cached, cfg, dp_rank=dp_rank, dp_size=dp_size, sources=sources)
        except ValueError as e:  # e.g. no rows at all: every rank raises the same, one line
            raise _data_error("eval" if one_row else "train", data, e) from None

    train_cache = _cache(data, env, "train", t.seq_length)
    train = loader(train_cache, t.seed, sources=_sources(data, train_cache))
    if env.rank == 0:
        _log_sources(train)
    held_out = loader(_cache(data, env, "eval", t.seq_length), HELD_OUT_SEED, one_row=True) if data.eval else None
    multiple = parallel.pipeline_model_parallel_size if parallel.virtual_pipeline_model_parallel_size else 1
    return TrainData(train, held_out, t.micro_batch_size, dp_rank, dp_size, multiple)
