"""launch/torchrun_multinode.sh: two "nodes" on localhost, one process each.

The two launches (NODE_RANK 0 and 1, one MASTER_ADDR/PORT) form one world of 2 and run
the tiny recipe (TP=2) a few steps. The metrics must equal, bit for bit, those of one
`torchrun --nproc-per-node 2` launch of the same recipe: the same layout, so the same
ranks and the same arithmetic. A node rank ignored or a world size miscounted would
hang, fail, or give other numbers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8  # two global batches (k = 4): SFT warm-up (4), then PSFT, whose snapshot ratios need the whole world
COMPARED = ("phase", "loss", "entropy", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "mean_logp",
            "grad_norm", "lr", "tokens")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    # torchrun from this venv, whichever way pytest was started.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _overrides(data: Path, run_dir: Path) -> list[str]:
    return [
        f"data.train=[{{path: {data / 'train.jsonl'}, adapter: generic, max_length: 128}}]",
        "data.eval=[]", "training.eval_interval=0",
        f"data.tokenizer={data / 'tokenizer'}", f"data.cache_dir={data / 'cache'}",
        f"logging.run_dir={run_dir}", f"training.train_steps={STEPS}", "training.sft_warmup_steps=4",
        "logging.tensorboard=false", "checkpoint.save_at_end=false",
    ]


def _run_all(cmds: list[tuple[list[str], dict[str, str]]], timeout: float = 400) -> list[tuple[int, str]]:
    """Start every command at once (each in its own session); wait for all; kill them all on timeout."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd, env in cmds]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
        return [(p.returncode, out) for p, out in zip(procs, outs)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # torchrun and its workers
                p.wait()


def _train_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if r.get("split", "train") == "train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multinode") / "data"
    subprocess.run([sys.executable, "tools/make_tiny_dataset.py", str(out), "--train", "200", "--eval", "8"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return out


def test_two_nodes_on_localhost_match_one_launch(data, tmp_path):
    recipe = "recipes/tiny_cpu.yaml"
    # The reference first: it also builds the shared data cache, so the two nodes only read it.
    one = tmp_path / "one_launch"
    port = str(_free_port())
    [(rc, out)] = _run_all([(["torchrun", "--nproc-per-node", "2", "--master-port", port, "launch/pretrain_psft.py",
                              recipe, *_overrides(data, one)], _env())])
    assert rc == 0, out[-4000:]

    two = tmp_path / "two_nodes"
    port = str(_free_port())
    results = _run_all([
        (["bash", "launch/torchrun_multinode.sh", recipe, *_overrides(data, two)],
         _env(NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GPUS_PER_NODE="1"))
        for rank in (0, 1)
    ])
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"node {rank}:\n{out[-4000:]}"

    got, want = _train_records(two), _train_records(one)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in got)
    for g, w in zip(got, want):
        assert {k: g[k] for k in COMPARED} == {k: w[k] for k in COMPARED}, f"step {w['step']}"
