#!/usr/bin/env python
"""Generate the small self-contained data set of recipes/tiny_cpu.yaml.

    python tools/make_tiny_dataset.py [OUT=data/tiny] [--train N] [--eval N] [--vocab-size V] [--seed S]

The command: ``psft_megatron/cli/make_tiny_dataset.py``.
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.make_tiny_dataset import main

if __name__ == "__main__":
    sys.exit(main())
