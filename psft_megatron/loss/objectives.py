"""Per-token training objectives, chosen by name from a small registry, each declaring its inputs.

Every objective maps per-token log-probs (differentiable) and the auxiliary log-probs it
declares (detached) to an unnormalised per-token loss:

* ``snapshot``: ``logp_old`` from a forward-only pass per global batch with the weights
  of that moment (the trust region's anchor; psft);
* ``reference``: ``logp_ref`` from a frozen reference model, the run's starting weights
  (sft_kl).

The trainer reads the declaration and runs the snapshot or reference pass only for
objectives that need it. Masking and normalisation happen outside
(:mod:`psft_megatron.loss.normalize`); the statistics (ratio, clip) come with the losses
for :mod:`psft_megatron.loss.stats`.

Adding an objective is one function and its declaration::

    @register_objective("my_obj", needs=("snapshot",))
    def my_obj(logp, aux, cfg):
        r = (logp - aux.logp_old).exp()
        return -r, r.detach() > 2.0   # (per-token loss, bool "gradient clipped" mask or None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

NEEDS = ("snapshot", "reference")


@dataclass(frozen=True)
class AuxLogp:
    """The detached per-token log-probs an objective declared (None where not declared)."""

    logp_old: torch.Tensor | None = None
    logp_ref: torch.Tensor | None = None


# (logp, aux, config) -> (per-token loss, per-token bool clipped mask or None)
ObjectiveFn = Callable[[torch.Tensor, AuxLogp, "ObjectiveConfig"], tuple[torch.Tensor, "torch.Tensor | None"]]


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registered objective: its function and the auxiliary passes it needs."""

    fn: ObjectiveFn
    needs: frozenset[str]


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, needs: tuple[str, ...] = ()) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """Decorator registering ``fn`` under ``name``; ``needs`` lists the passes it consumes
    (a subset of :data:`NEEDS`)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"objective {name!r} declares unknown inputs {sorted(unknown)}; known: {list(NEEDS)}")

    def deco(fn: ObjectiveFn) -> ObjectiveFn:
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} is already registered")
        _OBJECTIVES[name] = ObjectiveSpec(fn, frozenset(needs))
        return fn

    return deco


def get_objective(name: str) -> ObjectiveSpec:
    """The registered objective called ``name``."""
    try:
        return _OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(_OBJECTIVES)}") from None


def objective_names() -> list[str]:
    """Names of all registered objectives."""
    return sorted(_OBJECTIVES)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which objective to train with and its trust-region parameters.

    ``eps_low``/``eps_high`` bound the PSFT ratio to ``[1-eps_low, 1+eps_high]``;
    ``log_ratio_clamp`` bounds ``logp - logp_old`` before ``exp`` so a stale or
    mismatched snapshot cannot overflow.
    """

    name: str = "psft"
    eps_low: float = 0.2
    eps_high: float = 0.28
    log_ratio_clamp: float = 20.0
    # sft_kl: weight of the per-token KL penalty towards the reference (the starting weights).
    kl_beta: float = 0.1
    # Run the output layer and the token statistics together, chunk by chunk, so the
    # [tokens, vocab/TP] logits never exist (psft_megatron.loss.fused_head).
    fused_output_layer: bool = False

    def __post_init__(self) -> None:
        get_objective(self.name)  # fail at config time on a typo
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0.0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.log_ratio_clamp <= 0.0:
            raise ValueError(f"log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")
        if self.kl_beta < 0.0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")

    @property
    def needs_snapshot(self) -> bool:
        """The objective consumes logp_old from a snapshot pass per global batch."""
        return "snapshot" in get_objective(self.name).needs

    @property
    def needs_reference(self) -> bool:
        """The objective consumes logp_ref from the frozen reference model."""
        return "reference" in get_objective(self.name).needs


@dataclass
class TokenLosses:
    """Per-token objective outputs, shaped like the labels.

    ``loss`` is unnormalised and exactly 0 (value and gradient) where the mask is 0.
    ``ratio`` is the detached ``exp(clamp(logp - logp_old))`` (ones without ``logp_old``);
    ``clipped`` marks tokens whose gradient the trust region zeroes.
    """

    loss: torch.Tensor
    ratio: torch.Tensor
    clipped: torch.Tensor


def log_ratio(logp: torch.Tensor, logp_old: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """``clamp(logp - logp_old, -c, c)``; differentiable in ``logp``, ``logp_old`` detached."""
    c = cfg.log_ratio_clamp
    return (logp - logp_old.detach()).clamp(-c, c)


@register_objective("sft")
def sft(logp: torch.Tensor, aux: AuxLogp, cfg: ObjectiveConfig):
    """Negative log-likelihood."""
    return -logp, None


@register_objective("dft")
def dft(logp: torch.Tensor, aux: AuxLogp, cfg: ObjectiveConfig):
    """Dynamic fine-tuning: ``-stopgrad(p) * logp`` (each token's NLL weighted by its probability)."""
    return -logp.detach().exp() * logp, None


# Bounds of the KL estimate per token, as verl's kl_penalty("low_var_kl") uses, so one token
# whose reference probability collapsed cannot dominate a mini-batch.
KL_CLAMP = 10.0


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) at a token: ``exp(d) - d - 1`` with
    ``d = logp_ref - logp``, clamped to ``[-10, 10]``.

    Non-negative, 0 with zero gradient where the policy equals the reference, and low-variance.
    Evaluated on the demonstration's tokens (teacher forcing), as verl's ``kl_loss`` is for SFT
    with a KL term; it is then a penalty on drift at the data's tokens, not an unbiased estimate
    of the full-vocabulary KL (that is what evaluation's drift metric measures).
    """
    d = logp_ref.detach() - logp
    return (d.exp() - d - 1.0).clamp(-KL_CLAMP, KL_CLAMP)


@register_objective("sft_kl", needs=("reference",))
def sft_kl(logp: torch.Tensor, aux: AuxLogp, cfg: ObjectiveConfig):
    """SFT plus ``kl_beta`` x the per-token KL estimate towards the frozen reference (:func:`kl_k3`)."""
    if aux.logp_ref is None:
        raise ValueError("sft_kl needs logp_ref (log-probs of the frozen reference model)")
    return -logp + cfg.kl_beta * kl_k3(logp, aux.logp_ref), None


@register_objective("psft", needs=("snapshot",))
def psft(logp: torch.Tensor, aux: AuxLogp, cfg: ObjectiveConfig):
    """PPO's clipped surrogate with advantage +1: ``-min(r, clip(r, 1-eps_low, 1+eps_high))``.

    With A = +1 the min picks the clipped (constant) branch only when r > 1+eps_high;
    below 1-eps_low the min is r itself, so those tokens keep their gradient. Written as a
    ``where`` so the unclipped branch's gradient is exactly ``-r * dlogp`` (for r == 1,
    i.e. ``logp_old == logp``, exactly SFT's gradient) with no tie-splitting of ``min``.
    """
    if aux.logp_old is None:
        raise ValueError("psft needs logp_old (log-probs from the snapshot forward pass)")
    r = log_ratio(logp, aux.logp_old, cfg).exp()
    clipped = r.detach() > 1.0 + cfg.eps_high
    loss = -torch.where(clipped, torch.full_like(r, 1.0 + cfg.eps_high), r)
    return loss, clipped


@register_objective("psft_unweighted", needs=("snapshot",))
def psft_unweighted(logp: torch.Tensor, aux: AuxLogp, cfg: ObjectiveConfig):
    """A diagnostic: PSFT's clip without its ratio weighting. SFT's gradient ``-dlogp`` where
    ``r <= 1+eps_high``, none above, so the trust region's two effects can be told apart
    (PSFT's unclipped gradient is ``-r * dlogp``: tokens whose probability rose since the
    snapshot are pushed harder, those that fell more softly)."""
    if aux.logp_old is None:
        raise ValueError("psft_unweighted needs logp_old (log-probs from the snapshot forward pass)")
    clipped = log_ratio(logp, aux.logp_old, cfg).detach().exp() > 1.0 + cfg.eps_high
    return torch.where(clipped, torch.zeros_like(logp), -logp), clipped


def token_losses(
    cfg: ObjectiveConfig,
    logp: torch.Tensor,
    loss_mask: torch.Tensor,
    logp_old: torch.Tensor | None = None,
    logp_ref: torch.Tensor | None = None,
) -> TokenLosses:
    """Run the configured objective and zero masked tokens (value and gradient).

    ``where`` rather than multiplying by the mask, so a garbage logp on a masked token
    (label -100) can never turn into NaN.
    """
    mask = loss_mask.bool()
    loss, clipped = get_objective(cfg.name).fn(logp, AuxLogp(logp_old, logp_ref), cfg)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    with torch.no_grad():
        ratio = log_ratio(logp, logp_old, cfg).exp() if logp_old is not None else torch.ones_like(logp)
        clipped = (clipped if clipped is not None else torch.zeros_like(mask)) & mask
    return TokenLosses(loss=loss, ratio=ratio.detach(), clipped=clipped)
