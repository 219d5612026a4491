"""The one forward engine: every pass over model chunks goes through megatron's schedule here.

Design. megatron-core's ``get_forward_backward_func`` (no pipelining, 1F1B, interleaved) is
wrapped once, by :func:`run_pipeline`. It owns megatron's contract: one iterator over
``(index, item)`` per model chunk (the interleaved schedule calls each chunk's forward once per
micro-batch, and the index lets a caller find per-micro-batch state such as logp_old), the
pipeline tensor shape (megatron divides the sequence length by CP itself), ``torch.no_grad``
for forward-only passes, and the ``forward_step -> (output, loss_func)`` closure. A caller
gives two functions and nothing else:

* ``call_model(chunk, item)``: run one chunk on one item (every stage);
* ``on_output(index, item, output, chunk) -> (loss, report)``: on the last pipeline stage.
  megatron backpropagates ``loss`` (a training pass) and returns every ``report`` in order.

Its callers:

* training (:mod:`psft_megatron.training.step`): the snapshot pass, the train step and held-out
  evaluation run the trainer's :class:`~psft_megatron.data.batches.MicroBatch`, placed on the
  device (THD, context-parallel share) once by :func:`prepare_micro_batches`;
* scoring (:mod:`psft_megatron.evaluation`: log-likelihoods, held-out NLL and entropy, KL drift,
  response NLL) and the conversion tests: :func:`pipeline_forward` over dicts of ``input_ids``,
  each handing the last stage's vocab-parallel logits to a function.

What each pipeline stage's ``GPTModel.forward`` needs on the scoring path:

* first stage (``pre_process``): ``input_ids`` ``[b, s]``; ``position_ids`` ``[b, s]``
  (only read by learned position embeddings; RoPE derives positions from the
  sequence length, so ``arange`` is fine);
* middle / last stages: the previous stage's hidden states, which megatron's
  schedule hands over with ``model.set_input_tensor`` (``input_ids`` and
  ``position_ids`` are then ignored, passing them is harmless);
* every stage: ``attention_mask=None`` gives causal attention (both layer specs
  build the causal mask themselves);
* last stage (``post_process``): returns vocab-parallel logits ``[b, s, V_pad / TP]``
  when ``labels`` is None (with ``labels``, ``PSFTGPTModel`` returns them as ``[s, b, V_pad / TP]``).

Padded vocabulary rows (see ``padded_vocab_size``) produce logits too; log-probs must
leave them out: ``psft_megatron.loss.token_stats.vocab_parallel_token_stats(..., vocab_size=V)``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence, TypeVar

import torch

from psft_megatron.data.batches import AttentionBackend, MicroBatch
from psft_megatron.data.context_parallel import split_micro_batches

__all__ = ["gather_logits", "pipeline_forward", "prepare_micro_batches", "run_pipeline"]

Item = TypeVar("Item")
# on_output(index, item, output, chunk) -> (loss, report), on the last pipeline stage.
OnOutput = Callable[[int, Any, torch.Tensor, Any], tuple[torch.Tensor, Any]]


def run_pipeline(
    chunks: Sequence[Any],
    items: Sequence[Item],
    call_model: Callable[[Any, Item], torch.Tensor],
    on_output: OnOutput,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
) -> list[Any]:
    """Run ``items`` (one micro-batch each) through megatron's pipeline schedule over ``chunks``.

    ``seq_length`` x ``micro_batch_size`` is the shape of every item as the pipeline sees it
    (all items alike; megatron divides ``seq_length`` by CP). Returns the ``report`` of each
    item in order on the last pipeline stage, an empty list elsewhere. Every rank of the
    model-parallel group must call this with the same number of items and shapes.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not items:
        return []

    def forward_step(data_iterator: Any, chunk: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
        index, item = next(data_iterator)
        output = call_model(chunk, item)

        def loss_func(output_tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
            return on_output(index, item, output_tensor, chunk)

        return output, loss_func

    # All chunks see the same items, so no stage loses packing boundaries.
    iterators = [iter(list(enumerate(items))) for _ in chunks]
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=list(chunks),
            num_microbatches=len(items),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )


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


def gather_logits(vocab_parallel_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits ``[..., vocab_size]`` (padding trimmed) gathered over TP."""
    from megatron.core import tensor_parallel

    full = tensor_parallel.gather_from_tensor_model_parallel_region(vocab_parallel_logits)
    return full[..., :vocab_size]


def pipeline_forward(
    chunks: list[Any],
    microbatches: list[dict[str, torch.Tensor]],
    on_last_stage: Callable[[torch.Tensor, dict[str, torch.Tensor]], Any],
) -> list[Any]:
    """Run ``chunks`` forward-only over ``microbatches`` (the scoring path of :func:`run_pipeline`).

    Every microbatch holds ``input_ids`` ``[b, s]`` (same b, s for all). On the
    last pipeline stage ``on_last_stage(logits, microbatch)`` is called with the
    vocab-parallel logits ``[b, s, V_pad/TP]``; its results are returned in order
    there, and an empty list on other stages. Every rank of the model-parallel
    group must call this with the same shapes.
    """
    b, s = microbatches[0]["input_ids"].shape
    device = next(chunks[0].parameters()).device
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)

    def call_model(chunk: Any, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        return chunk(mb["input_ids"].to(device), position_ids, None)

    def on_output(index: int, mb: dict[str, torch.Tensor], logits: torch.Tensor, chunk: Any) -> tuple[torch.Tensor, Any]:
        # Nothing to backpropagate: megatron keeps the second element, the result.
        return logits.new_zeros(()), on_last_stage(logits, mb)

    return run_pipeline(chunks, microbatches, call_model, on_output, seq_length=s, micro_batch_size=b,
                        forward_only=True)
