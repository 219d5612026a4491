"""psft-evaluate by path: lm-eval tasks, held-out NLL and entropy, and KL drift of a checkpoint.

    torchrun --nproc-per-node N tools/evaluate.py --ckpt CKPT --tasks gsm8k,math500,mmlu,truthfulqa_mc1 \
        --data-root DATA --out OUT [--limit N] [--tp 1] [--pp 1] [--heldout FILE [--adapter gsm8k]] [--ref REF]

The command: ``psft-evaluate`` (``psft_megatron/cli/evaluate.py``).
Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import os
import sys

from psft_megatron.cli.evaluate import main  # noqa: F401  (for callers that run this file in-process)

if __name__ == "__main__":
    # Run as a module instead (the same process: torchrun's worker keeps its pid): Python puts a
    # script's folder first on the module path, where this file's name would hide Hugging Face's
    # `evaluate` package, which lm-eval imports. -P keeps the working folder off the path too.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "psft_megatron.cli.evaluate", *sys.argv[1:]])
