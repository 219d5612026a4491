#!/usr/bin/env python
"""The kept checkpoint of a run with the lowest held-out NLL (the early-stopping point to evaluate).

    python experiments/psft_long/best_step.py runs/psft_long/long/sft    # prints e.g. step_000096

Reads the run's ``metrics.jsonl`` eval rows (``"split": "eval"``, held-out NLL in ``loss``) and
``checkpoints/step_*``; only steps with both an evaluation and a checkpoint on disk are candidates
(checkpoint.keep_every keeps every N-th), so the answer is always a checkpoint that can be evaluated.
Ties go to the earlier step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def best_kept_step(run_dir: Path) -> str:
    """``step_NNNNNN`` of the kept checkpoint with the lowest held-out NLL; step 0 is not a checkpoint."""
    evals: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{n}: not JSON ({e.msg})") from None
        if row.get("split") == "eval":
            evals[int(row["step"])] = float(row["loss"])  # a resumed run's repeat keeps the last
    kept = {int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()}
    candidates = sorted(s for s in kept & set(evals) if s > 0)
    if not candidates:
        raise SystemExit(f"error: {run_dir}: no checkpoint on disk has a held-out evaluation in {path}")
    best = min(candidates, key=lambda s: (evals[s], s))
    return f"step_{best:06d}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    print(best_kept_step(p.parse_args().run_dir))


if __name__ == "__main__":
    main()
