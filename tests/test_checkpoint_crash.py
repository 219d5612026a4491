"""A crash in the middle of a checkpoint save leaves the last good checkpoint loadable.

The run saves at step 4, then is killed (SIGKILL, no cleanup) while saving step 8:
once after the optimizer state is written but before the checkpoint is published, once
in the middle of writing the weights. Each time a fresh launch must resume from step 4.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest

from psft_megatron.data.synthetic import write_tiny_dataset
from psft_megatron.testing.multiproc import MultiProcessError, run_in_processes

pytestmark = pytest.mark.slow  # every test here starts processes


def _recipe(data: Path, run: Path) -> dict:
    return {
        "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "vocab_size": 384, "max_position_embeddings": 64,
                  "params_dtype": "fp32", "transformer_impl": "local"},
        "training": {"seq_length": 64, "global_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 2,
                     "train_steps": 8, "seed": 3},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
        "data": {"train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": 64}],
                 "tokenizer": str(data / "tokenizer"), "chat_template": "plain", "cache_dir": str(data / "cache")},
        "checkpoint": {"allow_random_init": True, "save_interval": 4, "keep_last": 0},
        "logging": {"run_dir": str(run), "tensorboard": False},
    }


def _die() -> None:
    """SIGKILL this rank and its child processes, as a scheduler kills a job step (megatron's
    checkpoint writer starts a multiprocessing Manager process, which would outlive the rank)."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _train(recipe_dict: dict, crash_at: str | None = None) -> list[int]:
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run

    if crash_at == "publish":
        real_replace = os.replace

        def replace(src, dst):  # die right before step 8 is published
            if str(dst).endswith("step_000008") and str(src).endswith(".partial"):
                _die()
            return real_replace(src, dst)

        os.replace = replace
    elif crash_at == "weights":
        import megatron.core.dist_checkpointing as dcp

        real_save = dcp.save

        def save(state, path, *a, **kw):  # die while step 8's weights are being written
            if "step_000008" in str(path):
                _die()
            return real_save(state, path, *a, **kw)

        dcp.save = save
    return [r["step"] for r in run(recipe_from_dict(copy.deepcopy(recipe_dict))).records]


@pytest.mark.parametrize("crash_at", ["publish", "weights"])
def test_crash_during_save_keeps_last_checkpoint(tmp_path, crash_at):
    write_tiny_dataset(tmp_path / "data", train=200, eval=8)
    recipe = _recipe(tmp_path / "data", tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    with pytest.raises(MultiProcessError, match="exit -9"):
        run_in_processes(_train, 1, kwargs={"recipe_dict": recipe, "crash_at": crash_at}, timeout=240)
    assert (ckpts / "latest").read_text() == "step_000004"
    assert not (ckpts / "step_000008").exists()
    assert list(ckpts.glob("step_000008.partial"))  # what the crash left behind
    assert json.loads((ckpts / "step_000004" / "train_state.json").read_text())["step"] == 4

    steps = run_in_processes(_train, 1, kwargs={"recipe_dict": recipe}, timeout=240)[0]
    assert steps == [5, 6, 7, 8]  # resumed from the last good checkpoint
    assert (ckpts / "latest").read_text() == "step_000008"
    assert not list(ckpts.glob("step_000008.partial"))
    # The crashed launch had logged steps 5..8 before dying in the save; the resumed launch
    # redid them: each step appears once, from the run that counts.
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 9))

    if crash_at == "publish":  # once is enough: a fresh run must not write into these checkpoints
        fresh = copy.deepcopy(recipe)
        fresh["checkpoint"]["resume"] = False
        with pytest.raises(MultiProcessError, match="checkpoint.resume is false but .* already holds checkpoints"):
            run_in_processes(_train, 1, kwargs={"recipe_dict": fresh}, timeout=240)
