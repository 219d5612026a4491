"""Warnings that megatron-core and torch print on every run of an entry point, silenced.

They say nothing about the run (a CPU machine has no TransformerEngine or apex; megatron's
own deprecation notices), are printed once per rank, and would bury the one ``error: ...``
line that the launcher and the tools print for bad input. Torch-free: the tools call it before
their fast, torch-free input checks.
"""

from __future__ import annotations

import warnings


def quiet_known_warnings() -> None:
    """Ignore the known, uninformative warnings of megatron-core and torch in this process."""
    warnings.filterwarnings("ignore", message="(Transformer Engine and )?Apex (is|are) not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    warnings.filterwarnings("ignore", category=FutureWarning, module="(torch|megatron)")
