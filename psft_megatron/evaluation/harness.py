"""Running lm-eval on rank 0 and writing its files: results JSON, per-item samples.

Through lm-eval's public API (0.4.13): ``TaskManager(include_path=OUT/tasks,
include_defaults=False)``, ``simple_evaluate(model=<instance>, ...)``, ``EvaluationTracker``.
An evaluation may run in two phases (log-likelihood tasks on the Megatron model, then
generation tasks on the exported copy, see ``tools/evaluate.py``); :func:`merge_results`
joins their result dicts into one, written once as lm-eval would write it:
``OUT/lm_eval/<model>/results_<time>.json`` and ``samples_<task>_<time>.jsonl``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.loggers import EvaluationTracker
from lm_eval.tasks import TaskManager

__all__ = ["EvalSettings", "merge_results", "quiet_task_loading", "run_tasks", "task_manager", "write_results"]

log = logging.getLogger(__name__)


class EvalSettings(dict):
    """Keyword settings passed to ``simple_evaluate`` (a dict with the project's defaults)."""

    def __init__(self, *, limit: int | float | None = None, apply_chat_template: bool = True,
                 fewshot_as_multiturn: bool = True, system_instruction: str | None = None,
                 bootstrap_iters: int = 1000, seed: int = 1234) -> None:
        super().__init__(limit=limit, apply_chat_template=apply_chat_template,
                         fewshot_as_multiturn=fewshot_as_multiturn if apply_chat_template else False,
                         system_instruction=system_instruction, bootstrap_iters=bootstrap_iters,
                         random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


@contextmanager
def quiet_task_loading() -> Iterator[None]:
    """lm-eval warns once per task that custom loaders may take ``--metadata`` kwargs: noise for psft tasks."""
    logger = logging.getLogger("lm_eval.api.task")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(folder: str | Path) -> TaskManager:
    """The psft tasks rendered into ``folder`` only (lm-eval's built-in index is not built)."""
    return TaskManager(include_path=str(folder), include_defaults=False)


def run_tasks(lm: LM, tasks: list[str], manager: TaskManager, settings: EvalSettings,
              tracker: EvaluationTracker | None = None, model_name: str = "psft_megatron") -> dict[str, Any]:
    """``simple_evaluate`` of ``tasks`` (lm-eval names) with ``lm``; its results dict, samples included."""
    with quiet_task_loading():
        results = simple_evaluate(model=lm, model_args={"pretrained": model_name}, tasks=tasks, task_manager=manager,
                                  log_samples=True, evaluation_tracker=tracker, **settings)
    if results is None:  # simple_evaluate returns None off rank 0 (LOCAL_RANK != 0)
        raise RuntimeError("lm-eval returned no results: run it on global rank 0 with LOCAL_RANK=0")
    return results


_MERGED = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
           "samples")


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several ``simple_evaluate`` runs over disjoint tasks."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    merged = dict(parts[0])
    for key in _MERGED:
        joined: dict[str, Any] = {}
        for p in parts:
            joined.update(p.get(key) or {})
        if joined or key in merged:
            merged[key] = joined
    return merged


def write_results(results: dict[str, Any], out_dir: str | Path, tracker: EvaluationTracker) -> list[Path]:
    """Write lm-eval's results JSON and one samples JSONL per task under ``out_dir``; the files written.

    ``results`` loses its ``samples`` (lm-eval's writer rewrites them in place, so read them first).
    """
    samples = results.pop("samples", {}) or {}
    tracker.save_results_aggregated(results=results, samples=samples)
    for name in results.get("configs", {}):
        if name in samples:
            tracker.save_results_samples(task_name=name, samples=samples[name])
    return sorted(Path(out_dir).rglob("*.json*"))
