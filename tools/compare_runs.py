"""Compare runs: training curves (PNG) and evaluation results side by side (markdown).

    python tools/compare_runs.py RUN_DIR [RUN_DIR ...] --out DIR

RUN_DIR: a training run folder (``logging.run_dir``, with ``metrics.jsonl``) and/or an
evaluation output (``tools/evaluate.py --out``, with ``summary.json``); evaluations kept inside a
run folder (``RUN_DIR/eval/summary.json``, ``RUN_DIR/eval/step_N/summary.json``) are found too.

Writes into DIR: ``loss.png``, ``entropy.png``, ``clip_frac.png``, ``ratio.png`` (min..max band
around the mean), ``grad_norm.png`` and, when logged, ``eval_loss.png`` / ``eval_entropy.png``
(every run on each), and ``compare.md``: each run's last training step, then one row per
evaluation metric with one column per evaluation.

Exit status: 0 done; 2 bad input (a folder that is missing or holds neither file, an unreadable
line): one "error: ..." line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output folder (PNG plots and compare.md)")
    args = p.parse_args(argv)

    from psft_megatron.evaluation.compare import CompareError, compare_runs

    try:
        written = compare_runs(args.runs, args.out)
    except (CompareError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"wrote {written['markdown']} and {len(written['plots'])} plot(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
