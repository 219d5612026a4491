"""Which process group a loss reduction runs over when the caller does not name one.

Every reduction in the loss layer takes an optional group: an explicit group wins; else
megatron's own group of that kind once its parallel state is initialised; else None, a
single rank with nothing to reduce (plain single-process use needs no megatron at all).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.distributed as dist


def _resolve(
    group: dist.ProcessGroup | None, megatron_group: Callable[[Any], dist.ProcessGroup]
) -> dist.ProcessGroup | None:
    if group is not None:
        return group
    if not dist.is_initialized():
        return None  # single process: nothing to reduce (and no need to import megatron)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return megatron_group(parallel_state)
    return None


def resolve_tp_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The explicit group, else megatron's tensor-parallel group if initialised, else None (one rank)."""
    return _resolve(group, lambda ps: ps.get_tensor_model_parallel_group())


def resolve_dp_cp_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The explicit group, else megatron's DP x CP group if initialised, else None (one rank)."""
    return _resolve(group, lambda ps: ps.get_data_parallel_group(with_context_parallel=True))


def rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` for None or no torch.distributed."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
