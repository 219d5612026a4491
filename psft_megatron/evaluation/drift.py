"""KL drift: the mean per-token KL between a checkpoint and a reference checkpoint on held-out data.

    drift = sum over response tokens of KL(p_model(. | prefix) || p_ref(. | prefix)) / tokens

with the full-vocabulary KL of each position computed vocab-parallel
(:func:`~psft_megatron.loss.kl.vocab_parallel_kl`, no gather). The direction is the one an
RLHF KL penalty uses: expectations under the evaluated model. It needs no labels: it says how
far fine-tuning moved the model's predictions on text like its training data, the "did not
wreck it" number. Both models are built at the same layout (twice the weights' memory); per
batch the reference runs first and its last-stage logits are kept for the model's pass.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from psft_megatron.evaluation.driver import Driver
from psft_megatron.evaluation.heldout import HeldoutSample, labelled_groups
from psft_megatron.evaluation.scoring import dp_share, holds_results, length_multiple
from psft_megatron.evaluation.session import ScoringModel
from psft_megatron.loss.kl import vocab_parallel_kl
from psft_megatron.model.forward import pipeline_forward

__all__ = ["KL", "drift_scores", "kl_handler"]

KL = "kl"


def kl_handler(model: ScoringModel, ref: ScoringModel, batch_size: int, pad_id: int) -> Callable[[Any], Any]:
    """The driver command: ``(index, kl_sum, tokens)`` for this replica's samples."""
    if model.vocab_size != ref.vocab_size:
        raise ValueError(f"vocabularies differ: {model.source} has {model.vocab_size}, {ref.source} {ref.vocab_size}")

    def handle(samples: Sequence[tuple[list[int], list[int]]]) -> list[tuple[int, float, int]]:
        mine = dp_share(len(samples))
        local = [samples[i] for i in mine]
        out: list[tuple[int, float, int]] = []
        for group in labelled_groups(local, batch_size, pad_id, length_multiple(model)):
            ref_logits = pipeline_forward(ref.chunks, group.microbatches, lambda logits, mb: logits)

            def on_last_stage(logits: torch.Tensor, mb: dict[str, torch.Tensor]) -> list[tuple[int, float, int]]:
                q = ref_logits[int(mb["mb"])]
                kl = vocab_parallel_kl(logits, q, vocab_size=model.vocab_size)
                mask = mb["mask"].to(kl.device)
                sums = (kl.double() * mask).sum(1)
                n = mask.sum(1)
                rows = mb["rows"].tolist()
                return [(rows[r], float(sums[r]), int(n[r])) for r in range(len(rows)) if rows[r] >= 0]

            for part in pipeline_forward(model.chunks, group.microbatches, on_last_stage):
                out.extend(part)
        return [(mine[i], s, n) for i, s, n in out] if holds_results() else []

    return handle


def drift_scores(driver: Driver, samples: Sequence[HeldoutSample]) -> dict[str, Any]:
    """``{"kl", "tokens", "samples", "per_sample"}``: the token-weighted mean KL and each sample's mean (rank 0)."""
    per: dict[int, tuple[float, int]] = {}
    for part in driver.call(KL, [(s.ids, s.loss_mask) for s in samples]):
        for i, s, n in part:
            per[i] = (s, n)
    total = sum(s for s, _ in per.values())
    tokens = sum(n for _, n in per.values())
    return {
        "kl": total / tokens if tokens else None,
        "tokens": tokens,
        "samples": len(samples),
        "per_sample": [per[i][0] / per[i][1] if per[i][1] else None for i in range(len(samples))],
    }
