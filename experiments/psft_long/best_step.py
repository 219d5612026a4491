#!/usr/bin/env python
"""The kept checkpoint of a run with the lowest held-out NLL (the early-stopping point to evaluate).

    python experiments/psft_long/best_step.py runs/psft_long/long/sft    # prints e.g. step_000096

The rule lives in curves.py (``best_kept_step``), next to the one reader of ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from curves import best_kept_step  # run as a script, this file's folder is first on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    print(best_kept_step(p.parse_args().run_dir))


if __name__ == "__main__":
    main()
