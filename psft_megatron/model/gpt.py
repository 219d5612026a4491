"""GPTModel whose last stage hands the loss its vocab-parallel logits, or the hidden states.

megatron's ``GPTModel.forward`` either returns logits transposed to ``[b, s, V/TP]``
through ``.contiguous()`` (a full copy of the largest activation in the model) or,
given labels, its own cross-entropy, which has no entropy, no PSFT ratio and
overwrites fp32 logits in place. PSFT needs the output layer's ``[s, b, V/TP]``
logits untouched: with ``labels`` passed, this subclass returns exactly those.

With ``fused_output_layer`` set (``loss.fused_output_layer``), the last stage given
``labels`` skips the output layer altogether and returns the final-norm hidden states
``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism), the very tensor the output
layer would have read; :func:`loss_head` gives the loss the output weight to go with them,
and the fused head (:mod:`psft_megatron.loss.fused_head_loss` for training,
:mod:`psft_megatron.loss.fused_head` for the snapshot and evaluation passes) computes logp,
entropy and the loss's gradients without ever holding the logits. Without ``labels`` (generation, scoring tools) the model
returns logits as megatron does, fused or not.
"""

from __future__ import annotations

from typing import Any

from megatron.core.models.gpt import GPTModel
from torch import Tensor

from psft_megatron.loss.fused_head import OutputHead


class PSFTGPTModel(GPTModel):
    """``forward(..., labels=...)`` returns the ``[s, b, V/TP]`` logits (no copy) instead of a loss,
    or with ``fused_output_layer`` the hidden states the output layer would read."""

    def __init__(self, *args: Any, fused_output_layer: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fused_output_layer = fused_output_layer

    @property
    def fused_output_layer(self) -> bool:
        return self._fused_output_layer

    @fused_output_layer.setter
    def fused_output_layer(self, value: bool) -> None:
        # Multi-token prediction runs the output layer on extra hidden states inside the model.
        if value and self.config.mtp_num_layers:
            raise ValueError("loss.fused_output_layer does not combine with multi-token prediction (mtp_num_layers)")
        self._fused_output_layer = bool(value)

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        # Called by GPTModel._postprocess when labels are given: skip megatron's CE and
        # hand the logits to psft_megatron.loss, which computes logp, entropy and the objective.
        return logits

    def _postprocess(
        self, hidden_states: Tensor, input_ids: Tensor, position_ids: Tensor, labels: Tensor, **kwargs: Any
    ) -> Tensor:
        # megatron's forward calls this with keywords only. Everything before the output layer
        # (the decoder, its final norm) has run: hand the loss the output layer's input.
        if (
            self.fused_output_layer
            and self.post_process
            and labels is not None
            and kwargs.get("inference_context") is None
        ):
            return hidden_states
        return super()._postprocess(
            hidden_states=hidden_states, input_ids=input_ids, position_ids=position_ids, labels=labels, **kwargs
        )

    def output_head(self) -> OutputHead:
        """The output layer's local weight shard (the tied embedding where shared), SP flag and TP group."""
        if not self.post_process:
            raise RuntimeError("output_head() exists on the last pipeline stage only")
        layer = self.output_layer
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else layer.weight
        return OutputHead(weight=weight, sequence_parallel=bool(layer.sequence_parallel), tp_group=layer.tp_group)


def loss_head(chunk: Any) -> OutputHead | None:
    """What the trainer's ``loss_func`` passes as ``head=`` for this model chunk.

    ``chunk`` may be wrapped (megatron DDP / Float16Module). An :class:`OutputHead` when the
    chunk runs the fused output layer on this (last) stage, so its output is hidden states;
    None otherwise (its output is the logits, or it is not a last stage).
    """
    while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
        chunk = chunk.module
    if getattr(chunk, "fused_output_layer", False) and chunk.post_process:
        return chunk.output_head()
    return None
