"""Weighted data mixtures (data.train[i].weight): realised proportions against the weights (a
binomial bound computed here), the epoch's definition, exact resume, per-source token counts,
the recipe checks and the cache's per-source sample counts."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from psft_megatron.config.load import FieldError
from psft_megatron.data.cache import prepare_cache, read_manifest, source_sample_counts, write_cache
from psft_megatron.data.config import DataConfig, DataSourceConfig
from psft_megatron.data.loader import LoaderConfig, PackedLoader
from psft_megatron.data.mixture import Sources
from psft_megatron.data.store import InMemorySamples
from psft_megatron.data.types import TokenizedSample

# Three sources whose natural shares of the packed rows (short, long, medium samples) are far
# from the weights below, so a loader that ignored the weights would fail every bound.
COUNTS = (120, 400, 240)
LENGTHS = ((4, 12), (24, 40), (10, 24))
WEIGHTS = (0.6, 0.3, 0.1)
CFG = LoaderConfig(seq_length=64, global_batch_size=8, mini_batch_size=4, micro_batch_size=1, seed=11)


def _samples(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n, (lo, hi) in zip(COUNTS, LENGTHS):
        for _ in range(n):
            k = int(rng.integers(lo, hi + 1))
            out.append(TokenizedSample(rng.integers(1, 500, k).astype(np.int32), (rng.random(k) < 0.6).astype(np.uint8)))
    return out


def _source_of_sample():
    """The source of every sample index, from COUNTS (written apart from Sources.sample_source)."""
    out = []
    for s, n in enumerate(COUNTS):
        out += [s] * n
    return out


def _loader(weights=WEIGHTS, cfg=CFG, dp_rank=0, dp_size=1, store=None):
    return PackedLoader(store or InMemorySamples(_samples()), cfg, dp_rank, dp_size,
                        Sources(("a", "b", "c"), COUNTS, weights))


def _row_source(row_sample_ids, source_of):
    sources = {source_of[i] for i in row_sample_ids}
    assert len(sources) == 1, "a weighted row mixes sources"
    return sources.pop()


def _binomial_halfwidth(n, p, alpha):
    """The smallest d with P(|X - n p| > d) <= alpha for X ~ Binomial(n, p): float64 log-pmf sums."""
    logpmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
              + (n - k) * math.log1p(-p) for k in range(n + 1)]
    pmf = [math.exp(v) for v in logpmf]
    mean = n * p
    for d in range(n + 1):
        outside = sum(pmf[k] for k in range(n + 1) if abs(k - mean) > d)
        if outside <= alpha:
            return d
    return n


def test_epoch_length_and_quotas_follow_the_definition():
    ld = _loader()
    rows = ld.rows_per_source
    assert sum(rows) == ld.num_rows
    # One pass over the source that runs out first: floor(min rows_s / w_s) rows.
    n = math.floor(min(r / w for r, w in zip(rows, WEIGHTS)))
    assert ld.epoch_length == n and ld.steps_per_epoch == n // CFG.global_batch_size
    assert int(ld.quota.sum()) == n
    for q, w, r in zip(ld.quota, WEIGHTS, rows):
        assert abs(q - n * w) < 1 and 0 < q <= r
    # Natural shares are far from the weights (else the proportion test below proves nothing).
    natural = np.asarray(rows) / sum(rows)
    assert np.abs(natural - np.asarray(WEIGHTS)).max() > 0.25
    # Each epoch holds exactly the quotas, and no row twice.
    source_of = _source_of_sample()
    for epoch in range(3):
        order = ld.epoch_order(epoch)
        assert len(order) == n and len(set(order.tolist())) == n
        got = np.bincount([_row_source(ld.row_samples(int(r)), source_of) for r in order], minlength=3)
        assert got.tolist() == ld.quota.tolist()


def test_realised_proportions_within_a_binomial_bound():
    ld = _loader()
    source_of = _source_of_sample()
    epochs = 12
    seen = np.zeros(3, dtype=np.int64)
    for _ in range(epochs * ld.steps_per_epoch):
        gb = next(ld)
        for mini in gb.mini_batches:
            for mb in mini.micro_batches:
                for row in mb.sample_ids:
                    seen[_row_source(row, source_of)] += 1
    total = int(seen.sum())
    assert total == epochs * ld.steps_per_epoch * CFG.global_batch_size
    for s, w in enumerate(WEIGHTS):
        # Two-sided binomial bound at 1e-6 per source, plus the largest-remainder rounding of the
        # quotas (under one row per epoch); the draws within an epoch are without replacement
        # (hypergeometric), narrower than the binomial.
        d = _binomial_halfwidth(total, w, 1e-6) + epochs
        assert abs(seen[s] - total * w) <= d, (s, seen.tolist(), total, d)


def test_each_source_uses_every_row_once_before_any_repeats():
    ld = _loader()
    source_of = _source_of_sample()
    base = np.concatenate([[0], np.cumsum(ld.rows_per_source)])
    for s in range(3):
        r, q = ld.rows_per_source[s], int(ld.quota[s])
        for first in (0, r // q):  # one pass over the source's rows holds r // q epochs' draws
            used = []
            for epoch in range(first, first + r // q):
                used += [int(x) for x in ld.epoch_order(epoch) if base[s] <= x < base[s + 1]]
            assert len(used) == (r // q) * q and len(set(used)) == len(used), s
            assert all(_row_source(ld.row_samples(x), source_of) == s for x in used)


def test_seeded_deterministic_and_no_global_rng():
    np_state = np.random.get_state()[1].copy()
    a, b = _loader(), _loader()
    assert np.array_equal(a.epoch_order(2), b.epoch_order(2))
    assert not np.array_equal(a.epoch_order(0), a.epoch_order(1))
    other = _loader(cfg=replace(CFG, seed=12))
    assert not np.array_equal(a.epoch_order(0), other.epoch_order(0))
    assert np.array_equal(np.random.get_state()[1], np_state)


def _batch_tensors(gb):
    return [(t.tokens, t.labels, t.loss_mask, t.position_ids, t.segment_ids, t.cu_seqlens)
            for mini in gb.mini_batches for t in mini.micro_batches]


def _same_batches(xs, ys, same_sources=True):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert (x.epoch, x.index_in_epoch, x.step) == (y.epoch, y.index_in_epoch, y.step)
        if same_sources:
            assert [m.source_loss_tokens for m in x.mini_batches] == [m.source_loss_tokens for m in y.mini_batches]
        for tx, ty in zip(_batch_tensors(x), _batch_tensors(y)):
            assert all(torch.equal(p, q) for p, q in zip(tx, ty))


@pytest.mark.parametrize("save_after", ["mid_epoch", "epoch_end", "second_epoch"])
def test_restored_loader_continues_the_same_stream(save_after):
    store = InMemorySamples(_samples())
    ld = _loader(store=store, dp_rank=1, dp_size=2, cfg=replace(CFG, micro_batch_size=2))
    k = {"mid_epoch": 2, "epoch_end": ld.steps_per_epoch - 1, "second_epoch": ld.steps_per_epoch + 3}[save_after]
    for _ in range(k):
        next(ld)
    state = ld.state_dict()
    expected = [next(ld) for _ in range(ld.steps_per_epoch + 2)]  # crosses an epoch boundary
    resumed = _loader(store=store, dp_rank=1, dp_size=2, cfg=replace(CFG, micro_batch_size=2))
    resumed.load_state_dict(state)
    _same_batches([next(resumed) for _ in range(len(expected))], expected)


def test_restore_at_another_dp_size_keeps_the_global_stream():
    store = InMemorySamples(_samples())
    ld = _loader(store=store)
    for _ in range(3):
        next(ld)
    state = ld.state_dict()
    want = next(ld)
    parts = []
    for r in range(2):
        x = _loader(store=store, dp_rank=r, dp_size=2, cfg=replace(CFG, micro_batch_size=2))
        x.load_state_dict(state)
        parts.append(next(x))
    for m, mini in enumerate(want.mini_batches):
        rows = [row for mb in mini.micro_batches for row in mb.sample_ids]
        assert [row for p in parts for mb in p.mini_batches[m].micro_batches for row in mb.sample_ids] == rows
        assert all(p.mini_batches[m].source_loss_tokens == mini.source_loss_tokens for p in parts)


def test_restore_refuses_other_weights():
    store = InMemorySamples(_samples())
    state = _loader(store=store).state_dict()
    with pytest.raises(ValueError, match="mixture: saved .*0.6.*now .*0.5"):
        _loader(weights=(0.5, 0.3, 0.2), store=store).load_state_dict(state)
    unweighted = PackedLoader(store, CFG, 0, 1, Sources(("a", "b", "c"), COUNTS)).state_dict()
    with pytest.raises(ValueError, match="mixture: saved None"):
        _loader(store=store).load_state_dict(unweighted)


def _loss_tokens_reference(samples):
    """Per sample: response tokens in the loss (label positions 1.. whose mask is 1)."""
    return [int(np.asarray(s.loss_mask[1:]).sum()) for s in samples]


@pytest.mark.parametrize("weights", [WEIGHTS, None], ids=["weighted", "concatenated"])
def test_source_token_counts_of_each_mini_batch(weights):
    samples = _samples()
    store = InMemorySamples(samples)
    source_of = _source_of_sample()
    per_sample = _loss_tokens_reference(samples)
    cfg = replace(CFG, micro_batch_size=2)
    loaders = [PackedLoader(store, cfg, r, 2, Sources(("a", "b", "c"), COUNTS, weights)) for r in range(2)]
    for _ in range(3):
        gbs = [next(ld) for ld in loaders]
        for m in range(cfg.num_mini_batches()):
            want = [0, 0, 0]
            for gb in gbs:
                for mb in gb.mini_batches[m].micro_batches:
                    for row in mb.sample_ids:
                        for i in row:
                            want[source_of[i]] += per_sample[i]
            for gb in gbs:  # every DP rank holds the whole mini-batch's counts
                mini = gb.mini_batches[m]
                assert list(mini.source_loss_tokens) == want
                assert sum(mini.source_loss_tokens) == mini.num_loss_tokens
    if weights is None:  # without weights the rows mix sources, as before weights existed
        ld = loaders[0]
        assert any(len({source_of[i] for i in ld.row_samples(r)}) > 1 for r in range(ld.num_rows))


def test_unweighted_sources_keep_the_old_stream():
    store = InMemorySamples(_samples())
    old = PackedLoader(store, CFG, 0, 1)
    new = PackedLoader(store, CFG, 0, 1, Sources(("a", "b", "c"), COUNTS))
    assert np.array_equal(old.epoch_order(1), new.epoch_order(1))
    assert old.state_dict() == new.state_dict()
    xs, ys = [next(old) for _ in range(3)], [next(new) for _ in range(3)]
    _same_batches(xs, ys, same_sources=False)  # one source's count against three
    assert all(sum(y.source_loss_tokens) == x.source_loss_tokens[0] == x.num_loss_tokens
               for a, b in zip(xs, ys) for x, y in zip(a.mini_batches, b.mini_batches))


def test_a_weight_too_small_for_one_epoch_is_refused():
    with pytest.raises(ValueError, match="source 'c' gets none of the .* rows of an epoch"):
        _loader(weights=(0.6, 0.3999, 0.0001))


# ---- recipe checks --------------------------------------------------------------------------


def _data(train, **kw):
    return DataConfig(train=[DataSourceConfig(**d) for d in train], tokenizer="tok", **kw)


def test_weights_are_all_or_none_positive_and_train_only():
    ok = _data([{"path": "x/a.jsonl", "weight": 3}, {"path": "y/b.jsonl", "weight": 1}])
    ok.validate()
    assert ok.train_weights() == [0.75, 0.25]
    assert _data([{"path": "a.jsonl"}, {"path": "b.jsonl"}]).train_weights() is None
    with pytest.raises(FieldError, match=r"data.train\[1\].weight.*set a weight on every training source"):
        _data([{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}]).validate()
    with pytest.raises(FieldError, match=r"data.train\[0\].weight.*> 0, got 0"):
        _data([{"path": "a.jsonl", "weight": 0}, {"path": "b.jsonl", "weight": 1}]).validate()
    with pytest.raises(FieldError, match=r"data.train\[0\].weight.*> 0, got nan"):
        _data([{"path": "a.jsonl", "weight": float("nan")}]).validate()
    bad_eval = _data([{"path": "a.jsonl"}], eval=[DataSourceConfig(path="e.jsonl", weight=1.0)])
    with pytest.raises(FieldError, match=r"data.eval\[0\].weight.*training sources only"):
        bad_eval.validate()


def test_source_names_derived_unique_and_checked():
    from psft_megatron.data.config import source_names

    srcs = [DataSourceConfig(path=p) for p in ("d/gsm8k/train.jsonl", "d/chat/train.jsonl.gz", "openai/gsm8k")]
    assert source_names(srcs) == ["train_0", "train_1", "gsm8k"]
    named = [DataSourceConfig(path="a/train.jsonl", name="task"), DataSourceConfig(path="b/train.jsonl", name="chat")]
    assert source_names(named) == ["task", "chat"]
    with pytest.raises(FieldError, match=r"data.train\[1\].name.*also the name of data.train\[0\]"):
        _data([{"path": "a.jsonl", "name": "x"}, {"path": "b.jsonl", "name": "x"}]).validate()
    with pytest.raises(FieldError, match=r"data.train\[0\].name.*letters, digits"):
        _data([{"path": "a.jsonl", "name": "my data"}]).validate()


def test_weight_and_name_do_not_change_the_cache_identity():
    base = DataSourceConfig(path="a.jsonl", adapter="gsm8k")
    assert replace(base, weight=0.3, name="task").fingerprint() == base.fingerprint()
    assert replace(base, limit=3).fingerprint() != base.fingerprint()


# ---- the cache counts each source's samples -------------------------------------------------


SMOLLM2 = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "smollm2"


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="needs ../shared/tokenizers/smollm2")
def test_prepare_dataset_counts_each_sources_samples_after_skips(tmp_path):
    from psft_megatron.data.prepare import prepare_dataset

    def gsm8k(path, n, long_every=0):
        rows = []
        for i in range(n):
            steps = " and then".join(["x"] * (400 if long_every and i % long_every == 0 else 1))
            rows.append(json.dumps({"question": f"What is {i}+{i}?", "answer": f"{steps} {2 * i}\n#### {2 * i}"}))
        path.write_text("\n".join(rows) + "\n")
        return DataSourceConfig(path=str(path), adapter="gsm8k", max_length=256, weight=1.0)

    a = gsm8k(tmp_path / "a.jsonl", 7)
    b = gsm8k(tmp_path / "b.jsonl", 12, long_every=4)  # 3 of 12 are too long: dropped
    cached = prepare_dataset(tmp_path / "cache", [a, b], SMOLLM2, is_writer=True)
    assert cached.manifest.source_samples == [7, 9] and len(cached) == 16
    assert cached.manifest.skip_report["total"] == 3


def _write(tmp_path, n_per_source):
    samples = [TokenizedSample(np.arange(1, 6, dtype=np.int32), np.ones(5, np.uint8))
               for _ in range(sum(n_per_source))]
    return samples


def test_cache_records_and_checks_samples_per_source(tmp_path):
    samples = _write(tmp_path, (3, 5))
    m = write_cache(tmp_path / "c", iter(samples), {"k": 1}, source_samples=[3, 5], num_sources=2)
    assert m.source_samples == [3, 5] and source_sample_counts(m, 2) == [3, 5]
    # A cache written before sources were counted: one source reads as all samples; several are rebuilt.
    legacy = write_cache(tmp_path / "old", iter(samples), {"k": 1})
    assert legacy.source_samples == [8]
    manifest = tmp_path / "old" / "manifest.json"
    data = json.loads(manifest.read_text())
    del data["source_samples"]
    manifest.write_text(json.dumps(data))
    m = read_manifest(tmp_path / "old")
    assert source_sample_counts(m, 1) == [8] and source_sample_counts(m, 2) is None
    calls = []

    def make():
        calls.append(1)
        counts[:] = [6, 2]
        return iter(samples), None

    counts: list[int] = []
    prepare_cache(tmp_path / "old", {"k": 1}, make, is_writer=True, num_sources=1, source_samples=counts)
    assert not calls  # one source: the old cache is complete
    c = prepare_cache(tmp_path / "old", {"k": 1}, make, is_writer=True, num_sources=2, source_samples=counts)
    assert calls == [1] and c.manifest.source_samples == [6, 2]
    prepare_cache(tmp_path / "old", {"k": 1}, make, is_writer=True, num_sources=2, source_samples=counts)
    assert calls == [1]  # now complete: kept
