"""psft-export-hf by path: export a psft_megatron checkpoint as a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --ckpt CKPT_DIR --out HF_DIR [--dtype auto] [--tokenizer DIR] [--overwrite]

The command: ``psft-export-hf`` (``psft_megatron/cli/export_hf.py``).
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.export_hf import main

if __name__ == "__main__":  # the dist-checkpoint machinery may start a spawn-context process: keep this guard
    sys.exit(main())
