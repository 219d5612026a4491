"""psft-compare by path: training curves and evaluation results of several runs side by side.

    python tools/compare_runs.py RUN_DIR [RUN_DIR ...] --out DIR

The command: ``psft-compare`` (``psft_megatron/cli/compare.py``).
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
