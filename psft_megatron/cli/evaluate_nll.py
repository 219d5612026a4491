"""Per-example mean NLL of the response tokens (teacher-forced) under a model checkpoint:
psft-evaluate's ``--mode nll``, without lm-eval.

    torchrun --nproc-per-node N --no-python psft-evaluate --mode nll --ckpt CKPT_DIR --data data.jsonl \
        --out scores.jsonl [--tp 1] [--pp 1] [--prompt-key prompt] [--response-key response] [--add-bos] \
        [--max-length N] [--batch-size 8] [--tokenizer DIR] [--dtype fp32|bf16]
    torchrun --nproc-per-node N tools/score.py --ckpt CKPT_DIR --data data.jsonl --out scores.jsonl ...
                                                      (the same, by path; --mode nll is implied)

Any TP/PP (N = TP x PP x DP; DP replicas split the examples). Also runs as a plain process
(one rank). Plain prompt/response pairs, no chat template (``psft-evaluate --heldout`` scores
conversations through the data adapters and the chat template). Output: one JSONL line per
input line, in order: ``{"index", "nll", "num_tokens", "truncated"}`` plus ``"id"`` when the
input has one.

Exit status: 0 done; 2 bad input (a missing or unreadable checkpoint, data file or
tokenizer, a malformed data line): one "error: ..." line on stderr per rank names the
file and what to change, no traceback; 2 also for bad usage (argparse prints the usage
first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psft_megatron.cli.shell import run_command
from psft_megatron.errors import UserError

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["nll"], default="nll", help="nll: this mode (psft-evaluate --help: the default)")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True, help="JSONL with prompt/response fields")
    p.add_argument("--out", required=True, help="output JSONL, one line per input line")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--prompt-key", default="prompt")
    p.add_argument("--response-key", default="response")
    p.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token")
    p.add_argument("--max-length", type=int, default=None, help="truncate prompt+response to this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    return p


def score(args: argparse.Namespace) -> int:
    # Torch-free checks first: a wrong path fails in a second, before megatron is imported.
    from psft_megatron.conversion.checks import check_checkpoint_dir

    check_checkpoint_dir(args.ckpt)
    if not Path(args.data).is_file():
        raise UserError(f"{args.data}: file not found (--data)")

    from psft_megatron.evaluation.response_nll import score_file
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, teardown

    init_distributed()
    try:
        # Every rank reads and checks the same inputs the same way, so a bad one stops every rank.
        score_file(
            args.ckpt,
            args.data,
            args.out,
            parallel=ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp),
            tokenizer_path=args.tokenizer,
            prompt_key=args.prompt_key,
            response_key=args.response_key,
            add_bos=args.add_bos,
            max_length=args.max_length,
            batch_size=args.batch_size,
            params_dtype=args.dtype,
        )
    finally:
        teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``psft-evaluate --mode nll``: the exit status (see the module docstring)."""
    args = parser().parse_args(argv)
    return run_command(lambda: score(args), user_errors=(OSError,))


if __name__ == "__main__":
    sys.exit(main())
