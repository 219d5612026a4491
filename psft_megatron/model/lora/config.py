"""The ``model.lora`` recipe section: low-rank adapters on the layers' linears, the base frozen.

    model:
      lora:
        rank: 16
        alpha: 32
        dropout: 0.0
        target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]

Each targeted projection ``W`` computes ``W x + (alpha / rank) * B A dropout(x)``, as PEFT's LoRA
does; ``A`` (``rank x in``) starts random, ``B`` (``out x rank``) at zero, so step 0 is the base
model exactly. Only A and B train (in fp32 master weights like any trained parameter); the base
weights are frozen: no gradients, no optimizer state. The base is the full checkpoint named by
``checkpoint.init_from`` (or the base a LoRA checkpoint there points at).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psft_megatron.config.load import FieldError
from psft_megatron.model.lora.targets import resolve_targets

__all__ = ["ALL_PROJECTIONS", "LoRAConfig"]

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    """Rank, scale, dropout and target modules of the adapters (see the module docstring)."""

    rank: int = 16
    # The adapter's output is scaled by alpha / rank (PEFT's lora_alpha).
    alpha: float = 32.0
    # Dropout on the adapter's input, in training passes that compute gradients only: the snapshot,
    # reference and evaluation passes (forward-only) see the adapters without it.
    dropout: float = 0.0
    # HF projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) and/or
    # Megatron's module names (linear_qkv = q, k and v; linear_proj = o; linear_fc1 = gate and up;
    # linear_fc2 = down). Each projection gets its own A and B, also inside the fused linears.
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))

    @property
    def scale(self) -> float:
        """The factor on the adapter's output: alpha / rank."""
        return self.alpha / self.rank

    def validate(self, family: str) -> None:
        """Check the fields and that every target exists in ``family``; FieldError names the field."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise FieldError("model.lora.rank", f"must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise FieldError("model.lora.alpha", f"must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise FieldError("model.lora.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise FieldError("model.lora.target_modules", "is empty: name at least one projection, e.g. [q_proj, v_proj]")
        try:
            resolve_targets(family, list(self.target_modules))
        except ValueError as e:
            raise FieldError("model.lora.target_modules", str(e)) from None
