#!/usr/bin/env python
"""Generate the small self-contained data set of recipes/tiny_cpu.yaml (see psft_megatron.data.synthetic).

    python tools/make_tiny_dataset.py [OUT=data/tiny] [--train N] [--eval N] [--vocab-size V] [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psft_megatron.data.synthetic import write_tiny_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="data/tiny", help="output folder (default data/tiny)")
    p.add_argument("--train", type=int, default=4000, help="training samples")
    p.add_argument("--eval", type=int, default=400, help="held-out samples")
    p.add_argument("--vocab-size", type=int, default=384, help="BPE vocabulary size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = write_tiny_dataset(args.out, args.train, args.eval, args.vocab_size, args.seed)
    print(f"wrote {args.train} train / {args.eval} eval samples and a {args.vocab_size}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
