"""Evaluate a checkpoint: lm-eval tasks (math with math-verify, MMLU, TruthfulQA), held-out NLL and
entropy, and KL drift against a reference checkpoint; or (``--mode nll``) the per-example response NLL
of prompt/response pairs.

    torchrun --nproc-per-node N --no-python psft-evaluate --ckpt CKPT --tasks gsm8k,math500,mmlu,truthfulqa_mc1 \
        --data-root DATA --out OUT [--limit N] [--tp 1] [--pp 1] [--heldout FILE [--adapter gsm8k]] [--ref REF]
    torchrun --nproc-per-node N tools/evaluate.py ...          (the same, by path)
    psft-evaluate --mode nll --ckpt CKPT --data data.jsonl --out scores.jsonl ...   (psft-evaluate --mode nll --help;
                                                               also tools/score.py)

CKPT: a converted checkpoint, a trainer step folder, or a run / checkpoints folder (its latest
checkpoint). Any TP/PP (N = TP x PP x DP; data-parallel replicas split the items); also runs as
a plain process. Rank 0 runs lm-eval, the other ranks serve forward passes.

Tasks (``--tasks``, comma-separated): gsm8k, math500, svamp, asdiv, gsm_hard, mawps, amc23, aime24
(math_ood = the six out-of-domain sets), mmlu, mmlu_5shot, mmlu_SUBJECT, truthfulqa_mc1,
truthfulqa_mc2. Data: ``--data-root DIR`` laid out like ../shared/data (gsm8k/test.jsonl,
math/math500_test.jsonl, ood/math_ood/*_test.jsonl, ood/mmlu/, ood/TruthfulQA.csv), or per data set
``--data gsm8k=FILE --data mmlu=DIR --data truthfulqa=FILE`` (a math set may name a hub dataset).
Generation tasks are greedy; ``--num-samples N`` adds sampled runs (``--temperature``, ``--top-p``)
reported as mean@N (acc) and pass@N. Prompts use the chat template the model trained with (the
run's data.chat_template, else the tokenizer's; ``--chat-template`` picks one, ``--no-chat-template``
scores plain prompts).

Outputs in OUT: lm_eval/<model>/results_*.json and samples_<task>_*.jsonl (lm-eval's own files),
summary.json (flat task/metric -> value), psft_metrics.json, results.md (markdown table),
heldout.jsonl (per held-out sample: nll, entropy, num_tokens, kl), tasks/ (the task files that ran),
hf_export/ (the exported model, for generation).

Exit status: 0 done; 2 bad input (unknown task, a missing checkpoint, data file or tokenizer, a
tokenizer without a chat template when one is needed, the eval extra not installed): one
"error: ..." line on stderr names it, no traceback; 2 also for bad usage (argparse prints the
usage first); 1 an internal error (a traceback follows).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from psft_megatron.cli import evaluate_nll
from psft_megatron.cli.shell import run_command
from psft_megatron.errors import UserError

__all__ = ["MODES", "build_job", "main", "parser"]

# --mode: lm-eval tasks and held-out scoring (this module), or per-example NLL (evaluate_nll).
MODES = ("tasks", "nll")


def add_mode_option(p: argparse.ArgumentParser) -> None:
    """``--mode``, in each mode's parser so that its --help lists it."""
    p.add_argument("--mode", choices=MODES, default="tasks",
                   help="tasks: lm-eval tasks, held-out NLL/entropy and drift (default); nll: the per-example "
                        "response NLL of prompt/response pairs (psft-evaluate --mode nll --help)")


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, path = v.partition("=")
        if not sep or not key or not path:
            raise UserError(f"{flag} {v!r}: expected KEY=VALUE")
        out[key.strip()] = path.strip()
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_mode_option(p)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (converted, trainer step, or run folder)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tasks", default="", help="comma-separated task names (see above)")
    p.add_argument("--data-root", default=None, help="folder laid out like ../shared/data")
    p.add_argument("--data", action="append", default=[], metavar="KEY=PATH",
                   help="data of one set: gsm8k=FILE, mmlu=DIR, truthfulqa=FILE, ... (repeatable)")
    p.add_argument("--limit", type=float, default=None, help="items per task (an integer; a fraction < 1: share)")
    p.add_argument("--heldout", default=None, help="conversations to score for NLL and entropy (a file or hub name)")
    p.add_argument("--adapter", default="messages", help="--heldout's adapter: gsm8k, math, hh_rlhf, messages, generic")
    p.add_argument("--adapter-option", action="append", default=[], metavar="KEY=VALUE",
                   help="adapter option, e.g. prompt_field=question (repeatable)")
    p.add_argument("--heldout-max-length", type=int, default=None, help="truncate held-out samples' responses to N tokens")
    p.add_argument("--heldout-limit", type=int, default=None, help="score only the first N held-out records")
    p.add_argument("--heldout-out", default=None, help="where the per-sample held-out rows go (default OUT/heldout.jsonl)")
    p.add_argument("--ref", default=None,
                   help="reference checkpoint: report KL(model || ref) on --heldout (default: the run's data.eval[0])")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward per data-parallel replica")
    p.add_argument("--gen-batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-gen-toks", type=int, default=512)
    p.add_argument("--num-samples", type=int, default=1, help="N > 1: also sample N answers per problem")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--chat-template", default="auto",
                   help="auto (the run's, else the tokenizer's), tokenizer, chatml, llama3, llama2, plain or a .jinja file")
    p.add_argument("--no-chat-template", action="store_true", help="plain prompts (base models)")
    p.add_argument("--system-instruction", default=None)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--generation-backend", default="auto", choices=["auto", "transformers", "vllm"])
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="lm-eval's stderr bootstraps (0: none)")
    p.add_argument("--seed", type=int, default=1234)
    return p


def build_job(args: argparse.Namespace):  # -> EvalJob (imported lazily: this module must start fast)
    from psft_megatron.data.config import DataSourceConfig
    from psft_megatron.evaluation.options import EvalJob
    from psft_megatron.evaluation.tasks import Sampling

    heldout = None
    if args.heldout:
        import yaml

        # Values as YAML scalars, so train_on=all and strip_calculator_notes=true both work.
        options = {k: yaml.safe_load(v) for k, v in _pairs(args.adapter_option, "--adapter-option").items()}
        heldout = DataSourceConfig.from_dict({"path": args.heldout, "adapter": args.adapter,
                                              "adapter_options": options, "max_length": args.heldout_max_length,
                                              "limit": args.heldout_limit,
                                              "long_sample": "truncate_response"})
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    return EvalJob(
        ckpt=args.ckpt, out=args.out, tasks=[t for t in args.tasks.split(",") if t.strip()], data_root=args.data_root,
        data=_pairs(args.data, "--data"), ref=args.ref, heldout=heldout, heldout_out=args.heldout_out, limit=limit,
        tp=args.tp, pp=args.pp,
        batch_size=args.batch_size, gen_batch_size=args.gen_batch_size, max_gen_toks=args.max_gen_toks,
        sampling=Sampling(args.num_samples, args.temperature, args.top_p), tokenizer=args.tokenizer,
        chat_template=None if args.no_chat_template else args.chat_template,
        system_instruction=args.system_instruction, params_dtype=args.dtype,
        generation_backend=args.generation_backend, bootstrap_iters=args.bootstrap_iters, seed=args.seed)


def evaluate(args: argparse.Namespace) -> int:
    """Check the inputs (torch-free, in a second), then run the evaluation on every rank."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    missing = [m for m in ("lm_eval", "math_verify") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed: psft-evaluate needs the eval extra "
                        "(pip install -e \".[eval]\")")
    from psft_megatron.evaluation.options import check_job

    try:
        checked = check_job(build_job(args))
    except ValueError as e:  # an option's value the data section's own checks refuse
        raise UserError(str(e)) from None

    from psft_megatron.evaluation.job import run_job
    from psft_megatron.runtime.distributed import init_distributed, teardown

    # Workers wait on rank 0 between commands on their own gloo group (see evaluation.driver);
    # this timeout bounds the forward passes' collectives.
    init_distributed(timeout_minutes=120)
    try:
        run_job(checked)
    finally:
        teardown()
    return 0


def _mode(argv: list[str]) -> str:
    """The --mode of ``argv`` (a bad value: argparse's usage error, exit 2)."""
    pre = argparse.ArgumentParser(add_help=False)
    add_mode_option(pre)
    return pre.parse_known_args(argv)[0].mode


def main(argv: list[str] | None = None) -> int:
    """``psft-evaluate``: the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _mode(argv) == "nll":
        return evaluate_nll.main(argv)
    args = parser().parse_args(argv)
    return run_command(lambda: evaluate(args), user_errors=(FileNotFoundError,))


if __name__ == "__main__":
    sys.exit(main())
