"""Which step checkpoints survive a save: the keep_last newest, the multiples of keep_every, never the
step just saved; other folders in the save directory are left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from psft_megatron.checkpoint.config import CheckpointConfig
from psft_megatron.checkpoint.train_checkpoint import prune_checkpoints
from psft_megatron.config.load import FieldError


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*") if p.name[5:].isdigit())


@pytest.mark.parametrize("keep_last, keep_every, expected", [
    (2, 0, [50, 60]),
    (1, 0, [60]),
    (0, 0, [10, 20, 30, 40, 50, 60]),  # 0 keeps all
    (1, 20, [20, 40, 60]),
    (2, 30, [30, 50, 60]),
])
def test_prune_keeps_the_newest_and_the_multiples(tmp_path, keep_last, keep_every, expected):
    for s in range(10, 70, 10):
        (tmp_path / f"step_{s:06d}").mkdir()
    (tmp_path / "other").mkdir()
    prune_checkpoints(tmp_path, 60, keep_last, keep_every)
    assert _steps(tmp_path) == expected
    assert (tmp_path / "other").is_dir()


def test_a_later_step_on_disk_is_not_counted_or_deleted(tmp_path):
    """A resumed run saving step 30 while step 40 (from before the resume) is still there."""
    for s in (10, 20, 30, 40):
        (tmp_path / f"step_{s:06d}").mkdir()
    prune_checkpoints(tmp_path, 30, 1, 0)
    assert _steps(tmp_path) == [30, 40]


def test_keep_every_must_fall_on_saved_steps():
    CheckpointConfig(save_interval=40, keep_every=80, allow_random_init=True).validate()
    with pytest.raises(FieldError, match="checkpoint.keep_every"):
        CheckpointConfig(save_interval=40, keep_every=60, allow_random_init=True).validate()


def test_weights_only_needs_checkpoints_kept_by_keep_every():
    CheckpointConfig(save_interval=40, keep_every=80, keep_every_weights_only=True, allow_random_init=True).validate()
    for bad in ({"keep_every": 0}, {"keep_every": 80, "keep_last": 0}):
        cfg = CheckpointConfig(save_interval=40, keep_every_weights_only=True, allow_random_init=True, **bad)
        with pytest.raises(FieldError, match="checkpoint.keep_every_weights_only"):
            cfg.validate()
