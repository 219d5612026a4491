"""A bad data file stops every rank of a launch at once, with the file, line and field.

Rank 0 tokenises; the other ranks must not be left waiting for a cache that will never
appear. Runs the real entry point under torchrun-like environments (2 processes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from psft_megatron.data.synthetic import write_tiny_dataset
from psft_megatron.testing.multiproc import free_port

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = Path(__file__).resolve().parents[1]


def test_bad_data_line_stops_all_ranks_with_its_location(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", train=120, eval=8)
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[6] = '{"prompt": "What is 1 plus 1?", "response": '  # line 7: cut off mid-record
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    overrides = [
        f"data.train=[{{path: {data / 'train.jsonl'}, adapter: generic, max_length: 128}}]",
        "data.eval=[]", "training.eval_interval=0", f"data.tokenizer={data / 'tokenizer'}",
        f"data.cache_dir={tmp_path / 'cache'}", f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=false",
    ]
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "pretrain_psft.py"), str(ROOT / "recipes" / "tiny_cpu.yaml"), *overrides],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-3000:]
        assert "train.jsonl, line 7: malformed JSON" in err, err[-3000:]
