"""Run a function in N real processes on the gloo backend, the way torchrun would.

Used by every parallel test and by the CPU benchmarks. Each rank is a fresh
``python -m psft_megatron.testing.multiproc`` subprocess with torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), so the
code under test initialises torch.distributed exactly as in production.

Written by hand rather than with ``torch.multiprocessing.spawn`` because a
failing collective hangs the other ranks forever: we need a hard wall-clock
timeout, killing of the survivors, and the failing child's traceback in the
test report.

Start-up costs ~5 s per process (importing megatron-core), so batch many checks
into one launch per topology.
"""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from psft_megatron.runtime.distributed import free_port


class MultiProcessError(RuntimeError):
    """A child rank failed or the launch timed out."""


def _tail(path: Path, limit: int = 6000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-limit:]


# The rendezvous port is picked free a moment before the ranks bind it; on a busy machine
# another process can take it in between. Such a launch is retried on a new port.
_PORT_TAKEN = "EADDRINUSE"
_LAUNCH_ATTEMPTS = 3


def run_in_processes(
    fn: Callable[..., Any],
    nprocs: int,
    *,
    timeout: float = 300.0,
    kwargs: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    init_process_group: bool = True,
) -> list[Any]:
    """Run ``fn(**kwargs)`` on ``nprocs`` ranks and return each rank's return value.

    ``fn`` must be a module-level function importable by name in a fresh
    interpreter (the parent's ``sys.path`` is passed on). With
    ``init_process_group`` the child initialises the default gloo group before
    calling ``fn`` and destroys it (and megatron's parallel state) afterwards.

    Raises :class:`MultiProcessError` with the failing rank's stderr tail when a
    rank exits non-zero, or with every rank's tail after ``timeout`` seconds.
    Return values must be picklable (tensors are fine). A launch whose rendezvous
    port was taken by another process is retried on a fresh port.
    """
    for attempt in range(_LAUNCH_ATTEMPTS):
        try:
            return _launch(fn, nprocs, timeout=timeout, kwargs=kwargs, env=env, init_process_group=init_process_group)
        except MultiProcessError as e:
            if _PORT_TAKEN not in str(e) or attempt == _LAUNCH_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _launch(
    fn: Callable[..., Any],
    nprocs: int,
    *,
    timeout: float,
    kwargs: dict[str, Any] | None,
    env: dict[str, str] | None,
    init_process_group: bool,
) -> list[Any]:
    module = fn.__module__
    if module == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None)
        if main_file is None:
            raise ValueError("fn must live in an importable module, not an interactive __main__")
        module = Path(main_file).stem
    qualname = fn.__qualname__
    if "<locals>" in qualname:
        raise ValueError(f"fn must be a module-level function, got {qualname}")

    workdir = Path(tempfile.mkdtemp(prefix="psft_mp_"))
    try:  # the logs' tails go into any error raised, so nothing is lost when the folder goes
        return _run_ranks(module, qualname, workdir, nprocs, timeout=timeout, kwargs=kwargs, env=env,
                          init_process_group=init_process_group)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_ranks(
    module: str,
    qualname: str,
    workdir: Path,
    nprocs: int,
    *,
    timeout: float,
    kwargs: dict[str, Any] | None,
    env: dict[str, str] | None,
    init_process_group: bool,
) -> list[Any]:
    with open(workdir / "kwargs.pkl", "wb") as f:
        pickle.dump(kwargs or {}, f)

    port = free_port()
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [child_env.get("PYTHONPATH", "")])
    child_env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        OMP_NUM_THREADS=child_env.get("OMP_NUM_THREADS", "1"),
        PSFT_MP_INIT="1" if init_process_group else "0",
    )
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    for rank in range(nprocs):
        e = dict(child_env, RANK=str(rank), LOCAL_RANK=str(rank))
        log = workdir / f"rank{rank}.log"
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "psft_megatron.testing.multiproc", module, qualname, str(workdir)],
                env=e,
                stdout=open(log, "wb"),
                stderr=subprocess.STDOUT,
            )
        )

    deadline = time.monotonic() + timeout
    failed: int | None = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                failed = bad[0]
                # Give the others a moment to fail on their own (their errors can be the root cause).
                time.sleep(1.0)
                break
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- rank {r} ---\n{_tail(l, 3000)}" for r, l in enumerate(logs))
                raise MultiProcessError(f"{module}.{qualname} timed out after {timeout:.0f}s on {nprocs} ranks\n{tails}")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()

    if failed is not None:
        others = "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n{_tail(logs[r], 1500)}"
            for r, p in enumerate(procs)
            if r != failed and p.returncode not in (0, None)
        )
        raise MultiProcessError(
            f"{module}.{qualname} failed on rank {failed} (exit {procs[failed].returncode}) of {nprocs}:\n"
            f"{_tail(logs[failed])}\n{others}"
        )

    results = []
    for rank in range(nprocs):
        with open(workdir / f"result{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _child_main(module: str, qualname: str, workdir: str) -> None:
    import torch
    import torch.distributed as dist

    wd = Path(workdir)
    with open(wd / "kwargs.pkl", "rb") as f:
        kwargs = pickle.load(f)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)

    if os.environ.get("PSFT_MP_INIT") == "1":
        dist.init_process_group("gloo")
    try:
        result = obj(**kwargs)
    finally:
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        except ImportError:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
    rank = int(os.environ["RANK"])
    with open(wd / f"result{rank}.pkl", "wb") as f:
        pickle.dump(_to_cpu(result, torch), f)


def _to_cpu(x: Any, torch: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v, torch) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v, torch) for v in x)
    return x


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2], sys.argv[3])
