"""Shared fixtures: the tiny synthetic dataset and recipe, and the ``../shared`` data folder.

Markers: ``slow`` marks tests that start processes (gloo launches, torchrun, sbatch);
``pytest -m "not slow"`` runs the in-process unit tests alone in about a minute.
"""

from __future__ import annotations

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
def reference_runs(tmp_path_factory) -> dict:
    """The trainer's PSFT and sft_kl runs that the float64 reference trainer checks
    (tests/reference_runs.py): trained together, once per session."""
    import reference_runs

    return reference_runs.train_all(tmp_path_factory.mktemp("reference_runs"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared`` beside the checkout (real data, tokenizers, models); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED
