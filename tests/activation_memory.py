"""What the memory tests share (tests/test_recompute.py, tests/test_moe.py): a packed micro-batch, one
forward and backward of a model chunk on it, and the bytes it holds, from torch's profiler (``profile_memory``:
every CPU allocation and free)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def packed_micro_batch(seq: int) -> Any:
    """Two rows of ``seq`` tokens: three documents packed into one (padded), one filling the other."""
    from psft_megatron.data.batches import collate
    from psft_megatron.data.packing import pack_row

    rng = np.random.default_rng(0)
    rows = []
    for lens in ([70, 101, 85], [seq]):
        samples = [(rng.integers(1, 300, n), (rng.random(n) < 0.7).astype(np.float32)) for n in lens]
        rows.append(pack_row(samples, seq, pad_id=0))
    return collate(rows)


def nll_step(chunk: Any, mb: Any) -> Callable[[], None]:
    """A forward (marked ``psft_forward``) and the backward of its mean response NLL (``psft_backward``)."""
    from torch.profiler import record_function

    def step() -> None:
        with record_function("psft_forward"):
            logits = chunk(**mb.forward_kwargs("local"), labels=mb.labels)  # [s, b, V]
            logp = torch.log_softmax(logits, -1).gather(-1, mb.labels.t().unsqueeze(-1)).squeeze(-1)
            loss = -(logp * mb.loss_mask.t()).sum() / mb.num_loss_tokens
        with record_function("psft_backward"):
            loss.backward()

    return step


def allocated(trace: Path) -> tuple[float, float]:
    """(bytes held when the forward ended, peak bytes) above the start, from a profiler trace.

    Sums the allocation and free events' sizes in order. (The events' own running "Total
    Allocated" field overcounts inside megatron's CheckpointFunction: it disagrees with the
    events' sizes there, while the sizes match allocation by allocation.)"""
    events = json.loads(trace.read_text())["traceEvents"]
    backward = next(e["ts"] for e in events if e.get("name") == "psft_backward")
    mem = sorted((e["ts"], e["args"]["Bytes"]) for e in events if e.get("name") == "[memory]")
    running = np.cumsum([b for _, b in mem])
    before = [r for (ts, _), r in zip(mem, running) if ts < backward]
    return float(before[-1]), float(running.max())


def profiled_memory(step: Callable[[], None]) -> tuple[float, float]:
    """(bytes kept for the backward, peak bytes) of one call of ``step`` (a :func:`nll_step`)."""
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        prof.export_chrome_trace(f"{tmp}/trace.json")
        return allocated(Path(tmp) / "trace.json")
