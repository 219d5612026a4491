"""Turn the recipe's data section into this rank's loaders (train and held-out)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from psft_megatron.config.recipe import RecipeConfig
from psft_megatron.data.batches import MicroBatch
from psft_megatron.data.cache import CachedSamples
from psft_megatron.data.loader import LoaderConfig, PackedLoader
from psft_megatron.data.prepare import prepare_dataset
from psft_megatron.runtime.distributed import DistEnv

log = logging.getLogger("psft")


@dataclass
class TrainData:
    """The training loader and, if configured, the held-out samples."""

    loader: PackedLoader
    eval_loader: PackedLoader | None

    def eval_micro_batches(self, max_batches: int) -> list[MicroBatch]:
        """The same first ``max_batches`` held-out global batches every time (this DP rank's micro-batches)."""
        if self.eval_loader is None:
            return []
        self.eval_loader.epoch, self.eval_loader.index_in_epoch = 0, 0
        n = min(max_batches, self.eval_loader.steps_per_epoch)
        out: list[MicroBatch] = []
        for _ in range(n):
            gb = next(self.eval_loader)
            out.extend(mb for mini in gb.mini_batches for mb in mini.micro_batches)
        return out


def _cache(recipe: RecipeConfig, env: DistEnv, split: str) -> CachedSamples:
    data = recipe.data
    sources = data.train if split == "train" else data.eval
    # Rank 0 tokenises once into a shared cache; every other rank waits and maps it.
    # (Node-local cache dirs would need local_rank == 0 writers: see docs.)
    cached = prepare_dataset(
        Path(data.cache_dir) / split,
        sources,
        data.tokenizer,
        data.chat_template,
        is_writer=env.rank == 0,
        pad=data.pad,
        rebuild_stale=True,
    )
    if env.rank == 0:
        m = cached.manifest
        log.info("%s data: %d samples, %d tokens (cache %s)", split, m.n_samples, m.n_tokens, cached.path)
    return cached


def build_data(recipe: RecipeConfig, env: DistEnv) -> TrainData:
    """Prepare (or map) the token caches and build the DP-sharded loaders."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    t = recipe.training

    def loader(cached: CachedSamples, seed: int) -> PackedLoader:
        cfg = LoaderConfig(
            seq_length=t.seq_length,
            global_batch_size=t.global_batch_size,
            mini_batch_size=t.mini_batch_size,
            micro_batch_size=t.micro_batch_size,
            seed=seed,
            pack=recipe.data.pack,
            pad_id=int(cached.manifest.identity["tokenizer"]["pad_id"]),
        )
        return PackedLoader(cached, cfg, dp_rank=dp_rank, dp_size=dp_size)

    train = loader(_cache(recipe, env, "train"), t.seed)
    held_out = loader(_cache(recipe, env, "eval"), t.seed) if recipe.data.eval else None
    return TrainData(loader=train, eval_loader=held_out)
