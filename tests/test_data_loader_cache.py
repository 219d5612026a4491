"""Token cache: round trip, atomic publication under a concurrent reader, stale caches refused or rebuilt."""

import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from psft_megatron.data.cache import (
    CacheError,
    CacheMissingError,
    StaleCacheError,
    open_cache,
    prepare_cache,
    read_manifest,
    wait_for_cache,
    write_cache,
)
from psft_megatron.data.loader import LoaderConfig, PackedLoader
from psft_megatron.data.store import InMemorySamples
from psft_megatron.data.types import SkipReport, TokenizedSample

IDENT = {"tokenizer": {"name": "tok-a", "sha256": "aaa"}, "source": {"path": "x.jsonl", "sha256": "111"}, "max_length": 64}


def _samples(n=120, seed=0):
    rng = np.random.default_rng(seed)
    return [
        TokenizedSample(rng.integers(0, 50000, k).astype(np.int32), (rng.random(k) < 0.5).astype(np.uint8))
        for k in rng.integers(1, 64, n)
    ]


def test_round_trip_equals_direct_samples(tmp_path):
    samples = _samples()
    report = SkipReport()
    report.add("too_long", "x.jsonl:3")
    m = write_cache(tmp_path / "c", iter(samples), IDENT, report)
    assert m.n_samples == len(samples) and m.n_tokens == sum(len(s) for s in samples)
    assert m.skip_report["counts"] == {"too_long": 1}
    assert m.max_length == max(len(s) for s in samples)
    cached = open_cache(tmp_path / "c", IDENT, verify=True)
    mem = InMemorySamples(samples)
    assert cached.fingerprint == mem.fingerprint
    assert np.array_equal(cached.lengths, mem.lengths) and np.array_equal(cached.loss_tokens, mem.loss_tokens)
    for i, s in enumerate(samples):
        ids, mask = cached.get(i)
        assert ids.dtype == np.int32 and mask.dtype == np.uint8
        assert np.array_equal(ids, s.input_ids) and np.array_equal(mask, s.loss_mask)
    assert not cached.tokens.flags.writeable  # mapped read-only
    # The loader sees the same batches from the cache as from memory.
    cfg = LoaderConfig(seq_length=64, global_batch_size=8, mini_batch_size=4, micro_batch_size=2)
    a, b = PackedLoader(cached, cfg, 1, 2), PackedLoader(mem, cfg, 1, 2)
    for _ in range(3):
        ga, gb = next(a), next(b)
        for ma, mb in zip(ga.mini_batches, gb.mini_batches):
            for x, y in zip(ma.micro_batches, mb.micro_batches):
                assert torch.equal(x.tokens, y.tokens) and torch.equal(x.loss_mask, y.loss_mask)


def test_corruption_detected_by_verify(tmp_path):
    write_cache(tmp_path / "c", _samples(), IDENT)
    with open(tmp_path / "c" / "tokens.bin", "r+b") as f:
        f.seek(17)
        b = f.read(1)
        f.seek(17)
        f.write(bytes([b[0] ^ 0xFF]))
    open_cache(tmp_path / "c", IDENT)  # sizes still fine
    with pytest.raises(CacheError, match="corrupt"):
        open_cache(tmp_path / "c", IDENT, verify=True)


def test_reader_waits_and_never_sees_half_written_cache(tmp_path):
    final = tmp_path / "c"
    samples = _samples(200)
    half, go = threading.Event(), threading.Event()

    def slow():
        for i, s in enumerate(samples):
            if i == 100:
                half.set()
                assert go.wait(30)
            yield s

    errors = []
    writer = threading.Thread(target=lambda: write_cache(final, slow(), IDENT))
    result = {}

    def reader():
        try:
            result["c"] = wait_for_cache(final, IDENT, timeout=30, poll=0.005)
        except Exception as e:  # surfaced below
            errors.append(e)

    writer.start()
    assert half.wait(30)
    # Mid-write: nothing visible at the final path.
    assert not final.exists() and read_manifest(final) is None
    with pytest.raises(CacheMissingError):
        open_cache(final, IDENT)
    r = threading.Thread(target=reader)
    r.start()
    r.join(0.3)
    assert r.is_alive()  # still waiting for the writer
    go.set()
    writer.join(30)
    r.join(30)
    assert not errors
    c = result["c"]
    assert len(c) == 200 and c.fingerprint == InMemorySamples(samples).fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # temp dir gone


def test_racing_writers_publish_one_cache(tmp_path):
    samples = _samples()
    out, errs = [], []

    def w():
        try:
            out.append(write_cache(tmp_path / "c", iter(samples), IDENT))
        except Exception as e:
            errs.append(e)

    ts = [threading.Thread(target=w) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errs and len({m.content_fingerprint for m in out}) == 1
    open_cache(tmp_path / "c", IDENT, verify=True)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_stale_cache_refused_with_clear_message_or_rebuilt(tmp_path):
    write_cache(tmp_path / "c", _samples(seed=0), IDENT)
    old = open_cache(tmp_path / "c", IDENT)
    other = {**IDENT, "tokenizer": {"name": "tok-b", "sha256": "bbb"}}
    with pytest.raises(StaleCacheError, match=r"tokenizer: cache has .*tok-a.*run wants .*tok-b"):
        open_cache(tmp_path / "c", other)
    with pytest.raises(StaleCacheError, match="rebuild_stale"):
        write_cache(tmp_path / "c", _samples(seed=1), other)
    with pytest.raises(StaleCacheError):
        wait_for_cache(tmp_path / "c", other, timeout=5)

    new_samples = _samples(seed=1)
    calls = []

    def make():
        calls.append(1)
        return iter(new_samples), None

    c = prepare_cache(tmp_path / "c", other, make, is_writer=True, rebuild_stale=True)
    assert c.fingerprint == InMemorySamples(new_samples).fingerprint and c.manifest.identity == other
    assert np.array_equal(old.get(3)[0], _samples(seed=0)[3].input_ids)  # old maps stay valid
    # Built once: a second prepare (writer or not) reuses it.
    prepare_cache(tmp_path / "c", other, make, is_writer=True)
    prepare_cache(tmp_path / "c", other, make, is_writer=False, timeout=5)
    assert calls == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_refuses_to_replace_a_directory_that_is_not_a_cache(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("x")
    with pytest.raises(CacheError, match="not a cache"):
        write_cache(tmp_path / "c", _samples(), IDENT, rebuild_stale=True)
    assert (tmp_path / "c" / "precious.txt").exists()


def test_empty_dataset_round_trip(tmp_path):
    write_cache(tmp_path / "c", [], IDENT)
    c = open_cache(tmp_path / "c", IDENT, verify=True)
    assert len(c) == 0 and c.manifest.n_tokens == 0


REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO.parent / "shared" / "tokenizers" / "smollm2"


@pytest.mark.skipif(not SMOLLM2.is_dir(), reason="needs ../shared/tokenizers/smollm2")
def test_prepare_data_tool_matches_ingest_and_refuses_stale(tmp_path, capsys):
    from psft_megatron.data.config import DataSourceConfig
    from psft_megatron.data.encode import iter_tokenized
    from psft_megatron.data.prepare import prepare_dataset
    from psft_megatron.data.templates import load_template
    from psft_megatron.data.tokenizer import load_tokenizer

    spec = importlib.util.spec_from_file_location("prepare_data_tool", REPO / "tools" / "prepare_data.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    src = tmp_path / "mini.jsonl"
    src.write_text(
        "\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = <<{i}+{i}={2*i}>>{2*i}\n#### {2*i}"}) for i in range(30))
        + "\n"
    )
    out = tmp_path / "cache"
    argv = ["--tokenizer", str(SMOLLM2), "--path", str(src), "--adapter", "gsm8k", "--max-length", "256", "--out", str(out)]
    assert tools.main(argv) == 0
    assert "30 samples" in capsys.readouterr().out

    tok = load_tokenizer(SMOLLM2)
    direct = list(iter_tokenized(DataSourceConfig(path=str(src), adapter="gsm8k", max_length=256), tok, load_template(None, tok)))
    cached = open_cache(out, verify=True)
    assert len(cached) == len(direct) == 30
    for i, s in enumerate(direct):
        assert np.array_equal(cached.get(i)[0], s.input_ids) and np.array_equal(cached.get(i)[1], s.loss_mask)
    assert cached.manifest.identity["tokenizer"]["pad_id"] == tok.pad_id
    # A non-writer rank with the same sources maps the same cache without tokenising.
    other = prepare_dataset(out, [DataSourceConfig(path=str(src), adapter="gsm8k", max_length=256)], SMOLLM2, is_writer=False, timeout=5)
    assert other.fingerprint == cached.fingerprint
    # Different settings -> stale, reported without a traceback.
    assert tools.main(argv[:-4] + ["--max-length", "128", "--out", str(out)]) == 2
    assert "stale cache" in capsys.readouterr().err
