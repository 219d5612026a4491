"""psft-convert-hf by path: convert a Hugging Face model folder into a psft_megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out CKPT_DIR [--vocab-divisible-by 128] [--overwrite]

The command: ``psft-convert-hf`` (``psft_megatron/cli/convert_hf.py``).
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.convert_hf import main

if __name__ == "__main__":  # the dist-checkpoint writer may start a spawn-context process: keep this guard
    sys.exit(main())
