"""Compare runs: training curves (PNG) and evaluation results side by side (markdown).

    psft-compare RUN_DIR [RUN_DIR ...] --out DIR
    python tools/compare_runs.py ...        (the same, by path)

RUN_DIR: a training run folder (``logging.run_dir``, with ``metrics.jsonl``) and/or an
evaluation output (``psft-evaluate --out``, with ``summary.json``); evaluations kept inside a
run folder (``RUN_DIR/eval/summary.json``, ``RUN_DIR/eval/step_N/summary.json``) are found too.

Writes into DIR: ``loss.png``, ``entropy.png``, ``clip_frac.png``, ``ratio.png`` (min..max band
around the mean), ``grad_norm.png`` and, when logged, ``eval_loss.png`` / ``eval_entropy.png``
(every run on each), and ``compare.md``: each run's last training step, then one row per
evaluation metric with one column per evaluation.

Exit status: 0 done; 2 bad input (a folder that is missing or holds neither file, an unreadable
line, an unwritable DIR): one "error: ..." line on stderr, no traceback; 2 also for bad usage
(argparse prints the usage first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import sys

from psft_megatron.cli.shell import run_command

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output folder (PNG plots and compare.md)")
    return p


def compare(args: argparse.Namespace) -> int:
    from psft_megatron.evaluation.compare import compare_runs

    written = compare_runs(args.runs, args.out)
    print(f"wrote {written['markdown']} and {len(written['plots'])} plot(s) to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``psft-compare``: the exit status (see the module docstring)."""
    args = parser().parse_args(argv)
    return run_command(lambda: compare(args), user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
