"""Per-example mean NLL of the response tokens (teacher-forced) under a model checkpoint.

    torchrun --nproc-per-node N tools/score.py --ckpt CKPT_DIR --data data.jsonl --out scores.jsonl \
        [--tp 1] [--pp 1] [--prompt-key prompt] [--response-key response] [--add-bos] \
        [--max-length N] [--batch-size 8] [--tokenizer DIR] [--dtype fp32|bf16]

The command: ``psft-evaluate --mode nll`` (``psft_megatron/cli/evaluate_nll.py``), with the same
options. Its --help lists the options and the exit statuses. This file keeps the path that the
README, job scripts and users call; it needs the package installed (``pip install -e .``).
"""

import sys

from psft_megatron.cli.evaluate import main as evaluate


def main(argv: list[str] | None = None) -> int:
    """``psft-evaluate --mode nll ARGV``: its exit status."""
    return evaluate(["--mode", "nll", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
