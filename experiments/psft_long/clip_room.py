#!/usr/bin/env python
"""How much room the trust region has: the share of training tokens PSFT's upper clip can still reach.

    python experiments/psft_long/clip_room.py --train ../shared/data/gsm8k/train.jsonl --limit 64 \\
        --ckpt start=runs/psft_vs_sft/smollm2_megatron \\
        --ckpt sft/96=runs/psft_long/long/sft/checkpoints/step_000096 ... --out clip_room.json

A token is clipped from above when its ratio p_theta / p_old exceeds 1 + eps_high. The ratio is at
most 1 / p_old, so a token the snapshot already predicts with p_old >= 1 / (1 + eps_high) (0.781 at
eps_high 0.28) can never be clipped from above, whatever the update does: the objective is plain
SFT's there, weighted by r <= 1 / p_old. This script scores the training problems (each on its own,
with the chat template, as held-out files are scored: the same response tokens the trainer's loss
mask takes, without the packing's neighbours in the context) under each checkpoint and reports,
over all response tokens: the share with p >= 1 / (1 + eps_high), the share with p >= 0.99, the mean
p and the mean token entropy. Reads checkpoints the way ``psft-evaluate`` does (one process, TP = 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch


def _score(checked: Any, eps_high: float) -> dict[str, float]:
    """Response-token statistics of the training file under one checkpoint (after init_distributed)."""
    from psft_megatron.evaluation.heldout import labelled_groups, read_heldout
    from psft_megatron.evaluation.scoring import length_multiple
    from psft_megatron.evaluation.session import load_scoring_model
    from psft_megatron.loss.token_stats import vocab_parallel_token_stats
    from psft_megatron.model.forward import pipeline_forward
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_model_parallel, set_seed, teardown

    parallel = ParallelConfig()
    init_model_parallel(parallel)
    set_seed(checked.job.seed)
    model = load_scoring_model(checked.ckpt, parallel)
    samples, _ = read_heldout(checked.job.heldout, checked.tokenizer, checked.heldout_template)
    reach = 1.0 / (1.0 + eps_high)
    totals = torch.zeros(5, dtype=torch.float64)  # tokens, >= reach, >= 0.99, sum p, sum entropy

    def on_last_stage(logits: torch.Tensor, mb: dict[str, torch.Tensor]) -> None:
        mask = mb["mask"].to(logits.device)
        st = vocab_parallel_token_stats(logits, mb["labels"].to(logits.device), vocab_size=model.vocab_size,
                                        with_entropy=True)
        p = st.logp.double().exp()[mask]
        totals.add_(torch.tensor([p.numel(), (p >= reach).sum(), (p >= 0.99).sum(), p.sum(),
                                  st.entropy.double()[mask].sum()], dtype=torch.float64))

    pairs = [(s.ids, s.loss_mask) for s in samples]
    with torch.no_grad():
        for group in labelled_groups(pairs, 8, checked.tokenizer.pad_id, length_multiple(model)):
            list(pipeline_forward(model.chunks, group.microbatches, on_last_stage))
    model.release()
    teardown(destroy_process_group=False)
    n = float(totals[0])
    return {"tokens": int(n), "beyond_reach": float(totals[1]) / n, "p_ge_0.99": float(totals[2]) / n,
            "mean_p": float(totals[3]) / n, "entropy": float(totals[4]) / n, "samples": len(samples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True, help="the training file (GSM8K-style .jsonl)")
    p.add_argument("--adapter", default="gsm8k")
    p.add_argument("--limit", type=int, default=64, help="its first N problems (the runs' data.train limit)")
    p.add_argument("--max-length", type=int, default=None,
                   help="drop problems longer than N tokens, as training did (the runs' data.train max_length)")
    p.add_argument("--ckpt", action="append", required=True, metavar="NAME=DIR",
                   help="a checkpoint to score, under a name (repeat)")
    p.add_argument("--eps-high", type=float, default=0.28)
    p.add_argument("--out", type=Path, required=True, help="JSON file: {name: statistics}; names in it are skipped")
    args = p.parse_args(argv)

    from psft_megatron.data.config import DataSourceConfig
    from psft_megatron.evaluation.options import EvalJob, check_job
    from psft_megatron.runtime.distributed import init_distributed

    done: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    init_distributed()
    for spec in args.ckpt:
        name, sep, ckpt = spec.partition("=")
        if not sep:
            raise SystemExit(f"error: --ckpt {spec}: expected NAME=DIR")
        if name in done:
            continue
        job = EvalJob(ckpt=ckpt, out=str(args.out.parent), heldout=DataSourceConfig(
            path=args.train, adapter=args.adapter, limit=args.limit, max_length=args.max_length))
        done[name] = _score(check_job(job, create_out=False), args.eps_high)
        print(name, json.dumps(done[name]), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=1) + "\n")  # after each: an interrupted run resumes
    return 0


if __name__ == "__main__":
    sys.exit(main())
