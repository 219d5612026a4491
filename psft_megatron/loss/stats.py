"""Loss statistics that combine exactly across micro-batches and data-parallel ranks.

Everything is kept as token-weighted sums (float64, on device: no host sync per
micro-batch) plus the ratio's min and max, so merging micro-batches is addition and the
DP reduction is one SUM plus one MIN and one MAX all-reduce. Means are taken only at the end.

Clip fraction is the share of response tokens whose gradient the trust region zeroes: for
PSFT (advantage +1) those with ratio > 1 + eps_high.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from psft_megatron.loss.groups import resolve_dp_cp_group
from psft_megatron.loss.objectives import TokenLosses

# Order of the entries of LossStats.sums.
SUM_FIELDS = ("token_count", "loss_sum", "logp_sum", "entropy_sum", "ratio_sum", "clipped_count")


@dataclass
class LossStats:
    """Token-weighted sums (``SUM_FIELDS`` order, float64) and ratio extrema over response tokens."""

    sums: torch.Tensor  # [len(SUM_FIELDS)] float64
    ratio_min: torch.Tensor  # 0-d float64; +inf when there are no tokens
    ratio_max: torch.Tensor  # 0-d float64; -inf when there are no tokens

    @classmethod
    def empty(cls, device: torch.device | str = "cpu") -> "LossStats":
        """Statistics of zero tokens (the identity of :meth:`merge`)."""
        f64 = dict(dtype=torch.float64, device=device)
        return cls(torch.zeros(len(SUM_FIELDS), **f64), torch.tensor(float("inf"), **f64), torch.tensor(float("-inf"), **f64))

    @classmethod
    def from_tokens(
        cls,
        losses: TokenLosses,
        logp: torch.Tensor,
        entropy: torch.Tensor | None,
        loss_mask: torch.Tensor,
    ) -> "LossStats":
        """Statistics of one micro-batch's response tokens (``loss_mask`` nonzero)."""
        with torch.no_grad():
            mask = loss_mask.bool()
            zero = torch.zeros((), dtype=torch.float64, device=logp.device)

            def msum(x: torch.Tensor) -> torch.Tensor:
                return torch.where(mask, x.double(), zero).sum()

            ent = msum(entropy) if entropy is not None else zero
            sums = torch.stack(
                [
                    mask.sum().double(),
                    msum(losses.loss),
                    msum(logp),
                    ent,
                    msum(losses.ratio),
                    (losses.clipped & mask).sum().double(),
                ]
            )
            ratio = losses.ratio.double()
            inf = torch.tensor(float("inf"), dtype=torch.float64, device=logp.device)
            rmin = torch.where(mask, ratio, inf).amin() if mask.numel() else inf
            rmax = torch.where(mask, ratio, -inf).amax() if mask.numel() else -inf
        return cls(sums, rmin, rmax)

    def merge(self, other: "LossStats") -> "LossStats":
        """Statistics of both token sets (e.g. accumulating micro-batches)."""
        return LossStats(
            self.sums + other.sums,
            torch.minimum(self.ratio_min, other.ratio_min),
            torch.maximum(self.ratio_max, other.ratio_max),
        )

    def summary(self) -> dict[str, float]:
        """Means and extrema as Python floats (one host sync); means are NaN with no tokens."""
        vals = dict(zip(SUM_FIELDS, self.sums.tolist()))
        n = vals["token_count"]
        div = (lambda x: x / n) if n > 0 else (lambda x: float("nan"))
        return {
            "token_count": n,
            "loss": div(vals["loss_sum"]),
            "mean_logp": div(vals["logp_sum"]),
            "mean_entropy": div(vals["entropy_sum"]),
            "ratio_mean": div(vals["ratio_sum"]),
            "clip_fraction": div(vals["clipped_count"]),
            "ratio_min": float(self.ratio_min),
            "ratio_max": float(self.ratio_max),
        }


def reduce_stats(stats: LossStats, group: dist.ProcessGroup | None = None) -> LossStats:
    """Combine every rank's statistics over ``group`` (default megatron's DP x CP group).

    Sums with SUM, the ratio minimum with MIN and maximum with MAX. Returns a new object,
    identical on every rank of the group.
    """
    sums, rmin, rmax = stats.sums.clone(), stats.ratio_min.clone(), stats.ratio_max.clone()
    group = resolve_dp_cp_group(group)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(rmin, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(rmax, op=dist.ReduceOp.MAX, group=group)
    return LossStats(sums, rmin, rmax)
