"""The batch cursor's saved snapshot log-probs restore to the same rows, at DP=2 with several
micro-batches per rank and mini-batch, at other layouts, and inside a second pass.

The micro-batches come from the real loader (``PackedLoader``) at each layout, so the rows a
rank holds are the loader's DP split, not the cursor's idea of it; each packed row carries its
own log-probs (drawn from its sample ids), so a row restored into another row's place fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psft_megatron.data.batches import MicroBatch, MiniBatch
from psft_megatron.data.loader import LoaderConfig, PackedLoader
from psft_megatron.data.store import InMemorySamples
from psft_megatron.data.types import TokenizedSample
from psft_megatron.training.batch_cursor import BatchCursor, RowLayout

SEQ = 48
GLOBAL, MINI = 8, 4  # k = 2 mini-batches per global batch
CPU = torch.device("cpu")


def _store(n: int = 200) -> InMemorySamples:
    rng = np.random.default_rng(0)
    return InMemorySamples(
        TokenizedSample(rng.integers(1, 500, k).astype(np.int32), (rng.random(k) < 0.6).astype(np.uint8))
        for k in rng.integers(3, 30, n)
    )


STORE = _store()


def _row_logp(sample_ids: tuple[int, ...]) -> torch.Tensor:
    """A packed row's own log-probs ``[SEQ]``, a function of which samples it holds."""
    g = torch.Generator().manual_seed(hash(tuple(int(i) for i in sample_ids)) % 2**31)
    return -torch.rand(SEQ, generator=g) * 5


def _snapshot(mb: MicroBatch) -> torch.Tensor:
    """What the snapshot pass gives a micro-batch: ``[s, b]`` log-probs of its rows."""
    return torch.stack([_row_logp(ids) for ids in mb.sample_ids]).transpose(0, 1).contiguous()


def _global_batch(dp_rank: int, dp: int, micro: int, passes: int) -> list[MiniBatch]:
    """This rank's first global batch as the loop walks it: the k mini-batches, once per pass."""
    cfg = LoaderConfig(seq_length=SEQ, global_batch_size=GLOBAL, mini_batch_size=MINI, micro_batch_size=micro, seed=3)
    return next(PackedLoader(STORE, cfg, dp_rank, dp)).mini_batches * passes


def _logp_old(minis: list[MiniBatch], passes: int) -> list:
    """As ``snapshot_logp_old``: the first mini-batch of a one-pass batch reuses its own log-probs (None)."""
    return [None if (j == 0 and passes == 1) else [_snapshot(mb) for mb in mini.micro_batches]
            for j, mini in enumerate(minis)]


def _save(dp: int, micro: int, passes: int, done: int) -> tuple[dict, list[dict]]:
    """Every rank's cursor after ``done`` optimizer steps of the global batch: the run state and the shards."""
    state, shards = None, []
    for r in range(dp):
        minis = _global_batch(r, dp, micro, passes)
        cursor = BatchCursor(RowLayout(r, dp, MINI, micro), holds_logp=True)
        cursor.begin(minis, _logp_old(minis, passes), 0, {"epoch": 0})
        for _ in range(done):
            cursor.advance()
        assert cursor.active, "the save must fall inside the global batch"
        state = cursor.state_dict()
        shards.append(cursor.shard_state_dict())
    return state, shards


def _restore(state: dict, shards: list[dict], dp_rank: int, dp: int, micro: int, passes: int) -> BatchCursor:
    cursor = BatchCursor(RowLayout(dp_rank, dp, MINI, micro), holds_logp=True)
    cursor.load_state_dict(state)
    cursor.load_shards(shards)
    cursor.resume(_global_batch(dp_rank, dp, micro, passes), CPU)
    return cursor


# (passes, optimizer steps done in the global batch): inside the only pass; at the start of the
# second; inside the second (its last mini-batch's logp_old comes from the checkpoint alone).
POINTS = [(1, 1), (2, 2), (2, 3)]


@pytest.mark.parametrize("passes, done", POINTS)
def test_every_row_is_saved_once_under_its_position_in_the_mini_batch(passes, done):
    """DP=2 with 2 micro-batches of 1 row per rank and mini-batch: the four rows of each mini-batch
    still to run are saved under positions 0..3, once each, and as their own log-probs."""
    _, shards = _save(dp=2, micro=1, passes=passes, done=done)
    keys = [key for shard in shards for key in shard]
    steps = GLOBAL // MINI * passes
    assert sorted(keys) == [(m, pos) for m in range(done, steps) for pos in range(MINI)]
    whole = _global_batch(0, 1, MINI, passes)  # DP=1: the mini-batch's rows in order
    for shard in shards:
        for (m, pos), saved in shard.items():
            want = _row_logp(whole[m].micro_batches[0].sample_ids[pos])
            assert torch.equal(saved["index"].long(), torch.arange(SEQ))
            assert torch.equal(saved["logp"], want), (m, pos)


@pytest.mark.parametrize("passes, done", POINTS)
@pytest.mark.parametrize("to_dp, to_micro", [(2, 1), (1, 1), (1, 4), (2, 2), (4, 1)])
def test_saved_at_dp2_with_two_micro_batches_per_rank_restores_the_same_rows(passes, done, to_dp, to_micro):
    """Saved at DP=2, micro_batch_size 1 (2 micro-batches per rank and mini-batch); restored at the
    same layout (bit for bit, the resume of a preempted run) and at others: every rank gets back
    exactly the log-probs its snapshot would have given each of its rows."""
    state, shards = _save(dp=2, micro=1, passes=passes, done=done)
    for r in range(to_dp):
        cursor = _restore(state, shards, r, to_dp, to_micro, passes)
        assert cursor.next_mini == done and cursor.active
        minis = _global_batch(r, to_dp, to_micro, passes)
        for m in range(done, len(minis)):
            got = cursor.logp_old[m]
            assert got is not None and len(got) == len(minis[m].micro_batches)
            for u, mb in enumerate(minis[m].micro_batches):
                assert torch.equal(got[u], _snapshot(mb)), (r, m, u)
