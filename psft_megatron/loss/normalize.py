"""One global token mean per mini-batch, whatever the micro-batch and data-parallel split.

The PSFT (and SFT/DFT) loss of a mini-batch is ``sum_t loss_t / N`` over all response
tokens t of the mini-batch, with ``N`` counted across every micro-batch and every
data-parallel (and context-parallel) rank. Megatron's default divides per micro-batch
(by that micro-batch's token count, or not at all) and then averages micro-batches and
DP ranks: micro-batches with few response tokens get over-weighted, so loss and
gradients change with micro-batch size and DP size (the gradient-accumulation bug).

Here each micro-batch contributes ``sum_t(loss_t * mask_t) / N`` (:func:`normalized_loss`),
``N`` from :func:`global_token_count` (one all-reduce per mini-batch, before the first
micro-batch). Summed over micro-batches and DP ranks these terms are exactly the global mean.

Scaling contract with megatron-core 0.16.1 (checked against its source)
-----------------------------------------------------------------------
* ``pipeline_parallel/schedules.py::forward_step_calc_loss``: when ``loss_func`` returns a
  2-tuple ``(loss, reported)`` the schedule does ``loss *= cp_group_size`` then
  ``loss /= num_microbatches`` before backward. (A 3-tuple ``(loss, num_tokens, reported)``
  is instead divided by ``num_tokens`` and ``num_microbatches`` with no CP factor, unless
  ``config.calculate_per_token_loss``: then it is left alone.)
* ``distributed/distributed_data_parallel.py``: without ``calculate_per_token_loss`` the
  gradient reduction over the DP x CP group ends up scaled by ``1 / dp_cp_size``
  (``gradient_scaling_factor = 1/dp_cp_size`` with a SUM all-reduce, or factor 1 with an
  AVG all-reduce when ``average_in_collective``). Gradients are summed over micro-batches
  in the grad buffer.
* ``distributed/finalize_model_grads.py``: only with ``calculate_per_token_loss`` does it
  all-reduce ``num_tokens`` over DP x CP and scale gradients by ``1 / num_tokens``.

Hence a trainer with ``calculate_per_token_loss=False`` (the default) must return from its
``loss_func`` the 2-tuple ``(normalized_loss(...) * megatron_loss_scale(...), reported)``:
the net factor applied is ``scale * cp / num_microbatches / (dp * cp)`` = 1 when
``scale = num_microbatches * dp`` (dp = data-parallel size without CP), leaving the plain
sum of per-micro-batch terms over micro-batches and DP x CP ranks: the global token mean.
The logged value should be the unscaled term summed over micro-batches and all-reduced
(SUM) over DP x CP (see :mod:`psft_megatron.loss.stats`).

With ``calculate_per_token_loss=True`` do not use :func:`normalized_loss`: return
``(masked_loss_sum(...), local_token_count, reported)``; megatron leaves the loss alone,
sums gradients over DP x CP without scaling, and ``finalize_model_grads`` divides by the
all-reduced token count: the same global mean. (``average_in_collective`` must be False there.)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from psft_megatron.loss.groups import resolve_dp_cp_group


def global_token_count(
    loss_masks: torch.Tensor | Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Response tokens in the whole mini-batch: this rank's micro-batch masks, summed over ``group``.

    ``loss_masks`` is one mask or the masks of all this rank's micro-batches of the
    mini-batch (any shapes; nonzero = response token). ``group`` is the DP x CP group
    (default megatron's ``get_data_parallel_group(with_context_parallel=True)``): with
    context parallelism each CP rank holds part of each sequence, so its tokens add up.
    One all-reduce. Returns an int64 0-d tensor on the masks' device, the same on every rank.
    """
    masks = [loss_masks] if isinstance(loss_masks, torch.Tensor) else list(loss_masks)
    if not masks:
        raise ValueError("need at least one loss mask")
    count = torch.zeros((), dtype=torch.int64, device=masks[0].device)
    for m in masks:
        count += (m != 0).sum()
    group = resolve_dp_cp_group(group)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def masked_loss_sum(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``sum_t loss_t`` over tokens with nonzero mask (``where``, so masked NaN/inf cannot leak)."""
    return torch.where(loss_mask.bool(), token_loss, torch.zeros_like(token_loss)).sum()


def normalized_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor, global_count: torch.Tensor) -> torch.Tensor:
    """One micro-batch's share of the mini-batch mean: ``sum(loss_t * mask_t) / global_count``.

    Summed over all micro-batches and DP x CP ranks this is the global token mean. A
    mini-batch with no response tokens gives 0 (count clamped to 1).
    """
    return masked_loss_sum(token_loss, loss_mask) / global_count.clamp(min=1).to(token_loss.dtype)


def megatron_loss_scale(
    num_microbatches: int,
    data_parallel_size: int,
    context_parallel_size: int = 1,
    *,
    calculate_per_token_loss: bool = False,
) -> float:
    """Factor to multiply :func:`normalized_loss` by before returning it from megatron's ``loss_func``.

    For megatron-core 0.16.1's ``forward_backward_func`` with a ``loss_func`` returning the
    2-tuple ``(loss, reported)`` and ``config.calculate_per_token_loss=False``: the schedule
    multiplies by ``context_parallel_size`` and divides by ``num_microbatches``; DDP scales
    the reduced gradient by ``1 / (data_parallel_size * context_parallel_size)``. Undoing
    both gives ``num_microbatches * data_parallel_size`` (``data_parallel_size`` excludes CP,
    i.e. ``parallel_state.get_data_parallel_world_size()``). See the module docstring.

    Raises for ``calculate_per_token_loss=True``: there megatron normalises by the global
    token count itself; return ``(masked_loss_sum, local_count, reported)`` unscaled instead.
    """
    if calculate_per_token_loss:
        raise ValueError(
            "with calculate_per_token_loss megatron divides by the global token count itself: "
            "return (masked_loss_sum(...), local_token_count, reported) unscaled"
        )
    if num_microbatches < 1 or data_parallel_size < 1 or context_parallel_size < 1:
        raise ValueError("num_microbatches, data_parallel_size and context_parallel_size must be >= 1")
    dp_cp = data_parallel_size * context_parallel_size
    # schedule: * cp / num_microbatches ; DDP: / (dp * cp)  ->  undo both.
    return float(num_microbatches) * dp_cp / context_parallel_size


def megatron_loss_grad(num_microbatches: int, data_parallel_size: int, context_parallel_size: int = 1) -> float:
    """The gradient megatron's backward sends into :func:`normalized_loss` when ``loss_func`` returns it
    times :func:`megatron_loss_scale`: that scale, times ``context_parallel_size / num_microbatches``
    from the schedule, i.e. ``data_parallel_size * context_parallel_size`` (DDP divides it out again).

    Assumes no loss scaler (``config.grad_scale_func`` None: bf16 / fp32 training, as the trainer
    sets it up). The fused head uses it to form gradients in the forward pass
    (:mod:`psft_megatron.loss.fused_head_loss`), which checks it in backward.
    """
    scale = megatron_loss_scale(num_microbatches, data_parallel_size, context_parallel_size)
    return scale * context_parallel_size / num_microbatches
