"""Forward-only passes over model chunks at any TP/PP (tools: scoring, conversion checks).

What each pipeline stage's ``GPTModel.forward`` needs:

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

from typing import Any, Callable

import torch

__all__ = ["pipeline_forward", "gather_logits"]


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
    """Run ``chunks`` forward-only over ``microbatches`` with megatron's pipeline schedule.

    Every microbatch holds ``input_ids`` ``[b, s]`` (same b, s for all). On the
    last pipeline stage ``on_last_stage(logits, microbatch)`` is called with the
    vocab-parallel logits ``[b, s, V_pad/TP]``; its results are returned in order
    there, and an empty list on other stages. Every rank of the model-parallel
    group must call this with the same shapes.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, s = microbatches[0]["input_ids"].shape
    device = next(chunks[0].parameters()).device
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)

    def step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
        batch = next(data_iterator)
        out = model(batch["input_ids"].to(device), position_ids, None)

        def collect(output_tensor: torch.Tensor, non_loss_data: bool = False) -> Any:
            return on_last_stage(output_tensor, batch)

        return out, collect

    iterators: Any = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iterators,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(microbatches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
            collect_non_loss_data=True,
        )
