"""launch/slurm/psft.sbatch under a real Slurm (a one-node cluster on this machine).

Bring the cluster up first (root, Debian; about 20 s with the package install):

    bash tests/slurm/start_cluster.sh

Every test submits the tiny recipe exactly as the README shows, with only the CPU
overrides (`--gpus-per-node=0 --cpus-per-task=2 --export=ALL,GPUS_PER_NODE=2`) and a
few recipe overrides that keep it short and inside a temporary folder:

- a good job completes: the log is where the README says, metrics.jsonl has every step
  with finite losses, the checkpoint folder has the last step;
- a recipe typo fails at the up-front check: one `error:` line in the job log, no
  traceback, no worker started, the job FAILED with exit code 2;
- requeue (time-limit signal, and preemption) resumes where the interrupted launch
  stopped and ends with the same metrics as the uninterrupted job.

Skipped when `sbatch` is not on the PATH, or when the cluster is down or its nodes are
not this machine (the jobs read and write this machine's temporary folders).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16  # four global batches of the tiny recipe (k = 4): long enough to interrupt mid-run
# What a resumed run must reproduce exactly (timings differ between launches).
COMPARED = ("phase", "loss", "entropy", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "mean_logp",
            "grad_norm", "lr", "tokens")
# The README's CPU overrides of the sbatch script's GPU defaults.
CPU_FLAGS = ["--gpus-per-node=0", "--cpus-per-task=2", "--export=ALL,GPUS_PER_NODE=2"]


def _cluster_problem() -> str | None:
    """Why these tests cannot run here, or None when a local Slurm cluster is up."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on the PATH (bring a test cluster up with tests/slurm/start_cluster.sh)"
    try:
        # `scontrol ping` answers at once when the controller is down; sinfo retries for 9 s.
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        if "is UP" not in ping.stdout:
            return "no Slurm controller answers (run tests/slurm/start_cluster.sh)"
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    nodes = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    if out.returncode != 0 or not nodes:
        return f"no Slurm controller answers (run tests/slurm/start_cluster.sh): {out.stderr.strip()[:200]}"
    if socket.gethostname().split(".")[0] not in nodes:
        return f"the Slurm nodes {sorted(nodes)} are not this machine, whose temporary folders the jobs use"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in nodes.values()):
        return f"the Slurm node is not usable: {nodes}"
    return None


_PROBLEM = _cluster_problem()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")]


# ---------------------------------------------------------------------------- helpers


def _job_env() -> dict[str, str]:
    """The submitting environment (exported into the job): this venv's python and torchrun first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.train=[{{path: {data / 'train.jsonl'}, adapter: generic, max_length: 128}}]",
        f"data.eval=[{{path: {data / 'eval.jsonl'}, adapter: generic, max_length: 128}}]",
        f"data.tokenizer={data / 'tokenizer'}",
        f"data.cache_dir={data / 'cache'}",
        f"logging.run_dir={run_dir}",
        f"training.train_steps={STEPS}",
        "training.sft_warmup_steps=4",
        "logging.tensorboard=false",
        "logging.log_interval=1",
        *extra,
    ]


def _submit(recipe_args: list[str]) -> int:
    """`sbatch CPU_FLAGS launch/slurm/psft.sbatch ...` from the repository root, as the README shows."""
    out = subprocess.run(
        ["sbatch", *CPU_FLAGS, "launch/slurm/psft.sbatch", *recipe_args],
        cwd=ROOT, env=_job_env(), capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Submitted batch job (\d+)", out.stdout)
    assert out.returncode == 0 and m, f"sbatch failed: {out.stdout}{out.stderr}"
    return int(m.group(1))


def _slurm(*cmd: str) -> str:
    """Run a Slurm command; retry for a while, since a busy controller can time out an RPC."""
    for _ in range(10):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            return out.stdout
        time.sleep(2)
    raise AssertionError(f"{' '.join(cmd)} failed: {out.stdout}{out.stderr}")


def _job(job_id: int) -> dict[str, str]:
    """JobState, Reason, Restarts and ExitCode from `scontrol show job` (no sacct without slurmdbd)."""
    text = _slurm("scontrol", "-o", "show", "job", str(job_id))
    fields = {}
    for key in ("JobState", "Reason", "Restarts", "ExitCode"):
        m = re.search(rf"\b{key}=(\S+)", text)
        fields[key] = m.group(1) if m else ""
    return fields


def _wait(job_id: int, done, timeout: float = 300) -> dict[str, str]:
    """Poll the job until done(fields) holds; fail with the job's state after `timeout` seconds."""
    end = time.monotonic() + timeout
    while True:
        fields = _job(job_id)
        if done(fields):
            return fields
        if time.monotonic() > end:
            raise AssertionError(f"job {job_id} still {fields} after {timeout:.0f} s")
        time.sleep(1)


def _finished(fields: dict[str, str]) -> bool:
    return fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


class _Job:
    """A submitted job whose log (psft-<id>.out in the repository root) is moved to `keep`
    when the job is over, and which is cancelled if the test stops while it runs."""

    def __init__(self, recipe_args: list[str], keep: Path):
        self.id = _submit(recipe_args)
        self.log = ROOT / f"psft-{self.id}.out"
        self.keep = keep

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        subprocess.run(["scancel", str(self.id)], capture_output=True, timeout=30)
        if self.log.exists():
            self.keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.log), self.keep / self.log.name)


def _train_records(run_dir: Path) -> list[dict]:
    """The train records of metrics.jsonl; a last line still being written is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if r.get("split", "train") == "train"]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The README's data step (tools/make_tiny_dataset.py), smaller: enough rows for STEPS steps."""
    out = tmp_path_factory.mktemp("slurm") / "data"
    subprocess.run([sys.executable, "tools/make_tiny_dataset.py", str(out), "--train", "400", "--eval", "40"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def good_job(data):
    """One uninterrupted job of STEPS steps: checked by the first test, the reference of the requeue tests."""
    run_dir = data.parent / "run_good"
    job = _Job(["recipes/tiny_cpu.yaml", *_overrides(data, run_dir)], data.parent / "logs")
    try:
        fields = _wait(job.id, _finished)
        text = job.text()
    finally:
        job.close()
    return fields, text, run_dir


# ---------------------------------------------------------------------------- tests


def test_tiny_recipe_runs_through_psft_sbatch(good_job):
    fields, log, run_dir = good_job
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{log[-4000:]}"
    assert "recipes/tiny_cpu.yaml: valid" in log  # the up-front check ran inside the job
    assert "Traceback" not in log, log[-4000:]
    records = _train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["phase"] for r in records] == ["sft"] * 4 + ["psft"] * (STEPS - 4)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert records[-1]["ratio_max"] > 1.0  # the snapshot pass ran: PSFT ratios moved off 1
    assert (run_dir / "checkpoints" / "latest").exists()
    assert _checkpoint_steps(run_dir)[-1] == STEPS
    state = json.loads((run_dir / "checkpoints" / f"step_{STEPS:06d}" / "train_state.json").read_text())
    assert state["step"] == STEPS


def test_bad_recipe_fails_in_the_up_front_check(data, tmp_path):
    run_dir = tmp_path / "run"
    job = _Job(["recipes/tiny_cpu.yaml", *_overrides(data, run_dir, "training.trian_steps=4")], tmp_path / "logs")
    try:
        fields = _wait(job.id, _finished, timeout=120)
        log = job.text()
    finally:
        job.close()
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "2:0"), f"{fields}\n{log}"
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert len(errors) == 1, log
    assert "training.trian_steps" in errors[0] and "training.train_steps" in errors[0], errors[0]
    assert "Traceback" not in log, log
    # No worker was started: no srun/torchrun line, no rank's log, nothing written to the run dir.
    assert "starting workers" not in log and "[rank" not in log, log
    assert not (run_dir / "metrics.jsonl").exists()


# Two ways a running job is interrupted and requeued:
# - "time_limit": the signal the script asks for ahead of the time limit (--signal=B:USR1@600),
#   sent now to the batch shell, which passes SIGTERM to the workers and requeues the job itself;
# - "preemption": `scontrol requeue`, as a preempting job does: Slurm sends SIGTERM to every
#   process of the job (SIGKILL KillWait seconds later) and requeues it.
INTERRUPTS = {
    "time_limit": ["scancel", "--batch", "--signal=USR1"],
    "preemption": ["scontrol", "requeue"],
}


class NotSavedOnSignal(AssertionError):
    """The interrupted launch kept no checkpoint of its last steps (the expected failure)."""


@pytest.mark.parametrize("interrupt", sorted(INTERRUPTS))
def test_requeued_job_resumes_and_ends_like_an_uninterrupted_one(interrupt, data, good_job, tmp_path):
    fields, _, ref_dir = good_job
    assert fields["JobState"] == "COMPLETED", "the uninterrupted reference job failed"
    reference = _train_records(ref_dir)
    run_dir = tmp_path / "run"
    job = _Job(["recipes/tiny_cpu.yaml", *_overrides(data, run_dir)], tmp_path / "logs")
    try:
        # Interrupt once two steps are done (of STEPS; the tiny model does several a second).
        end = time.monotonic() + 300
        while len(_train_records(run_dir)) < 2:
            assert _job(job.id)["JobState"] in ("PENDING", "RUNNING"), job.text()[-4000:]
            assert time.monotonic() < end, f"no step after 300 s\n{job.text()[-4000:]}"
            time.sleep(0.2)
        done_before = len(_train_records(run_dir))
        _slurm(*INTERRUPTS[interrupt], str(job.id))

        fields = _wait(job.id, lambda f: f["JobState"] == "PENDING" and int(f["Restarts"] or 0) >= 1
                       or _finished(f), timeout=180)
        assert fields["JobState"] == "PENDING", f"not requeued: {fields}\n{job.text()[-4000:]}"
        saved = _checkpoint_steps(run_dir) if (run_dir / "checkpoints").exists() else []
        # At most the step in flight is redone: the interrupted launch saved at or after the last
        # step it had logged when the signal came.
        if not (saved and saved[-1] >= done_before):
            raise NotSavedOnSignal(f"the interrupted launch saved {saved}, not a checkpoint at or after step "
                                   f"{done_before}\n{job.text()[-4000:]}")
        assert saved[-1] < STEPS, f"the job finished before the interruption reached it ({saved})"
        # Slurm holds a requeued job for about two minutes (BeginTime); release it now.
        _slurm("scontrol", "update", f"JobId={job.id}", "StartTime=now")
        fields = _wait(job.id, _finished)
        log = job.text()
    finally:
        job.close()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        f"{fields}\n{log[-4000:]}")
    assert "restart 0" in log and "restart 1" in log, log[-4000:]  # one log, appended by the relaunch
    records = _train_records(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "a step is missing or repeated"
    for got, want in zip(records, reference):
        assert {k: got[k] for k in COMPARED} == {k: want[k] for k in COMPARED}, f"step {want['step']}"
