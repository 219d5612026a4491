"""``python -m psft_megatron.train``: ``psft-train`` as a module, the form ``torchrun -m`` runs.

    torchrun --nproc-per-node 8 -m psft_megatron.train recipes/qwen2.5_7b_math.yaml [key.sub=value ...]

Everything else (options, exit statuses) is :mod:`psft_megatron.cli.train`'s.
"""

from __future__ import annotations

import sys

from psft_megatron.cli.train import main

__all__ = ["main"]

if __name__ == "__main__":  # guard: dist checkpointing's async writer spawns processes that import __main__
    sys.exit(main())
