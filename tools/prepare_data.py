"""psft-prepare-data by path: tokenise data sources into a token cache ahead of a run.

    python tools/prepare_data.py --tokenizer PATH --out CACHE_DIR \
        (--source source.yaml | --path data.jsonl --adapter gsm8k)

The command: ``psft-prepare-data`` (``psft_megatron/cli/prepare_data.py``).
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
