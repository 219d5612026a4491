"""Process-group and Megatron parallel-state set-up from torchrun's environment, and teardown."""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from psft_megatron.runtime import cpu_compat
from psft_megatron.runtime.config import ParallelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (single-process runs, test launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    """NCCL when CUDA is present, gloo otherwise; ``PSFT_DIST_BACKEND`` overrides."""
    override = os.environ.get("PSFT_DIST_BACKEND")
    if override:
        return override
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise torch.distributed from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Runs without torchrun too (a single process: rank 0 of 1 on a free local port).
    Applies the CPU-compatibility routes when CUDA is absent. Idempotent.
    """
    cpu_compat.apply()
    backend = backend or default_backend()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {}
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    return DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=dist.get_backend(),
        device=device,
    )


def init_model_parallel(parallel: ParallelConfig) -> int:
    """Create Megatron's TP/PP/CP/DP groups for ``parallel``; returns the data-parallel size."""
    from megatron.core import parallel_state

    parallel.validate()
    dp = parallel.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tp_size,
    )
    log.info(
        "parallel layout: TP=%d PP=%d VP=%s CP=%d DP=%d SP=%s EP=%d expert TP=%d",
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.virtual_pipeline_model_parallel_size,
        parallel.context_parallel_size,
        dp,
        parallel.sequence_parallel,
        parallel.expert_model_parallel_size,
        parallel.expert_tp_size,
    )
    return dp


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch, and Megatron's RNG tracker.

    Megatron derives per-TP-rank seeds for tensor-parallel regions (dropout inside
    TP layers, sharded init) and keeps the default stream equal across model ranks.
    Needs :func:`init_model_parallel` first.
    """
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce; no-op alone)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def parallel_layout() -> dict[str, int | None]:
    """This job's layout as checkpoints record it: world size, TP, PP, VP, CP and DP
    (a single-process layout when megatron's parallel state is not initialised)."""
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    if not ps.model_parallel_is_initialized():
        return {"world_size": world, "tp": 1, "pp": 1, "vp": None, "cp": 1, "dp": world}
    return {
        "world_size": world,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def teardown(destroy_process_group: bool = True) -> None:
    """Destroy Megatron's groups and (unless told not to) the default process group; safe to call twice."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
