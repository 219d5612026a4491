"""Sources: JSONL (+gz), JSON, Parquet and the ``datasets`` path, with provenance.

The ``datasets`` code path is exercised offline: the ``json``/``parquet`` builders on
local files, a local dataset directory, and a hub name under HF_HUB_OFFLINE (which shows
the call reaches ``datasets.load_dataset`` and fails with a clear DataError).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from psft_megatron.data.config import AdapterConfig, DataSourceConfig
from psft_megatron.data.errors import DataError, ErrorPolicy
from psft_megatron.data.sources import iter_records, resolve_format

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).parents[1] / ".." / "shared"
GSM8K = SHARED / "data/gsm8k/train.jsonl"
needs_shared = pytest.mark.skipif(not GSM8K.is_file(), reason="../shared not available")

ROWS = [
    {"prompt": "Say hi", "response": "Hi!"},
    {"prompt": "Count to 3", "response": "1, 2, 3"},
    {"prompt": "Café?", "response": "Oui ’ 😀"},
]


def records(**kw):
    return list(iter_records(DataSourceConfig(**kw)))


def test_jsonl_gz_json_and_wrapped_json(tmp_path):
    jl = tmp_path / "rows.jsonl"
    # blank lines keep true line numbers and are not records
    jl.write_text(json.dumps(ROWS[0]) + "\n\n" + "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS[1:]) + "\n", encoding="utf-8")
    gz = tmp_path / "rows.jsonl.gz"
    gz.write_bytes(gzip.compress(jl.read_bytes()))
    arr = tmp_path / "rows.json"
    arr.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    lines_as_json = tmp_path / "lines.json"  # JSON Lines named .json, as often on the hub
    lines_as_json.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")

    for p, lines in [(jl, [1, 3, 4]), (gz, [1, 3, 4]), (arr, [1, 2, 3]), (lines_as_json, [1, 2, 3])]:
        recs = records(path=str(p))
        assert [r.fields for r in recs] == ROWS, p
        assert [(r.provenance.path, r.provenance.line) for r in recs] == [(str(p), n) for n in lines]
    wrapped = records(path=str(DATA / "data_wrapper.json"))
    assert [r.fields["prompt"] for r in wrapped] == ["Say hi", "Say bye"]
    assert str(wrapped[1].provenance) == f"{DATA / 'data_wrapper.json'}:2"
    assert len(records(path=str(jl), limit=2)) == 2


def test_utf8_bom_is_not_an_error(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert records(path=str(p))[0].fields == ROWS[0]


def test_parquet_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), p, row_group_size=2)
    recs = records(path=str(p))
    assert [r.fields for r in recs] == ROWS and [r.provenance.line for r in recs] == [1, 2, 3]
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file") as ei:
        records(path=str(bad))
    assert ei.value.path == str(bad)


def test_datasets_builders_on_local_files(tmp_path):
    """The datasets code path: load_dataset("json"/"parquet", data_files=...) on local files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = tmp_path / "rows.jsonl"
    jl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    pqf = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), pqf)
    cache = str(tmp_path / "hf_cache")
    for builder, f in (("json", jl), ("parquet", pqf)):
        cfg = DataSourceConfig(path=builder, data_files=str(f), cache_dir=cache)
        assert resolve_format(cfg) == "datasets"
        recs = list(iter_records(cfg))
        assert [r.fields for r in recs] == ROWS
        assert [str(r.provenance) for r in recs] == [f"{builder}[train]:{i}" for i in (1, 2, 3)]
    streamed = list(iter_records(DataSourceConfig(path="json", data_files=str(jl), streaming=True, cache_dir=cache)))
    assert [r.fields for r in streamed] == ROWS


def test_local_dataset_directory(tmp_path):
    """A directory is handed to datasets.load_dataset like a hub name (splits from file names)."""
    d = tmp_path / "my_dataset"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    (d / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    cache = str(tmp_path / "hf_cache")
    assert [r.fields for r in records(path=str(d), cache_dir=cache)] == ROWS
    test = records(path=str(d), split="test", cache_dir=cache)
    assert [r.fields for r in test] == ROWS[:1] and str(test[0].provenance) == f"{d}[test]:1"
    with pytest.raises(DataError, match="datasets.load_dataset") as ei:
        records(path=str(d), split="validation", cache_dir=cache)
    assert ei.value.path == f"{d}[validation]" and "validation" in str(ei.value)


def test_hub_names_go_through_datasets_and_hub_offline(tmp_path):
    """A hub dataset name dispatches to datasets.load_dataset and a hub tokenizer name to
    huggingface_hub; offline both fail with a clear DataError, not a library traceback."""
    code = (
        "from psft_megatron.data.config import DataSourceConfig\n"
        "from psft_megatron.data.sources import iter_records\n"
        "from psft_megatron.data.errors import DataError\n"
        "try:\n"
        "    list(iter_records(DataSourceConfig(path='openai/gsm8k', subset='main', split='train')))\n"
        "except DataError as e:\n"
        "    print('PATH', e.path); print('MSG', e)\n"
        "from psft_megatron.data.tokenizer import load_tokenizer\n"
        "try:\n"
        "    load_tokenizer('HuggingFaceTB/SmolLM2-135M-Instruct')\n"
        "except DataError as e:\n"
        "    print('TOK', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "PATH openai/gsm8k/main[train]" in out.stdout
    assert "datasets.load_dataset('openai/gsm8k', 'main', split='train') failed" in out.stdout
    assert "TOK HuggingFaceTB/SmolLM2-135M-Instruct: cannot fetch tokenizer from the hub" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


@needs_shared
def test_real_files_stream_with_provenance():
    recs = records(path=str(GSM8K), limit=5)
    assert [r.provenance.line for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0].fields["question"].startswith("Natalia sold clips")
    hh = SHARED / "data/hh/harmless-base_test.jsonl.gz"
    assert resolve_format(DataSourceConfig(path=str(hh))) == "jsonl"
    assert len(records(path=str(hh), limit=300)) == 300


def test_config_from_yaml_mapping():
    cfg = DataSourceConfig.from_dict({
        "path": "data/gsm8k/train.jsonl",
        "adapter": "gsm8k",
        "adapter_options": {"strip_calculator_notes": True, "system_prompt": "Solve it."},
        "max_length": 1024,
        "long_sample": "truncate_response",
        "on_error": "skip",
    })
    assert isinstance(cfg.adapter_options, AdapterConfig) and cfg.adapter_options.strip_calculator_notes
    assert cfg.fingerprint() == DataSourceConfig.from_dict({**cfg.__dict__, "on_error": "raise"}).fingerprint()
    assert cfg.fingerprint() != DataSourceConfig.from_dict({**cfg.__dict__, "max_length": 512}).fingerprint()
    with pytest.raises(ValueError, match="unknown key source.max_len"):
        DataSourceConfig.from_dict({"path": "x.jsonl", "max_len": 5})
    with pytest.raises(ValueError, match="unknown key source.adapter_options.strip_notes"):
        DataSourceConfig.from_dict({"path": "x.jsonl", "adapter_options": {"strip_notes": True}})
    with pytest.raises(ValueError, match="long_sample"):
        DataSourceConfig(path="x.jsonl", long_sample="cut")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error"):
        DataSourceConfig(path="x.jsonl", on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train_on"):
        AdapterConfig(train_on="first")  # type: ignore[arg-type]


def test_policy_is_shared_with_the_reader(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"a": 1}\n{"a": \n[1]\n\xff\n{"a": 2}\n')
    pol = ErrorPolicy("skip")
    recs = list(iter_records(DataSourceConfig(path=str(p)), pol))
    assert [r.fields for r in recs] == [{"a": 1}, {"a": 2}]
    assert pol.report.counts == {"malformed_json": 1, "not_an_object": 1, "invalid_utf8": 1}
    assert pol.report.examples["invalid_utf8"] == [f"{p}:4"]
