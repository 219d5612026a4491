"""Generate the small self-contained data set of recipes/tiny_cpu.yaml (see psft_megatron.data.synthetic).

    python tools/make_tiny_dataset.py [OUT=data/tiny] [--train N] [--eval N] [--vocab-size V] [--seed S]

Exit status: 0 done; 2 bad input (a negative or zero count, an OUT that cannot be written): one
"error: ..." line on stderr, no traceback; 2 also for bad usage (argparse prints the usage
first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import sys

from psft_megatron.cli.shell import run_command
from psft_megatron.errors import UserError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="data/tiny", help="output folder (default data/tiny)")
    p.add_argument("--train", type=int, default=4000, help="training samples")
    p.add_argument("--eval", type=int, default=400, help="held-out samples")
    p.add_argument("--vocab-size", type=int, default=384, help="BPE vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    return p


def make(args: argparse.Namespace) -> int:
    from psft_megatron.data.synthetic import write_tiny_dataset

    if args.train < 1 or args.eval < 0:
        raise UserError(f"--train {args.train} --eval {args.eval}: need at least one training sample and no "
                        "negative count")
    out = write_tiny_dataset(args.out, args.train, args.eval, args.vocab_size, args.seed)
    print(f"wrote {args.train} train / {args.eval} eval samples and a {args.vocab_size}-token tokenizer to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``tools/make_tiny_dataset.py``: the exit status (see the module docstring)."""
    args = parser().parse_args(argv)
    return run_command(lambda: make(args), user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
