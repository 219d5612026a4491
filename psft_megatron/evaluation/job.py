"""One evaluation of a checkpoint (``tools/evaluate.py``): every rank of the job calls :func:`run_job`.

Order, so no rank waits through a long phase it has no part in:

1. every rank builds the model (and the reference for drift) at ``--tp``/``--pp`` (DP = the rest)
   and the driver; ranks other than 0 serve commands;
2. rank 0 runs the log-likelihood tasks through lm-eval with the Megatron scorer, then the
   held-out NLL / entropy and the KL drift;
3. rank 0 releases the workers (they tear down and exit) and the Megatron weights;
4. rank 0 exports the checkpoint to an HF folder and runs the generation tasks (transformers,
   or vLLM on GPU);
5. rank 0 writes lm-eval's results JSON and samples, ``summary.json``, ``psft_metrics.json``
   and ``results.md`` (a markdown table) into ``--out``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lm_eval.loggers import EvaluationTracker

from psft_megatron.checkpoint.model_checkpoint import read_meta
from psft_megatron.evaluation.drift import KL, drift_scores, kl_handler
from psft_megatron.evaluation.driver import Driver
from psft_megatron.evaluation.generation import export_checkpoint, make_generator
from psft_megatron.evaluation.harness import EvalSettings, merge_results, run_tasks, task_manager, write_results
from psft_megatron.evaluation.heldout import (
    TOKEN_STATS,
    heldout_scores,
    read_heldout,
    summarize,
    token_stats_handler,
    write_rows,
)
from psft_megatron.evaluation.lm_eval_model import PSFTMegatronLM
from psft_megatron.evaluation.options import CheckedJob, describe
from psft_megatron.evaluation.report import markdown_table, summarize_lm_eval
from psft_megatron.evaluation.scoring import LOGLIK, MegatronScorer, loglik_handler
from psft_megatron.evaluation.session import ScoringModel, load_scoring_model
from psft_megatron.evaluation.tasks import MATH_SETS, data_key, render_tasks
from psft_megatron.runtime.config import ParallelConfig
from psft_megatron.runtime.distributed import init_model_parallel, set_seed

log = logging.getLogger(__name__)

__all__ = ["run_job"]


def _handlers(model: ScoringModel, ref: ScoringModel | None, batch_size: int, pad_id: int) -> dict[str, Any]:
    handlers = {LOGLIK: loglik_handler(model, batch_size, pad_id),
                TOKEN_STATS: token_stats_handler(model, batch_size, pad_id)}
    if ref is not None:
        handlers[KL] = kl_handler(model, ref, batch_size, pad_id)
    return handlers


def run_job(checked: CheckedJob) -> dict[str, Any] | None:
    """Run the evaluation (collective: every rank calls it, after ``init_distributed``).

    Returns the flat summary on rank 0 (``{"gsm8k/acc": ..., "heldout/nll": ...}``), None elsewhere.
    """
    job = checked.job
    parallel = ParallelConfig(tensor_model_parallel_size=job.tp, pipeline_model_parallel_size=job.pp)
    init_model_parallel(parallel)
    set_seed(job.seed)
    tok = checked.tokenizer
    # Generation alone needs no Megatron model (it runs on the export): every rank sees the same job.
    needs_model = job.heldout is not None or any(data_key(n) not in MATH_SETS for n in checked.task_names)
    model = load_scoring_model(checked.ckpt, parallel, params_dtype=job.params_dtype) if needs_model else None
    ref = load_scoring_model(checked.ref, parallel, params_dtype=job.params_dtype) if checked.ref else None
    driver = Driver(_handlers(model, ref, job.batch_size, tok.pad_id) if model is not None else {})
    if not driver.is_driver:
        driver.serve()
        return None

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    dp = dist.get_world_size() // (job.tp * job.pp) if dist.is_initialized() else 1
    max_length = read_meta(checked.ckpt)["model"].get("max_position_embeddings") or 4096
    lm = PSFTMegatronLM(tok, MegatronScorer(driver, rows_per_call=job.batch_size * dp * job.pp * 4),
                        template=checked.template, batch_size=job.batch_size,
                        max_length=model.config.max_position_embeddings if model else max_length,
                        max_gen_toks=job.max_gen_toks)
    settings = EvalSettings(limit=job.limit, apply_chat_template=checked.apply_chat_template,
                            system_instruction=job.system_instruction, bootstrap_iters=job.bootstrap_iters,
                            seed=job.seed)
    tracker = EvaluationTracker(output_path=str(out / "lm_eval"))
    parts: list[dict[str, Any]] = []
    psft: dict[str, Any] = {}
    rendered = render_tasks(out / "tasks", checked.task_names, checked.data_paths, max_gen_toks=job.max_gen_toks,
                            sampling=job.sampling) if checked.task_names else None
    manager = task_manager(rendered.folder) if rendered else None
    name = str(checked.ckpt)
    try:
        if rendered and rendered.loglik:
            parts.append(run_tasks(lm, rendered.loglik, manager, settings, tracker, name))
        if job.heldout is not None:
            samples, skipped = read_heldout(job.heldout, tok, checked.heldout_template)
            if not samples:
                raise ValueError(f"{job.heldout.path}: no sample left to score ({skipped.summary()})")
            rows = heldout_scores(driver, samples)
            psft["heldout"] = dict(summarize(rows), path=job.heldout.path, skipped=skipped.total)
            if ref is not None:
                drift = drift_scores(driver, samples)
                for row, kl in zip(rows, drift.pop("per_sample")):
                    row["kl"] = kl
                psft["drift"] = dict(drift, ref=str(checked.ref))
            write_rows(job.heldout_out or out / "heldout.jsonl", rows)
    finally:
        driver.stop()  # the workers leave serve(), tear down and exit; nothing below needs them
    if model is not None:
        model.release()
    if ref is not None:
        ref.release()

    if rendered and rendered.generate:
        hf_dir = export_checkpoint(checked.ckpt, out / "hf_export", tokenizer_dir=checked.tokenizer_path)
        lm.generator = make_generator(hf_dir, pad_id=tok.pad_id, eos_id=tok.eos_id, backend=job.generation_backend)
        lm.batch_size = job.gen_batch_size
        parts.append(run_tasks(lm, rendered.generate, manager, settings, tracker, name))

    results = merge_results(parts)
    summary: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    if results:
        summary.update(summarize_lm_eval(results, (rendered.loglik + rendered.generate) if rendered else []))
        for task, n in (results.get("n-samples") or {}).items():
            counts[task.removeprefix("psft_")] = n.get("effective")
        write_results(results, out, tracker)
    for key in ("heldout", "drift"):
        if key in psft:
            for metric in ("nll", "entropy", "kl"):
                if metric in psft[key]:
                    summary[f"{key}/{metric}"] = psft[key][metric]
            counts[key] = psft[key]["samples"]
    record = {"job": describe(checked), "seconds": round(time.monotonic() - start, 1), **psft}
    (out / "psft_metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = markdown_table(summary, counts)
    (out / "results.md").write_text(f"# Evaluation of {checked.ckpt}\n\n{table}")
    print(table)
    return summary
