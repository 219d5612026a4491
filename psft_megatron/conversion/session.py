"""A single-process megatron context for the converters (gloo, TP=PP=1)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.distributed as dist

from psft_megatron.runtime import cpu_compat
from psft_megatron.runtime.config import ParallelConfig
from psft_megatron.runtime.distributed import init_distributed, init_model_parallel


@contextmanager
def single_process_megatron() -> Iterator[None]:
    """Initialise torch.distributed (one gloo rank) and TP=PP=1 parallel state unless already set.

    The converters run in one process: the dist-checkpoint files they write are
    layout-independent anyway. Whatever this context initialised it tears down.
    """
    from megatron.core import parallel_state

    cpu_compat.apply()  # no-op with CUDA; init_distributed would do it, but a caller may have set up dist itself
    own_dist = not dist.is_initialized()
    if own_dist:
        init_distributed(backend="gloo")
    elif dist.get_world_size() != 1:
        raise RuntimeError("the checkpoint converters run as a single process; launch them without torchrun")
    own_mp = not parallel_state.model_parallel_is_initialized()
    if own_mp:
        init_model_parallel(ParallelConfig())
    elif (
        parallel_state.get_tensor_model_parallel_world_size() != 1
        or parallel_state.get_pipeline_model_parallel_world_size() != 1
    ):
        raise RuntimeError("the checkpoint converters need TP=PP=1 parallel state")
    try:
        yield
    finally:
        if own_mp and parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        if own_dist and dist.is_initialized():
            dist.destroy_process_group()
