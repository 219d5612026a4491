"""GPTModel whose last stage hands the loss its vocab-parallel logits as they are.

megatron's ``GPTModel.forward`` either returns logits transposed to ``[b, s, V/TP]``
through ``.contiguous()`` (a full copy of the largest activation in the model) or,
given labels, its own cross-entropy, which has no entropy, no PSFT ratio and
overwrites fp32 logits in place. PSFT needs the output layer's ``[s, b, V/TP]``
logits untouched: with ``labels`` passed, this subclass returns exactly those.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from torch import Tensor


class PSFTGPTModel(GPTModel):
    """``forward(..., labels=...)`` returns the ``[s, b, V/TP]`` logits (no copy) instead of a loss."""

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        # Called by GPTModel._postprocess when labels are given: skip megatron's CE and
        # hand the logits to psft_megatron.loss, which computes logp, entropy and the objective.
        return logits
