"""Training checkpoints: model + optimizer (megatron dist_checkpointing), schedule, data position, RNG, step.

Layout of ``<save_dir>``::

    latest                      text file: the name of the newest complete checkpoint
    step_000100/                a model checkpoint (psft_meta.json + model/, see
                                psft_megatron.checkpoint.model_checkpoint: what
                                tools/convert_hf_to_megatron.py writes, so `init_from`,
                                tools/convert_megatron_to_hf.py and tools/score.py read it)
                                plus:
        optimizer/              dist checkpoint of the optimizer state (layout-independent:
                                keyed by the model's sharded tensors)
        train_state.json        step, LR schedule, layout, and each registered state by name
                                ("progress": step and consumed tokens, "data": the loader position)
        rng/rank_00000.pt ...   each rank's Python/NumPy/torch RNG state
    step_000050/                kept by keep_every with keep_every_weights_only, once keep_last no
                                longer covers it: the model checkpoint alone (not resumable)

Crash safety: everything is written into ``step_000100.partial``; only when every rank
is done does rank 0 rename it and then replace ``latest`` atomically. A crash mid-save
leaves the previous checkpoint and ``latest`` untouched; stale ``.partial`` folders are
removed by the next save.

The model and optimizer state are sharded tensors with global keys, so a checkpoint
loads into any TP/PP/VP layout (the RNG states are restored only at the same world
size and layout, otherwise a warning says they were re-seeded).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from psft_megatron.checkpoint.model_checkpoint import (
    CheckpointError,
    atomic_dir,
    barrier,
    global_rank,
    load_model_checkpoint,
    model_sharded_state_dict,
    write_model_checkpoint,
)
from psft_megatron.runtime.distributed import any_rank, parallel_layout

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: train state keyed by component ("progress", "data")
# The distributed optimizer's state in megatron's fully reshardable format: one tensor per parameter
# and state, so it loads at any DP/TP/PP. Its default ("fully_sharded_model_space") writes flattened
# ranges, which megatron 0.16's torch_dist checkpoint format refuses. Other optimizers ignore it.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_STEP_RE = re.compile(r"^step_(\d{6,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(save_dir: str | Path) -> list[Path]:
    """Every complete checkpoint in ``save_dir``, newest first (the ``latest`` pointer's first when valid)."""
    save_dir = Path(save_dir)
    steps = sorted(
        ((int(m.group(1)), p) for p in save_dir.glob("step_*") if (m := _STEP_RE.match(p.name))
         and (p / "train_state.json").is_file()),
        reverse=True,
    )
    found = [p for _, p in steps]
    latest = find_latest(save_dir)
    if latest is not None and latest in found:
        found.remove(latest)
        found.insert(0, latest)
    return found


def find_latest(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``save_dir`` (via ``latest``, else the highest step dir)."""
    save_dir = Path(save_dir)
    pointer = save_dir / "latest"
    if pointer.is_file():
        candidate = save_dir / pointer.read_text().strip()
        if (candidate / "train_state.json").is_file():
            return candidate
        log.warning("%s points at %s, which is incomplete; looking for another checkpoint", pointer, candidate)
    steps = sorted(
        (int(m.group(1)), p) for p in save_dir.glob("step_*") if (m := _STEP_RE.match(p.name)) and (p / "train_state.json").is_file()
    )
    return steps[-1][1] if steps else None




def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": _tracker_states(),
    }


def _tracker_states() -> dict[str, torch.Tensor] | None:
    try:
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        return {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    except Exception:  # tracker not initialised (e.g. tools): nothing to save
        return None


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["tracker"])


def save_training_checkpoint(
    save_dir: str | Path,
    step: int,
    model: list,
    optimizer: Any,
    scheduler: Any,
    train_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 0,
    shards: dict[str, Any] | None = None,
    keep_every: int = 0,
    keep_every_weights_only: bool = False,
) -> Path:
    """Write checkpoint ``step`` (all ranks call this); returns its final path.

    ``shards``: this rank's own state (e.g. snapshot log-probs of its rows), written to
    ``shards/rank_NNNNN.pt`` when non-empty; every rank can read every shard back.
    A failed write (disk full, I/O error) on any rank raises :class:`CheckpointError` on
    every rank, naming the path and the OS error; the previous checkpoint is untouched.
    """
    from megatron.core import dist_checkpointing

    save_dir = Path(save_dir)
    final = save_dir / step_dir_name(step)
    try:
        if global_rank() == 0:
            save_dir.mkdir(parents=True, exist_ok=True)
            for stale in save_dir.glob("step_*.partial"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {save_dir}: {one_line(e)}") from None
    barrier()
    # A re-save of the same step (resumed, then saved again) swaps the old copy out atomically.
    with atomic_dir(final, overwrite=True) as tmp:
        error: BaseException | None = None
        try:
            model_cfg = meta["model"]
            write_model_checkpoint(model, tmp, model_cfg, {k: v for k, v in meta.items() if k != "model"})
            if global_rank() == 0:
                (tmp / "optimizer").mkdir()
                (tmp / "rng").mkdir()
                (tmp / "shards").mkdir()
            barrier()
            model_sd = model_sharded_state_dict(model)
            opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=OPTIMIZER_METADATA)
            dist_checkpointing.save(opt_sd, str(tmp / "optimizer"))
            torch.save(_rng_state(), tmp / "rng" / f"rank_{global_rank():05d}.pt")
            if shards and any(shards.values()):
                torch.save(shards, tmp / "shards" / f"rank_{global_rank():05d}.pt")
            if global_rank() == 0:
                state = dict(train_state, format_version=FORMAT_VERSION, layout=parallel_layout(),
                             scheduler=scheduler.state_dict())
                _write_json(tmp / "train_state.json", state)
        except (Exception, CheckpointException) as e:  # every rank must learn of it, or the others wait
            error = e
        if any_rank(error is not None):
            written = 3 * sum(p.numel() * p.element_size() for chunk in model for p in chunk.parameters())
            raise CheckpointError(
                f"could not write checkpoint {final}: "
                + (_describe_failure(error, save_dir, written) if error is not None
                   else "another rank failed to write its part")
                + "; the previous checkpoint is intact"
            ) from None
    if global_rank() == 0:
        _write_text_atomic(save_dir / "latest", final.name)
        prune_checkpoints(save_dir, step, keep_last, keep_every, keep_every_weights_only)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def read_shards(path: str | Path) -> list[dict[str, Any]]:
    """Every rank's ``shards`` of the checkpoint at ``path`` (see :func:`save_training_checkpoint`)."""
    return [torch.load(f, weights_only=False) for f in sorted((Path(path) / "shards").glob("rank_*.pt"))]


def one_line(e: BaseException) -> str:
    """The OS error behind ``e`` (torch and megatron wrap them), as ``[Errno 28] No space left ...: path``."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"


def _describe_failure(e: BaseException, folder: Path, bytes_needed: int) -> str:
    """One line for a failed save. A full disk often surfaces as a serialisation error from torch's
    writer threads ("unexpected pos ..."), without the OS error: the free space tells."""
    if any(isinstance(x, OSError) for x in _chain(e)):
        return one_line(e)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < bytes_needed:
        return (f"No space left on device: {free / 2**20:.1f} MiB free on the disk holding {folder}, this rank's "
                f"part of a checkpoint takes about {bytes_needed / 2**20:.1f} MiB ({one_line(e)})")
    return one_line(e)


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], e
    while seen is not None and len(out) < 20:
        out.append(seen)
        seen = seen.__cause__ or seen.__context__
    return out


def load_training_checkpoint(path: str | Path, model: list, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the train state dict."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    state = json.loads((path / "train_state.json").read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: training-state format {state.get('format_version')} cannot be resumed by this version "
            f"(format {FORMAT_VERSION}); start a fresh run with checkpoint.init_from={path} (the weights still load)"
        )
    load_model_checkpoint(model, path)
    model_sd = model_sharded_state_dict(model)
    opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=OPTIMIZER_METADATA)
    optimizer.load_state_dict(dist_checkpointing.load(opt_sd, str(path / "optimizer")))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / "rng" / f"rank_{global_rank():05d}.pt"
    same_world = len(list((path / "rng").glob("rank_*.pt"))) == (dist.get_world_size() if dist.is_initialized() else 1)
    if rng_file.is_file() and same_world and state.get("layout") == parallel_layout():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("%s: saved with another layout; RNG states re-seeded instead of restored", path)
    log.info("resumed from %s (step %s)", path, state.get("step"))
    return state


def _write_json(path: Path, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1, default=_json_default))


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".writing")
    tmp.write_text(text)
    os.replace(tmp, path)


# What a training checkpoint adds to a model checkpoint (psft_meta.json + model/): what resuming needs.
# train_state.json first: a folder interrupted while being thinned is then no longer offered for resuming.
_RESUME_ONLY = ("train_state.json", "optimizer", "rng", "shards")


def prune_checkpoints(
    save_dir: Path, step: int, keep_last: int, keep_every: int = 0, keep_every_weights_only: bool = False
) -> None:
    """Delete all but the ``keep_last`` newest checkpoints up to ``step`` (never ``step`` itself),
    except those whose step is a multiple of ``keep_every`` (0: none kept that way).

    ``keep_every_weights_only``: those kept checkpoints lose what only resuming needs (optimizer
    state, RNG, shards, train state) and stay model checkpoints; without ``train_state.json`` the
    resume search no longer offers them.
    """
    if keep_last <= 0:
        return
    steps = sorted(
        (s, p) for p in save_dir.glob("step_*") if (m := _STEP_RE.match(p.name)) and (s := int(m.group(1))) <= step
    )
    for s, p in steps[:-keep_last]:
        if not (keep_every and s % keep_every == 0):
            shutil.rmtree(p, ignore_errors=True)
        elif keep_every_weights_only:
            for name in _RESUME_ONLY:
                part = p / name
                if part.is_dir():
                    shutil.rmtree(part, ignore_errors=True)
                else:
                    part.unlink(missing_ok=True)
