"""experiments/psft_long/curves.py: windowed and running token-weighted means of metrics.jsonl rows,
checked against means computed here, and a resumed run's repeated step counted once."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CURVES = runpy.run_path(str(ROOT / "experiments" / "psft_long" / "curves.py"))


def _write(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _step(step: int, entropy: float, tokens: int, logp: float = -1.0, clip: float = 0.0) -> dict:
    return {"step": step, "phase": "psft", "loss": -logp, "entropy": entropy, "mean_logp": logp,
            "clip_frac": clip, "ratio_max": 1.0 + clip, "tokens": tokens}


def test_window_means_weight_each_step_by_its_tokens(tmp_path):
    rows = [_step(1, 1.0, 100), _step(2, 0.5, 300), _step(3, 0.2, 50), _step(4, 0.4, 150), _step(5, 0.9, 10)]
    _write(tmp_path / "a", rows)
    train, _ = CURVES["read_metrics"](tmp_path / "a")
    got = CURVES["window_means"](train, "entropy", 2)
    expected = [(2, (1.0 * 100 + 0.5 * 300) / 400), (4, (0.2 * 50 + 0.4 * 150) / 200), (5, 0.9)]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-12)
    steps, values = CURVES["running_mean"](train, "entropy", 3)
    assert steps == [1, 2, 3, 4, 5]
    assert values[2] == pytest.approx((100 + 150 + 10) / 450, rel=1e-12)
    assert values[4] == pytest.approx((0.2 * 50 + 0.4 * 150 + 0.9 * 10) / 210, rel=1e-12)


def test_a_resumed_step_counts_once_and_eval_rows_are_apart(tmp_path):
    rows = [_step(1, 1.0, 10), _step(2, 9.0, 10),  # step 2 redone after a resume: the later row wins
            {"step": 2, "loss": 1.2, "entropy": 0.8, "tokens": 40, "split": "eval"},
            _step(2, 0.5, 10), _step(3, 0.25, 10, clip=0.5)]
    _write(tmp_path / "b", rows)
    train, evals = CURVES["read_metrics"](tmp_path / "b")
    assert [r["step"] for r in train] == [1, 2, 3] and train[1]["entropy"] == 0.5
    assert [(e["step"], e["loss"]) for e in evals] == [(2, 1.2)]
    assert train[2]["nll"] == 1.0  # -mean_logp


def test_the_markdown_tables_hold_each_runs_numbers(tmp_path):
    _write(tmp_path / "sft", [_step(s, 1.0 / s, 10) for s in range(1, 5)] +
           [{"step": 4, "loss": 1.5, "entropy": 0.7, "kl": 0.01, "tokens": 5, "split": "eval"}])
    _write(tmp_path / "psft", [_step(s, 2.0 / s, 10, clip=0.1) for s in range(1, 5)])
    assert CURVES["main"]([str(tmp_path), "--runs", "sft", "psft", "--window", "2", "--out", str(tmp_path / "o"),
                           "--no-plots"]) == 0
    md = (tmp_path / "o" / "curves.md").read_text()
    assert f"| sft | {(1 + 0.5) / 2:.3f} | {(1 / 3 + 0.25) / 2:.3f} |" in md
    assert f"| psft | {(2 + 1) / 2:.3f} | {(2 / 3 + 0.5) / 2:.3f} |" in md
    assert "| sft | 1.500 |" in md and "| sft | 0.010 |" in md  # held-out NLL and KL at step 4
    assert "| psft | 1.1 | 1.1 |" in md  # max ratio


def test_gaps_to_the_first_run_over_shared_evaluation_steps(tmp_path):
    def ev(step: int, loss: float, entropy: float) -> dict:
        return {"step": step, "loss": loss, "entropy": entropy, "tokens": 5, "split": "eval"}

    _write(tmp_path / "sft", [_step(1, 1.0, 10), ev(0, 1.4, 1.2), ev(32, 1.0, 0.9), ev(64, 1.1, 0.7)])
    # step 96 has no SFT evaluation: not compared
    _write(tmp_path / "seed2", [_step(1, 1.0, 10), ev(0, 1.4, 1.2), ev(32, 1.05, 0.8), ev(64, 1.08, 0.72),
                                ev(96, 9.0, 9.0)])
    assert CURVES["main"]([str(tmp_path), "--runs", "sft", "seed2", "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    md = (tmp_path / "o" / "curves.md").read_text()
    nll = f"{0.05:+.3f} (32), mean {(0 + 0.05 - 0.02) / 3:+.3f}"
    entropy = f"{-0.1:+.3f} (32), mean {(0 - 0.1 + 0.02) / 3:+.3f}"
    assert f"| seed2 | {nll} | {entropy} |  |" in md, md


def test_best_kept_step_is_the_lowest_evaluated_nll_among_checkpoints_on_disk(tmp_path):
    best = CURVES["best_kept_step"]
    run = tmp_path / "sft"
    evals = {0: 1.43, 32: 1.05, 64: 0.99, 96: 1.01, 128: 1.10, 160: 1.01}
    _write(run, [{"step": s, "split": "eval", "loss": v, "entropy": 1.0} for s, v in evals.items()]
           + [_step(s, 1.0, 10) for s in range(1, 161)])
    for s in (96, 160):  # kept: every 96th and the latest; step 64 (the overall best) was pruned
        (run / "checkpoints" / f"step_{s:06d}").mkdir(parents=True)
    assert best(run) == "step_000096"  # 1.01 ties with 160: the earlier one
    (run / "checkpoints" / "step_000064").mkdir()
    assert best(run) == "step_000064"
    with (run / "metrics.jsonl").open("a") as f:  # a resumed run re-evaluated step 64: the last row counts
        f.write(json.dumps({"step": 64, "split": "eval", "loss": 1.2, "entropy": 1.0}) + "\n")
    assert best(run) == "step_000096"
    script = ROOT / "experiments" / "psft_long" / "best_step.py"  # run.sh calls it by path
    out = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "step_000096"


def test_match_lr_reads_the_lr_scale_off_the_cumulative_lr_at_the_target_kl(tmp_path, monkeypatch):
    """Steps 1-4 at lr 2, steps 5-8 at lr 1 (cumulative 2, 4, 6, 8, 9, 10, 11, 12); KL 0 at step 0,
    0.4 at step 4 (cumulative 8), 0.6 at step 8 (12): KL 0.5 is reached at cumulative 10, c = 10 / 12."""
    run = tmp_path / "sft"
    _write(run, [dict(_step(s, 1.0, 10), lr=2.0 if s <= 4 else 1.0) for s in range(1, 9)]
           + [{"step": s, "split": "eval", "loss": 1.0, "entropy": 1.0, "kl": kl} for s, kl in ((0, 0.0), (4, 0.4), (8, 0.6))])
    script = ROOT / "experiments" / "psft_long" / "match_lr.py"
    monkeypatch.syspath_prepend(str(script.parent))  # where a script run by path finds curves.py
    scale = runpy.run_path(str(script), run_name="match_lr")["lr_scale_for_kl"]
    assert scale(run, 0.5) == pytest.approx(10 / 12)
    assert scale(run, 0.2) == pytest.approx(4 / 12)
    assert scale(run, 0.9) == 1.0  # never reached: the run's own lr
    out = subprocess.run([sys.executable, str(script), str(run), "--kl", "0.5"], capture_output=True, text=True, check=True)
    assert float(out.stdout) == pytest.approx(2.0 * 10 / 12, rel=5e-3)  # c x the peak lr, printed to 3 digits
