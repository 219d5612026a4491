"""experiments/psft_long/clip_room.py: the share of training tokens beyond the upper clip's reach
(p >= 1 / (1 + eps_high)), the share with p >= 0.99, the mean p and the mean entropy, against the
same statistics computed here in float64 with ``transformers`` on the HF model the checkpoint was
converted from: SmolLM2-135M-Instruct, which already predicts many GSM8K solution tokens with p > 0.78."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # starts processes

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TRAIN = SHARED / "data" / "gsm8k" / "train.jsonl"
LIMIT, EPS_HIGH = 3, 0.28


def _reference(hf: Path, mg: Path) -> dict[str, float]:
    """The statistics in float64 over the response tokens of the first LIMIT problems (tokenised by the
    project's own pipeline, as the script reads them)."""
    from transformers import LlamaForCausalLM

    from psft_megatron.data.config import DataSourceConfig
    from psft_megatron.evaluation.heldout import read_heldout
    from psft_megatron.evaluation.options import EvalJob, check_job

    checked = check_job(EvalJob(ckpt=str(mg), out=str(mg.parent), heldout=DataSourceConfig(
        path=str(TRAIN), adapter="gsm8k", limit=LIMIT)), create_out=False)
    samples, _ = read_heldout(checked.job.heldout, checked.tokenizer, checked.heldout_template)
    model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float64).eval()
    probs, entropies = [], []
    for s in samples:
        ids = torch.tensor([s.ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1], -1)  # position t predicts token t + 1
        mask = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
        probs.append(logp.gather(-1, ids[0, 1:, None])[:, 0][mask].exp())
        entropies.append(-(logp.exp() * logp).sum(-1)[mask])
    p, h = torch.cat(probs), torch.cat(entropies)
    return {"tokens": p.numel(), "beyond_reach": int((p >= 1 / (1 + EPS_HIGH)).sum()), "p_ge_0.99": int((p >= 0.99).sum()),
            "mean_p": float(p.mean()), "entropy": float(h.mean()), "samples": len(samples),
            "lengths": [len(s.ids) for s in samples], "response_tokens": [len(x) for x in probs]}


def test_clip_room_matches_float64_transformers(smollm2_hf, tmp_path):
    if not TRAIN.is_file():
        pytest.skip("needs ../shared's GSM8K")
    hf, mg, out = smollm2_hf, tmp_path / "mg", tmp_path / "room" / "clip_room.json"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf", str(hf), "--out", str(mg)],
                   check=True, capture_output=True)
    script = [sys.executable, str(ROOT / "experiments" / "psft_long" / "clip_room.py"), "--train", str(TRAIN),
              "--limit", str(LIMIT), "--eps-high", str(EPS_HIGH), "--ckpt", f"tiny={mg}", "--out", str(out)]
    run = subprocess.run(script, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(out.read_text())["tiny"]
    want = _reference(hf, mg)
    assert got["samples"] == want["samples"] == LIMIT and got["tokens"] == want["tokens"] > 100
    assert 0 < want["beyond_reach"] < want["tokens"], "the threshold must split the tokens for the test to mean something"
    for share in ("beyond_reach", "p_ge_0.99"):  # counts, up to one token within fp32 round-off of a threshold
        assert abs(got[share] * got["tokens"] - want[share]) <= 1, (share, got[share] * got["tokens"], want[share])
    assert got["mean_p"] == pytest.approx(want["mean_p"], rel=1e-4)
    assert got["entropy"] == pytest.approx(want["entropy"], rel=1e-4)
    # A name already in the output is not scored again (an interrupted run resumes).
    again = subprocess.run(script, capture_output=True, text=True, check=True)
    assert "tiny" not in again.stdout
    # --max-length drops the problems training dropped (longer than the cut), here the longest ones.
    cut_at = max(want["lengths"]) - 1
    kept = [tokens for n, tokens in zip(want["lengths"], want["response_tokens"]) if n <= cut_at]  # per problem
    assert 0 < len(kept) < LIMIT, "the cut must drop some problems and keep some for the test to mean something"
    short = out.with_name("short.json")
    cut = subprocess.run([*script[:-2], "--out", str(short), "--max-length", str(cut_at)],
                         capture_output=True, text=True)
    assert cut.returncode == 0, cut.stderr[-3000:]
    got = json.loads(short.read_text())["tiny"]
    assert got["samples"] == len(kept)
    assert got["tokens"] == sum(kept)
