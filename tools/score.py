"""Per-example mean NLL of the response tokens (teacher-forced) under a model checkpoint.

    torchrun --nproc-per-node N tools/score.py --ckpt CKPT_DIR --data data.jsonl --out scores.jsonl \
        [--tp 1] [--pp 1] [--prompt-key prompt] [--response-key response] [--add-bos] \
        [--max-length N] [--batch-size 8] [--tokenizer DIR] [--dtype fp32|bf16]

Any TP/PP (N = TP x PP x DP; DP replicas split the examples). Also runs as a plain
``python`` process (one rank). Output: one JSONL line per input line, in order:
``{"index", "nll", "num_tokens", "truncated"}`` plus ``"id"`` when the input has one.

Exit status: 0 done; 2 bad input (a missing or unreadable checkpoint, data file or
tokenizer, a malformed data line): one "error: ..." line on stderr per rank names the
file and what to change, no traceback; 2 also for bad usage (argparse prints the usage
first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", required=True, help="JSONL with prompt/response fields")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--response-key", default="response")
    parser.add_argument("--add-bos", action="store_true", help="prepend the tokenizer's BOS token")
    parser.add_argument("--max-length", type=int, default=None, help="truncate prompt+response to this many tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from psft_megatron.runtime.quiet import quiet_known_warnings

    quiet_known_warnings()

    # Torch-free checks first: a wrong path fails in a second, before megatron is imported.
    from psft_megatron.conversion.checks import check_checkpoint_dir
    from psft_megatron.conversion.errors import ConversionError

    try:
        check_checkpoint_dir(args.ckpt)
        if not Path(args.data).is_file():
            raise ConversionError(f"{args.data}: file not found (--data)")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from psft_megatron.checkpoint.model_checkpoint import CheckpointError
    from psft_megatron.data.errors import DataError
    from psft_megatron.evaluation.response_nll import score_file
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, teardown

    init_distributed()
    try:
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
    except (CheckpointError, ConversionError, DataError, OSError) as e:
        # Every rank reads and checks the same inputs the same way, so a bad one stops every rank here.
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
