#!/usr/bin/env python
"""The SFT learning rate expected to end at a given KL to the start model (the lower-lr SFT baseline).

    python experiments/psft_long/match_lr.py runs/psft_long/long/sft --kl 0.80    # prints e.g. 1.3e-05

The issue's baseline asks whether PSFT is just smaller steps: SFT at a lower learning rate, chosen so
that its KL to the start model at the end is close to PSFT's. One more SFT run per guess is an hour
here, so the guess comes from the SFT run already made: scaling the whole lr schedule by c moves the
weights along about the same path, c times as far (gradient flow in the "time" sum of lr), so SFT at
c x lr ends near where SFT at lr stood when its cumulative lr reached c x its total. The answer is
c x the run's peak lr, with c read off SFT's held-out KL curve (linear between evaluations). A
heuristic: the data order is the same but the epochs fall at other points of the path, so the run
that uses it reports its own final KL, which is what the comparison uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from curves import read_metrics  # run as a script, this file's folder is first on sys.path


def lr_scale_for_kl(run_dir: Path, target_kl: float) -> float:
    """c in (0, 1]: the fraction of the run's cumulative lr at which its held-out KL first reaches
    ``target_kl`` (1.0 if it never does)."""
    train, evals = read_metrics(run_dir)
    cum, total = {0: 0.0}, 0.0
    for row in train:
        total += float(row["lr"])
        cum[int(row["step"])] = total
    points = [(cum[int(e["step"])], float(e["kl"])) for e in evals if "kl" in e and int(e["step"]) in cum]
    if len(points) < 2:
        raise SystemExit(f"error: {run_dir / 'metrics.jsonl'}: fewer than two evaluations with a KL")
    for (t0, k0), (t1, k1) in zip(points, points[1:]):
        if k0 <= target_kl <= k1 and k1 > k0:
            return (t0 + (target_kl - k0) / (k1 - k0) * (t1 - t0)) / total
    return 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="the SFT run (metrics.jsonl with lr per step and eval KL)")
    p.add_argument("--kl", type=float, required=True, help="the KL to the start model to end at")
    args = p.parse_args()
    peak = max(float(r["lr"]) for r in read_metrics(args.run_dir)[0])
    print(f"{lr_scale_for_kl(args.run_dir, args.kl) * peak:.3g}")


if __name__ == "__main__":
    main()
