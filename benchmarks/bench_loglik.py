"""Log-likelihood throughput: the Megatron adapter (``psft_megatron`` lm-eval model) vs lm-eval's ``hf`` backend.

    python benchmarks/bench_loglik.py [--hf HF_DIR] [--limit 20] [--batch 8] [--threads 1]

Model: SmolLM2-135M-Instruct (without ``--hf``: dequantised once from ``../shared``'s GGUF into
``--work``, then converted to a Megatron checkpoint there), fp32, one process. Tasks: MMLU (one
subject, 0-shot) and TruthfulQA MC1 from ``../shared/data``, ``--limit`` items each, with the chat
template, through ``simple_evaluate`` for both backends on the same rendered task files and the same
batch size. Reports requests/s of each, the ratio, the largest per-request log-likelihood
difference and whether the accuracies agree. Prints a table and a JSON line;
docs/benchmarks.md ("## Log-likelihood") records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ["psft_mmlu_high_school_psychology", "psft_truthfulqa_mc1"]


def prepare(work: Path, hf: Path | None) -> tuple[Path, Path]:
    from psft_megatron.conversion.gguf import gguf_to_hf
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron

    if hf is None:
        hf = work / "smollm2_hf"
        if not (hf / "config.json").is_file():
            gguf_to_hf(GGUF, hf, SHARED / "tokenizers" / "smollm2")
    mg = work / f"{hf.name}_megatron"
    if not (mg / "psft_meta.json").is_file():
        convert_hf_to_megatron(hf, mg)
    return hf, mg


def per_request(results: dict[str, Any]) -> dict[tuple[str, int, int], float]:
    return {(task, d["doc_id"], i): float(r[0][0]) for task in TASKS for d in results["samples"][task]
            for i, r in enumerate(d["resps"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", type=Path, default=None)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_loglik")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf, mg = prepare(args.work, args.hf)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from psft_megatron.data.templates import load_template
    from psft_megatron.data.tokenizer import load_tokenizer
    from psft_megatron.evaluation.driver import Driver
    from psft_megatron.evaluation.harness import quiet_task_loading, task_manager
    from psft_megatron.evaluation.lm_eval_model import PSFTMegatronLM
    from psft_megatron.evaluation.scoring import LOGLIK, MegatronScorer, loglik_handler
    from psft_megatron.evaluation.session import load_scoring_model
    from psft_megatron.evaluation.tasks import default_paths, render_tasks
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed, teardown

    names = [t.removeprefix("psft_") for t in TASKS]
    rendered = render_tasks(args.work / "tasks", names, default_paths(SHARED / "data"))
    common = dict(tasks=TASKS, limit=args.limit, log_samples=True, bootstrap_iters=0, apply_chat_template=True,
                  fewshot_as_multiturn=True)
    res: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                           "load_avg_before": [round(x, 1) for x in os.getloadavg()], "threads": args.threads,
                           "limit": args.limit, "batch": args.batch}

    init_distributed()
    init_model_parallel(ParallelConfig())
    set_seed(1234)  # megatron's RNG tracker, which the forward pass expects
    tok = load_tokenizer(mg / "tokenizer")
    model = load_scoring_model(mg, ParallelConfig())
    driver = Driver({LOGLIK: loglik_handler(model, args.batch, tok.pad_id if tok.pad_id is not None else 0)})
    lm = PSFTMegatronLM(tok, MegatronScorer(driver, rows_per_call=args.batch * 4), template=load_template(None, tok),
                        batch_size=args.batch, max_length=model.config.max_position_embeddings)
    with quiet_task_loading():
        t = time.perf_counter()
        ours = simple_evaluate(model=lm, task_manager=task_manager(rendered.folder), **common)
        res["adapter_seconds"] = round(time.perf_counter() - t, 2)
    teardown()
    ref_lm = HFLM(pretrained=str(hf), device="cpu", dtype="float32", batch_size=args.batch)
    with quiet_task_loading():
        t = time.perf_counter()
        ref = simple_evaluate(model=ref_lm, task_manager=task_manager(rendered.folder), **common)
        res["hf_seconds"] = round(time.perf_counter() - t, 2)
    a, b = per_request(ours), per_request(ref)
    assert a.keys() == b.keys()
    res["requests"] = len(a)
    res["adapter_requests_per_s"] = round(len(a) / res["adapter_seconds"], 2)
    res["hf_requests_per_s"] = round(len(b) / res["hf_seconds"], 2)
    res["speedup_adapter_vs_hf"] = round(res["hf_seconds"] / res["adapter_seconds"], 2)
    res["max_abs_loglik_diff"] = max(abs(a[k] - b[k]) for k in a)
    res["acc"] = {t: [ours["results"][t]["acc,none"], ref["results"][t]["acc,none"]] for t in TASKS}
    res["load_avg_after"] = [round(x, 1) for x in os.getloadavg()]
    print("| backend | requests | seconds | requests/s |\n| --- | ---: | ---: | ---: |")
    print(f"| psft_megatron (Megatron, TP=1) | {len(a)} | {res['adapter_seconds']} | {res['adapter_requests_per_s']} |")
    print(f"| lm-eval hf | {len(b)} | {res['hf_seconds']} | {res['hf_requests_per_s']} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
