"""Run a list of micro-batches through megatron's pipeline schedule (1F1B, interleaved or none)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from psft_megatron.data.batches import AttentionBackend, MicroBatch
from psft_megatron.data.context_parallel import split_micro_batches

# forward_step(data_iterator, model_chunk) -> (output_tensor, loss_func), megatron's contract.
ForwardStep = Callable[[Any, Any], tuple[Any, Callable]]


def prepare_micro_batches(micro_batches: Sequence[MicroBatch], backend: AttentionBackend, device: Any) -> list[MicroBatch]:
    """Move to the device and, for TransformerEngine's THD path, flatten each to one row.

    Under context parallelism keep this rank's share of every row (THD, on either backend;
    see :mod:`psft_megatron.data.context_parallel`), all micro-batches of the call padded to
    one length. Idempotent: micro-batches prepared once (a global batch) keep their layout,
    so the snapshot's log-probs line up with the training passes over the same micro-batches.
    """
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()
    fresh = [mb for mb in micro_batches if mb.cp_size == 1 and mb.row_map is None]
    if cp > 1 and fresh:
        if len(fresh) != len(micro_batches):
            raise ValueError("prepare_micro_batches got a mix of prepared and fresh micro-batches")
        # Padding rows to a multiple of TP keeps each TP rank's sequence-parallel slice whole.
        micro_batches = split_micro_batches(micro_batches, cp, parallel_state.get_context_parallel_rank(),
                                            multiple=parallel_state.get_tensor_model_parallel_world_size())
    out = []
    for mb in micro_batches:
        if backend == "transformer_engine":
            mb = mb.thd()
        out.append(mb.to(device, non_blocking=True))
    return out


def run_schedule(
    model: list,
    micro_batches: Sequence[MicroBatch],
    forward_step: ForwardStep,
    *,
    forward_only: bool,
) -> list[dict]:
    """Call megatron's ``forward_backward_func`` over ``micro_batches``.

    Every model chunk (virtual pipeline stage) gets its own iterator over
    ``(index, micro_batch)``: the interleaved schedule calls each chunk's forward once
    per micro-batch, and the index lets the loss function find per-micro-batch state
    (logp_old). All stages see the same micro-batches, so none loses packing boundaries.
    Returns megatron's list of reported dicts (last pipeline stage only; empty elsewhere).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    b, s = micro_batches[0].shape
    iterators = [iter(list(enumerate(micro_batches))) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model,
        num_microbatches=len(micro_batches),
        # megatron divides the sequence length by CP itself (pipeline tensor shapes).
        seq_length=s * micro_batches[0].cp_size,
        micro_batch_size=b,
        forward_only=forward_only,
    )
