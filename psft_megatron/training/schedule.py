"""Run a list of micro-batches through megatron's pipeline schedule (1F1B, interleaved or none)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from psft_megatron.data.batches import AttentionBackend, MicroBatch

# forward_step(data_iterator, model_chunk) -> (output_tensor, loss_func), megatron's contract.
ForwardStep = Callable[[Any, Any], tuple[Any, Callable]]


def prepare_micro_batches(micro_batches: Sequence[MicroBatch], backend: AttentionBackend, device: Any) -> list[MicroBatch]:
    """Move to the device and, for TransformerEngine's THD path, flatten each to one row."""
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
        seq_length=s,
        micro_batch_size=b,
        forward_only=forward_only,
    )
