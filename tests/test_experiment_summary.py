"""experiments/psft_vs_sft/summarize.py: the headline table and the paired bootstrap, on folders
written here in the evaluate tool's formats, against means and intervals computed in the test."""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUMMARIZE = ROOT / "experiments" / "psft_vs_sft" / "summarize.py"


def _heldout(folder: Path, rows: list[tuple[float, float, int]]) -> None:
    """heldout.jsonl as evaluate.py writes it: per sample the mean NLL, mean KL and the token count."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"index": i, "nll": nll, "entropy": 1.0, "kl": kl, "num_tokens": n})
             for i, (nll, kl, n) in enumerate(rows)]
    (folder / "heldout.jsonl").write_text("\n".join(lines) + "\n")


def _samples(folder: Path, task: str, accs: list[float]) -> None:
    """lm-eval's per-item samples file: doc_id and acc."""
    out = folder / "lm_eval" / "model" / f"samples_{task}_2026-11-30T00-00-00.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"doc_id": i, "acc": a}) + "\n" for i, a in enumerate(accs)))


@pytest.fixture
def summarize():
    module = runpy.run_path(str(SUMMARIZE))

    def run(*argv: str) -> str:
        old = sys.argv
        sys.argv = ["summarize.py", *argv]
        try:
            module["main"]()
        finally:
            sys.argv = old
        return Path(argv[argv.index("--out") + 1]).read_text()

    return run, module


def test_table_means_are_token_weighted_and_intervals_paired(tmp_path, summarize):
    run, module = summarize
    out = tmp_path / "runs"
    sft = [(1.0, 0.30, 10), (2.0, 0.40, 30), (1.5, 0.20, 20)]
    psft = [(nll + 0.25, kl - 0.05, n) for nll, kl, n in sft]  # every item exactly 0.25 worse, 0.05 less KL
    _heldout(out / "start", [(3.0, 0.0, n) for _, _, n in sft])
    _heldout(out / "sft" / "eval" / "step_000008", sft)
    _heldout(out / "psft" / "eval" / "step_000008", psft)
    _samples(out / "sft" / "eval" / "step_000008" / "mmlu", "psft_mmlu_anatomy", [1, 0, 1, 0])
    _samples(out / "psft" / "eval" / "step_000008" / "mmlu", "psft_mmlu_anatomy", [0, 1, 1, 0])
    text = run(str(out), "--out", str(tmp_path / "table.md"))

    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "| step" in line}
    weighted = sum(nll * n for nll, _, n in sft) / sum(n for _, _, n in sft)  # 1.6667, not the plain 1.5
    assert f"| {weighted:.3f} |" in rows["sft"]
    assert f"| {weighted + 0.25:.3f} |" in rows["psft"]
    diffs = {(line.split(" | ")[0].strip("| "), line.split(" | ")[1]): line
             for line in text.splitlines() if line.count(" | ") == 4}
    # The same shift on every item: every resample gives it, the interval is that one point.
    assert "| +0.250 | [+0.250, +0.250] | worse |" in diffs[("psft", "held-out NLL")]
    assert "| -0.050 | [-0.050, -0.050] | better |" in diffs[("psft", "KL to start")]
    # MMLU: the same mean (0.5) from different items: difference 0, an interval around it.
    assert "| +0.000 |" in diffs[("psft", "MMLU acc")] and "no difference" in diffs[("psft", "MMLU acc")]


def test_paired_interval_matches_a_bootstrap_written_here(summarize):
    _, module = summarize
    rng_data = random.Random(5)
    a = {i: (rng_data.random(), 1.0) for i in range(40)}
    b = {i: (v + rng_data.gauss(0.1, 0.2), 1.0) for i, (v, _) in a.items()}
    d, lo, hi = module["paired_interval"](a, b, random.Random(0))
    # The reference: the same resampling, by hand, of per-item differences (weights are all 1).
    ids = sorted(a, key=str)
    per_item = {i: a[i][0] - b[i][0] for i in ids}
    rng = random.Random(0)
    boots = sorted(sum(per_item[ids[rng.randrange(len(ids))]] for _ in ids) / len(ids) for _ in range(2000))
    assert d == pytest.approx(sum(per_item.values()) / len(ids), abs=1e-12)
    assert (lo, hi) == pytest.approx((boots[50], boots[1949]), abs=1e-12)
    assert lo < d < hi


def _sampled(folder: Path, task: str, rows: list[tuple[float, float, float]]) -> None:
    """A sampled task's samples file: acc (mean@n), pass_at_n and distinct_answers per item."""
    out = folder / "lm_eval" / "model" / f"samples_{task}_2026-12-05T00-00-00.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"doc_id": i, "acc": a, "pass_at_n": p, "distinct_answers": d}) + "\n"
                           for i, (a, p, d) in enumerate(rows)))


def test_named_runs_against_a_chosen_baseline_with_pass_at_n_and_distinct_answers(tmp_path, summarize):
    run, _ = summarize
    out = tmp_path / "runs"
    base = [(0.25, 1.0, 3.0), (0.0, 0.0, 1.0), (0.5, 1.0, 4.0)]
    other = [(0.125, 1.0, 5.0), (0.0, 0.0, 3.0), (0.375, 1.0, 6.0)]  # 2 more distinct answers everywhere
    _heldout(out / "start", [(3.0, 0.0, 10)])
    for name, rows in (("long_sft", base), ("long_psft", other)):
        _heldout(out / name / "eval" / "step_000096", [(1.0, 0.1, 10)])
        _sampled(out / name / "eval" / "step_000096" / "svamp", "psft_svamp_n8", rows)
    text = run(str(out), "--runs", "long_sft", "long_psft", "--baseline", "long_sft", "--out", str(tmp_path / "t.md"))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "| step" in line}
    assert set(rows) == {"start", "long_sft", "long_psft"}
    header = next(line for line in text.splitlines() if line.startswith("| model | checkpoint"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in rows["long_psft"].strip("|").split("|")]
    got = dict(zip(cols, cells))
    assert got["SVAMP mean@8"] == f"{(0.125 + 0.375) / 3:.3f}"
    assert got["SVAMP pass@8"] == f"{2 / 3:.3f}"
    assert got["SVAMP distinct answers of 8"] == f"{14 / 3:.3f}"
    assert "Differences to long_sft" in text
    diffs = {(line.split(" | ")[0].strip("| "), line.split(" | ")[1]): line
             for line in text.splitlines() if line.count(" | ") == 4}
    assert "| +2.000 | [+2.000, +2.000] | higher |" in diffs[("long_psft", "SVAMP distinct answers of 8")]
    assert "no difference" in diffs[("long_psft", "SVAMP pass@8")]
