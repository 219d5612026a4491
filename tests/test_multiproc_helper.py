"""The multi-process helper itself: results come back per rank, failures and hangs surface."""

import tempfile
import time

import pytest
import torch
import torch.distributed as dist

from psft_megatron.testing.multiproc import MultiProcessError, run_in_processes

pytestmark = pytest.mark.slow  # every test here starts processes


def _allreduce_rank(scale: float) -> float:
    t = torch.tensor([float(dist.get_rank()) * scale])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one() -> None:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()  # rank 0 would hang here forever without the helper's kill


def _hang() -> None:
    if dist.get_rank() == 0:
        dist.barrier()  # waits for rank 1, which never arrives
    else:
        time.sleep(600)


def test_results_per_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the launch keeps its logs and results
    assert run_in_processes(_allreduce_rank, 2, kwargs={"scale": 3.0}, timeout=60) == [3.0, 3.0]
    assert list(tmp_path.iterdir()) == []  # and removes them


def test_failure_shows_child_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(MultiProcessError, match="boom on rank one"):
        run_in_processes(_fail_on_rank_one, 2, timeout=60)
    assert list(tmp_path.iterdir()) == []  # the error message carries the logs' tails


def test_hang_times_out():
    with pytest.raises(MultiProcessError, match="timed out"):
        run_in_processes(_hang, 2, timeout=8)
