"""Fault injection on the real entry point: nothing lost, nothing broken saved, every failure one line.

- SIGKILL at three steps, relaunched until done: the records and final weights equal a
  clean run's bit for bit (only work since the last checkpoint is redone).
- SIGUSR1 on one rank of two (each with two micro-batches per mini-batch), and SIGTERM inside
  the second pass of ``training.passes_per_snapshot: 2``: the step in flight finishes,
  every rank saves, exit 75; the relaunch continues inside the same global batch and ends
  bit-identical to an uninterrupted run at the same layout. The rank signals itself as a chosen
  step begins (the test-only hook ``PSFT_TEST_SIGNAL_AT_STEP``), so the stop lands where the
  test needs it, every time.
- NaN injected into one step's loss: that step is skipped on every rank (weights, optimizer
  state and LR schedule untouched); a learning rate of 1e6 diverges: exit 3, one line.
- A full disk (a small tmpfs, as root) during a save: one line naming the path and the OS
  error, exit 2, the previous checkpoint intact and resumable.
- A corrupted latest checkpoint: the relaunch falls back to the previous one and ends
  bit-identical; with every checkpoint corrupted it says which and why, exit 2.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from psft_megatron.runtime.distributed import free_port
from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe
from psft_megatron.training.stopping import TEST_SIGNAL_ENV

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "pretrain_psft.py"
COMPARED = ("loss", "entropy", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "mean_logp", "grad_norm", "lr")
# k = 4 mini-batches per global batch.
TRAINING = {"global_batch_size": 8, "mini_batch_size": 2, "micro_batch_size": 2, "train_steps": 16,
            "sft_warmup_steps": 4, "eval_interval": 0}


def _write_recipe(tmp: Path, data: Path, name: str, **sections: Any) -> Path:
    recipe = tiny_recipe(data, tmp / name, training=dict(TRAINING, **sections.pop("training", {})), **sections)
    recipe["data"]["eval"] = []
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _launch(recipe: Path, *overrides: str, nproc: int = 1, env: dict[str, str] | None = None,
            rank_env: dict[int, dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """Start the entry point as ``nproc`` torchrun-like ranks (``rank_env``: variables for one rank
    only); their output goes to files (a pipe nobody reads while the test polls would fill up and
    stall the run)."""
    port = str(free_port())
    procs = []
    # The test-only signal hook reaches only the ranks a test gives it to.
    outer = {k: v for k, v in os.environ.items() if k != TEST_SIGNAL_ENV}
    for rank in range(nproc):
        e = dict(outer, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, OMP_NUM_THREADS="1", **(env or {}), **(rank_env or {}).get(rank, {}))
        log = open(recipe.parent / f"{recipe.stem}.rank{rank}.{time.monotonic_ns()}.log", "w+")
        # Its own session: a SIGKILL goes to the rank's process group, as a scheduler kills a job step,
        # so the helper processes it started (megatron's checkpoint writer starts a multiprocessing
        # Manager) die with it instead of outliving the test.
        p = subprocess.Popen([sys.executable, str(LAUNCHER), str(recipe), *overrides], env=e,
                             stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        p.log = log  # type: ignore[attr-defined]
        procs.append(p)
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """(exit status, output) of each rank."""
    out = []
    for p in procs:
        p.wait(timeout=timeout)
        p.log.seek(0)  # type: ignore[attr-defined]
        out.append((p.returncode, p.log.read()))  # type: ignore[attr-defined]
        p.log.close()  # type: ignore[attr-defined]
    return out


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "split" not in r]


def _wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = _records(run_dir)
        if recs and recs[-1]["step"] >= step:
            return
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"the run ended before step {step}: {[p.returncode for p in procs]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _final_weights(run_dir: Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors (default: the latest), read straight from the dist-checkpoint files."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    name = name or (run_dir / "checkpoints" / "latest").read_text().strip()
    ckpt = run_dir / "checkpoints" / name / "model"
    sd: dict[str, Any] = {}
    load(sd, storage_reader=FileSystemReader(str(ckpt)), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _same_records(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for g, r in zip(got, ref):
        for key in COMPARED:
            assert g[key] == r[key], f"step {r['step']} {key}: {g[key]} vs {r[key]}"


@pytest.fixture(scope="module")
def data(tiny_data) -> Path:
    return tiny_data


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run every fault is compared with."""
    tmp = tmp_path_factory.mktemp("clean")
    recipe = _write_recipe(tmp, data, "run", checkpoint={"save_interval": 4, "keep_last": 0, "save_at_end": True})
    ((code, err),) = _wait(_launch(recipe))
    assert code == 0, err[-3000:]
    size = sum(f.stat().st_size for f in (tmp / "run" / "checkpoints" / "step_000004").rglob("*") if f.is_file())
    return {"records": _records(tmp / "run"), "weights": _final_weights(tmp / "run"), "checkpoint_bytes": size}


def test_sigkill_at_three_steps_then_relaunch_equals_a_clean_run(clean, data, tmp_path):
    recipe = _write_recipe(tmp_path, data, "run", checkpoint={"save_interval": 4, "keep_last": 2, "save_at_end": True})
    # Kill points fixed up front: one inside the SFT warm-up, one mid global batch, one past the
    # last full checkpoint interval. Each is strictly ahead of the records the relaunch starts
    # from (a relaunch resumes at or before its last record), so every one really kills a run;
    # where in the step the SIGKILL lands is up to timing.
    kill_after = [3, 9, 14]
    kills = 0
    for _ in range(len(kill_after) + 2):
        procs = _launch(recipe)
        done = _records(tmp_path / "run")
        ahead = [s for s in kill_after if s > (done[-1]["step"] if done else 0)]
        if ahead and kills < len(kill_after):
            _wait_for_step(tmp_path / "run", ahead[0], procs)
            os.killpg(procs[0].pid, signal.SIGKILL)
            kills += 1
        ((code, err),) = _wait(procs)
        status = tmp_path / "run" / "run_status.json"
        if code == 0 and json.loads(status.read_text())["status"] == "finished":
            break
        assert code == -signal.SIGKILL, err[-3000:]  # killed, nothing else went wrong
    assert kills == len(kill_after), "the loop must really have killed the run at every kill point"
    _same_records(_records(tmp_path / "run"), clean["records"])
    got = _final_weights(tmp_path / "run")
    assert set(got) == set(clean["weights"])
    for k, v in clean["weights"].items():
        assert torch.equal(got[k], v), k


def _clean_run(tmp: Path, data: Path, nproc: int, training: dict[str, Any]) -> dict[str, Any]:
    """An uninterrupted run at a layout: its records and final weights."""
    tmp.mkdir(parents=True, exist_ok=True)
    recipe = _write_recipe(tmp, data, "run", checkpoint={"save_interval": 0, "save_at_end": True}, training=training)
    results = _wait(_launch(recipe, nproc=nproc))
    assert [c for c, _ in results] == [0] * nproc, [e[-2000:] for _, e in results]
    return {"records": _records(tmp / "run"), "weights": _final_weights(tmp / "run")}


# name: (signal, processes, the rank that signals itself, training overrides, the step the signal
# arrives in: the stop comes after it). Each stop falls inside a global batch (asserted below).
SIGNAL_CASES = {
    # DP=2 with 2 micro-batches of 1 row per rank and mini-batch (k = 2: global batch 3 is steps 5, 6);
    # one rank only is signalled: the other learns of it at the step boundary.
    "sigusr1_dp2_two_micro_batches": (signal.SIGUSR1, 2, 1, {"mini_batch_size": 4, "micro_batch_size": 1}, 5),
    # Two passes over each global batch (k = 4, 8 steps per global batch; warm-up = the first one):
    # stopped after the second pass's first mini-batch, so the next three train on logp_old that only
    # the checkpoint holds.
    "sigterm_second_pass": (signal.SIGTERM, 1, 0, {"passes_per_snapshot": 2, "sft_warmup_steps": 8}, 13),
}


@pytest.mark.parametrize("case", list(SIGNAL_CASES))
def test_signal_finishes_the_step_saves_and_resumes_bit_identical(data, tmp_path, case):
    sig, nproc, signalled, training, at_step = SIGNAL_CASES[case]
    reference = _clean_run(tmp_path / "clean", data, nproc, training)
    recipe = _write_recipe(tmp_path, data, "run", checkpoint={"save_interval": 0, "save_at_end": True},
                           training=training)
    settings = dict(TRAINING, **training)
    k = settings["global_batch_size"] // settings["mini_batch_size"]
    per_global_batch = k * settings.get("passes_per_snapshot", 1)
    assert at_step % per_global_batch != 0, "the case must stop inside a global batch"
    hook = {signalled: {TEST_SIGNAL_ENV: f"{at_step}:{signal.Signals(sig).name}"}}
    results = _wait(_launch(recipe, nproc=nproc, rank_env=hook))
    assert [c for c, _ in results] == [75] * nproc, [e[-2000:] for _, e in results]
    assert "test hook" in results[signalled][1]  # the signal came from the hook, at the step chosen
    status = json.loads((tmp_path / "run" / "run_status.json").read_text())
    assert status["status"] == "preempted" and signal.Signals(sig).name in status["reason"]
    assert status["step"] == at_step  # the step in flight finished, and no other began
    assert _records(tmp_path / "run")[-1]["step"] == at_step  # nothing done is lost
    ckpt = tmp_path / "run" / "checkpoints" / f"step_{at_step:06d}"
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    # Saved inside the global batch, with the snapshot log-probs of the steps still to run.
    batch = json.loads((ckpt / "train_state.json").read_text())["batch"]
    assert batch["active"] and batch["next_mini"] == at_step % per_global_batch
    assert list((ckpt / "shards").glob("rank_*.pt"))

    results = _wait(_launch(recipe, nproc=nproc))
    assert [c for c, _ in results] == [0] * nproc, [e[-2000:] for _, e in results]
    _same_records(_records(tmp_path / "run"), reference["records"])
    got = _final_weights(tmp_path / "run")
    assert set(got) == set(reference["weights"])
    for name, value in reference["weights"].items():
        assert torch.equal(got[name], value), name


def _nan_run(recipe_dict: dict, nan_steps: list[int], nan_rank: int) -> dict:
    """A clean run, then the same run with NaN logits on rank ``nan_rank`` at the given optimizer
    steps; records whether each step changed the weights and the optimizer state."""
    import torch.distributed as dist

    import psft_megatron.training.loop as loop
    from psft_megatron.model.build import unwrap_model
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run

    real_train_step = loop.train_step

    def state(bundle: Any) -> tuple[torch.Tensor, torch.Tensor]:
        params = torch.cat([p.detach().flatten().double() for c in bundle.model for p in c.parameters()])
        moments = [v.detach().flatten().double() for opt in getattr(bundle.optimizer, "chained_optimizers",
                                                                     [bundle.optimizer])
                   for st in opt.optimizer.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0]
        return params, torch.cat(moments) if moments else torch.zeros(1)

    def watched(nan_at: list[int]) -> dict:
        seen: list[dict] = []

        def train_step(bundle, mini, objective, setup, *passes):  # passes: logp_old, logp_ref
            handles = []
            if len(seen) + 1 in nan_at and dist.get_rank() == nan_rank:
                for chunk in bundle.model:  # NaN logits, as a numerical blow-up in the model gives
                    head = unwrap_model(chunk).output_layer
                    handles.append(head.register_forward_hook(lambda m, i, out: (out[0] * float("nan"), out[1])))
            before = state(bundle)
            result = real_train_step(bundle, mini, objective, setup, *passes)
            after = state(bundle)
            for h in handles:
                h.remove()
            seen.append({"skipped": result.skipped, "params_same": torch.equal(before[0], after[0]),
                         "moments_same": torch.equal(before[1], after[1]), "lr": result.lr})
            return result

        loop.train_step = train_step
        try:
            result = run(recipe_from_dict(copy.deepcopy(recipe_dict)))
        finally:
            loop.train_step = real_train_step
        return {"steps": seen, "records": result.records, "skipped": result.skipped_steps}

    clean = watched([])
    recipe_dict = copy.deepcopy(recipe_dict)
    recipe_dict["logging"]["run_dir"] += "_nan"
    return {"clean": clean, "nan": watched(nan_steps)}


def test_a_non_finite_step_is_skipped_on_every_rank(data, tmp_path):
    recipe = tiny_recipe(data, tmp_path / "run", training=dict(TRAINING, train_steps=8, micro_batch_size=1))
    recipe["data"]["eval"] = []
    out = run_in_processes(_nan_run, 2, kwargs={"recipe_dict": recipe, "nan_steps": [6], "nan_rank": 1},
                           timeout=400)
    for rank_out in out:  # every rank decided the same, though only rank 1 saw NaN
        steps, clean = rank_out["nan"]["steps"], rank_out["clean"]["steps"]
        assert [s["skipped"] for s in clean] == [False] * 8
        assert [s["skipped"] for s in steps] == [False] * 5 + [True] + [False] * 2
        assert steps[5]["params_same"] and steps[5]["moments_same"]  # nothing applied, optimizer untouched
        assert not steps[4]["params_same"] and not steps[6]["params_same"]  # the steps around it do train
        # The LR schedule did not advance on the skipped step: steps 7 and 8 run at lr(6) and lr(7).
        assert [s["lr"] for s in steps[6:]] == [s["lr"] for s in clean[5:7]]
    logger = out[-1]["nan"]
    assert [r.get("skipped", False) for r in logger["records"]] == [False] * 5 + [True] + [False] * 2
    assert logger["skipped"] == 1


def test_divergence_stops_with_one_line_and_saves_nothing_broken(data, tmp_path):
    recipe = _write_recipe(tmp_path, data, "run", checkpoint={"save_interval": 4, "keep_last": 0})
    ((code, err),) = _wait(_launch(recipe, "optimizer.lr=1e6", "training.max_skipped_steps=2"))
    assert code == 3, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error")]
    assert len(lines) == 1 and "training diverged" in lines[0] and "Traceback" not in err
    status = json.loads((tmp_path / "run" / "run_status.json").read_text())
    assert status["status"] == "diverged"
    for ckpt in (tmp_path / "run" / "checkpoints").glob("step_*"):  # whatever was saved is finite
        for name, t in _final_weights(tmp_path / "run", ckpt.name).items():
            assert torch.isfinite(t).all(), (ckpt, name)


def _tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_during_a_save_is_one_line_and_keeps_the_last_checkpoint(clean, data, tmp_path):
    disk = tmp_path / "small_disk"
    # Room for one checkpoint and a half: the first save fits, the second runs out of space.
    if not _tmpfs(disk, max(1, int(1.5 * clean["checkpoint_bytes"] / 2**20))):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        recipe = _write_recipe(tmp_path, data, "run", checkpoint={"save_interval": 4, "keep_last": 0,
                                                                   "save_dir": str(disk / "ckpt")})
        ((code, err),) = _wait(_launch(recipe))
        assert code == 2, err[-3000:]
        lines = [l for l in err.splitlines() if l.startswith("error")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        assert "No space left on device" in lines[0] and str(disk / "ckpt") in lines[0]
        latest = (disk / "ckpt" / "latest").read_text().strip()
        assert latest.startswith("step_") and (disk / "ckpt" / latest / "train_state.json").is_file()
        assert not list((disk / "ckpt").glob("*.partial"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(clean, data, tmp_path):
    recipe = _write_recipe(tmp_path, data, "run", checkpoint={"save_interval": 4, "keep_last": 0,
                                                               "save_at_end": True},
                           training={"exit_after_steps": 12})
    ((code, err),) = _wait(_launch(recipe))
    assert code == 0, err[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000012"
    for f in (ckpts / "step_000012" / "optimizer").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])  # truncated, as a crashed copy would be
    ((code, err),) = _wait(_launch(recipe, "training.exit_after_steps=null"))
    assert code == 0, err[-3000:]
    assert "cannot resume from" in err and "step_000012" in err
    _same_records(_records(tmp_path / "run"), clean["records"])

    for step in ("step_000004", "step_000008", "step_000012", "step_000016"):
        for f in (ckpts / step / "model").glob("*.distcp"):
            f.write_bytes(b"garbage")
    ((code, err),) = _wait(_launch(recipe, "training.train_steps=20"))
    assert code == 2, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("error")]
    assert len(lines) == 1 and "no checkpoint in" in lines[0] and "step_000016" in lines[0], err[-3000:]
