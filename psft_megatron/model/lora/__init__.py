"""LoRA adapters on megatron-core's parallel linears (the ``model.lora`` recipe section).

Belongs here: the section (``config``), which linears of a family take adapters (``targets``, read
from the family's weight table), the LoRA linear classes sharded like their base (``layers``), the
layer spec that builds them (``spec``), and what a built model's adapters need (``state``:
freezing the base, first values, switching them off).
Not here: adapter checkpoints (``psft_megatron.checkpoint.lora``), exporting them merged or as a
PEFT folder (``psft_megatron.conversion``).
"""

from psft_megatron.model.lora.config import ALL_PROJECTIONS, LoRAConfig

__all__ = ["ALL_PROJECTIONS", "LoRAConfig"]
