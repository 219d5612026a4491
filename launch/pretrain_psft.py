#!/usr/bin/env python
"""psft-train by path: train a PSFT recipe under torchrun, or check or plan it.

    torchrun --nproc-per-node N launch/pretrain_psft.py RECIPE.yaml [key.sub=value ...]
    launch/pretrain_psft.py RECIPE.yaml --validate-only | --plan --world-size 64 --gpu h100-80gb

The command: ``psft-train`` (``psft_megatron/cli/train.py``; also ``python -m psft_megatron.train``).
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.train import main

if __name__ == "__main__":  # guard: dist checkpointing's async writer spawns processes
    sys.exit(main())
