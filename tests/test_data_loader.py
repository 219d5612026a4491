"""Loader: DP shards are disjoint and complete, the order is seeded, a restored position replays exactly."""

import numpy as np
import pytest
import torch

from psft_megatron.data.loader import LoaderConfig, PackedLoader
from psft_megatron.data.store import InMemorySamples
from psft_megatron.data.types import TokenizedSample


def _store(n=300, seed=0, max_len=40):
    rng = np.random.default_rng(seed)
    return InMemorySamples(
        TokenizedSample(rng.integers(1, 500, k).astype(np.int32), (rng.random(k) < 0.5).astype(np.uint8))
        for k in rng.integers(2, max_len + 1, n)
    )


CFG = LoaderConfig(seq_length=64, global_batch_size=16, mini_batch_size=8, micro_batch_size=2, seed=7)


def _rows_of(gb):
    """Sample-id tuples per row, in mini -> micro -> row order."""
    return [[row for mb in mini.micro_batches for row in mb.sample_ids] for mini in gb.mini_batches]


@pytest.mark.parametrize("pack", [True, False])
def test_dp_shards_disjoint_complete_and_same_global_stream(pack):
    store = _store()
    cfg = LoaderConfig(**{**CFG.__dict__, "pack": pack})
    ref = PackedLoader(store, cfg, 0, 1)
    steps = ref.steps_per_epoch
    ref_batches = [_rows_of(next(ref)) for _ in range(steps)]
    epoch_rows = [row for gb in ref_batches for mini in gb for row in mini]
    # One epoch uses each row once; rows hold each sample at most once; dropped remainder < one global batch.
    assert len(set(epoch_rows)) == len(epoch_rows) == steps * cfg.global_batch_size
    samples = [i for row in epoch_rows for i in row]
    assert len(set(samples)) == len(samples)
    assert ref.num_rows - len(epoch_rows) < cfg.global_batch_size
    for dp in (2, 4):
        loaders = [PackedLoader(store, cfg, r, dp) for r in range(dp)]
        for step in range(steps):
            per_rank = [_rows_of(next(ld)) for ld in loaders]
            for m in range(cfg.num_mini_batches()):
                mine = [per_rank[r][m] for r in range(dp)]
                assert all(len(x) == cfg.mini_batch_size // dp for x in mine)
                joined = [row for x in mine for row in x]
                assert joined == ref_batches[step][m]  # disjoint, complete, same order as dp=1
                assert len(set(joined)) == len(joined)


def test_mini_batch_loss_token_count_is_global():
    store = _store()
    for dp in (1, 2, 4):
        gbs = [next(PackedLoader(store, CFG, r, dp)) for r in range(dp)]
        for m in range(CFG.num_mini_batches()):
            local = [gb.mini_batches[m].local_num_loss_tokens for gb in gbs]
            masks = sum(int(mb.loss_mask.sum()) for gb in gbs for mb in gb.mini_batches[m].micro_batches)
            assert sum(local) == masks
            # Independent count from the raw samples: label positions = loss_mask[1:] per sample.
            ids = [i for gb in gbs for mb in gb.mini_batches[m].micro_batches for row in mb.sample_ids for i in row]
            direct = sum(int(store.get(i)[1][1:].sum()) for i in ids)
            assert all(gb.mini_batches[m].num_loss_tokens == direct for gb in gbs)
            assert masks == direct


def test_batch_shapes_and_micro_counts():
    store = _store()
    ld = PackedLoader(store, CFG, 1, 2)
    gb = next(ld)
    assert len(gb.mini_batches) == 2 and CFG.num_micro_batches(2) == 2
    for mini in gb.mini_batches:
        assert len(mini.micro_batches) == 2
        for mb in mini.micro_batches:
            assert mb.tokens.shape == (2, 64) and mb.tokens.dtype == torch.int64
            assert mb.loss_mask.dtype == torch.float32 and mb.position_ids.dtype == torch.int64
            # each row's samples are what the store holds
            for r, row in enumerate(mb.sample_ids):
                flat = np.concatenate([store.get(i)[0] for i in row])
                assert mb.tokens[r, : len(flat)].tolist() == flat.tolist()


def _stream(ld, n):
    out = []
    for _ in range(n):
        gb = next(ld)
        out.append((gb.epoch, gb.index_in_epoch, gb.step, [torch.cat([mb.tokens for mb in mini.micro_batches]) for mini in gb.mini_batches]))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:3] == y[:3]
        assert all(torch.equal(p, q) for p, q in zip(x[3], y[3]))


@pytest.mark.parametrize("save_after", [3, "epoch_end"])
def test_restore_reproduces_stream(save_after):
    store = _store()
    ld = PackedLoader(store, CFG, 1, 2)
    k = ld.steps_per_epoch - 1 if save_after == "epoch_end" else save_after
    _stream(ld, k)
    state = ld.state_dict()
    expected = _stream(ld, 4)  # crosses into epoch 1 in the epoch_end case
    if save_after == "epoch_end":
        assert [e[0] for e in expected] == [0, 1, 1, 1]
    resumed = PackedLoader(store, CFG, 1, 2)
    resumed.load_state_dict(state)
    _same(_stream(resumed, 4), expected)


def test_restore_with_other_dp_size_keeps_global_stream():
    store = _store()
    ld = PackedLoader(store, CFG, 0, 1)
    _stream(ld, 2)
    state = ld.state_dict()
    want = _rows_of(next(ld))
    parts = []
    for r in range(4):
        x = PackedLoader(store, LoaderConfig(**{**CFG.__dict__, "micro_batch_size": 1}), r, 4)
        x.load_state_dict(state)
        parts.append(_rows_of(next(x)))
    for m in range(CFG.num_mini_batches()):
        assert [row for p in parts for row in p[m]] == want[m]


def test_restore_refuses_other_data_or_settings():
    store = _store()
    state = PackedLoader(store, CFG, 0, 1).state_dict()
    with pytest.raises(ValueError, match="seed: saved 7, now 8"):
        PackedLoader(store, LoaderConfig(**{**CFG.__dict__, "seed": 8}), 0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="data_fingerprint"):
        PackedLoader(_store(seed=1), CFG, 0, 1).load_state_dict(state)


def test_seeded_epochs_and_no_global_rng():
    store = _store()
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    a = PackedLoader(store, CFG, 0, 1)
    b = PackedLoader(store, CFG, 0, 1)
    c = PackedLoader(store, LoaderConfig(**{**CFG.__dict__, "seed": 8}), 0, 1)
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    assert np.array_equal(a.epoch_order(1), b.epoch_order(1))
    assert not np.array_equal(a.epoch_order(0), c.epoch_order(0))
    _same(_stream(a, 3), _stream(b, 3))
    # No hidden global RNG use.
    np.random.seed(123)
    torch.manual_seed(5)
    _same(_stream(PackedLoader(store, CFG, 0, 1), 2), _stream(PackedLoader(store, CFG, 0, 1), 2))
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)
    state_before = np.random.get_state()[1].copy()
    _stream(PackedLoader(store, CFG, 0, 1), 2)
    assert np.array_equal(np.random.get_state()[1], state_before)


def test_config_validation_says_what_to_change():
    with pytest.raises(ValueError, match=r"global_batch_size \(20\) is not a multiple of mini_batch_size \(8\).*e\.g\. 24"):
        LoaderConfig(64, 20, 8, 1).validate(1)
    with pytest.raises(ValueError, match=r"mini_batch_size \(12\) is not a multiple of micro_batch_size x data-parallel size = 2 x 4 = 8.*e\.g\. 16"):
        LoaderConfig(64, 24, 12, 2).validate(4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(_store(n=10), LoaderConfig(64, 64, 8, 1), 0, 1)
    with pytest.raises(ValueError, match="more than seq_length=16"):
        PackedLoader(_store(n=50), LoaderConfig(16, 8, 8, 1), 0, 1)
    with pytest.raises(ValueError, match="more than seq_length=16"):
        PackedLoader(_store(n=50), LoaderConfig(16, 8, 8, 1, pack=False), 0, 1)
