"""Shared fixtures: the tiny synthetic dataset and recipe, and the ``../shared`` data folder.

Markers: ``slow`` marks tests that start processes (gloo launches, torchrun, sbatch);
``pytest -m "not slow"`` runs the in-process unit tests alone in about a minute.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from psft_megatron.data.synthetic import write_tiny_dataset
from psft_megatron.testing.recipes import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The synthetic arithmetic chat data and its tokenizer (written once per session)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data", train=480, eval=96)


@pytest.fixture
def tiny(tiny_data, tmp_path):
    """``tiny(**sections)``: the tiny recipe dict over ``tiny_data``, running in this test's tmp_path."""

    def make(**sections):
        return tiny_recipe(tiny_data, tmp_path / "run", **sections)

    return make


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared`` beside the checkout (real data, tokenizers, models); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_hf(request, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct dequantised from ``../shared``'s GGUF by the project's reader, as an HF
    folder with its tokenizer; skips without the GGUF. pytest's cache keeps it across sessions
    (dequantising takes ~20 s); without the cache plugin it is made once per session. A file lock
    lets parallel pytest workers share the cache entry."""
    from filelock import FileLock

    from psft_megatron.conversion.gguf import load_gguf_llama

    gguf = SHARED / "models" / "smollm2-135m-instruct-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = SHARED / "tokenizers" / "smollm2"
    if not gguf.is_file() or not tokenizer.is_dir():
        pytest.skip("../shared has no SmolLM2 GGUF or tokenizer")
    pytest_cache = getattr(request.config, "cache", None)
    cache = Path(pytest_cache.mkdir("psft_smollm2_hf")) if pytest_cache else tmp_path_factory.mktemp("smollm2_hf")
    with FileLock(str(cache) + ".lock"):
        stamp, key = cache / "stamp.txt", str(gguf.stat().st_size)
        if not (stamp.is_file() and stamp.read_text() == key):
            shutil.rmtree(cache)
            cache.mkdir()
            load_gguf_llama(gguf).save_pretrained(cache)
            for f in tokenizer.iterdir():
                shutil.copy2(f, cache / f.name)
            stamp.write_text(key)
    return cache
