"""lm-eval log-likelihood tasks on the live training model, at the trainer's own layout.

``psft-evaluate`` scores a checkpoint it loads at any TP/PP/DP. During training the model is
already there, so :class:`TrainingTasks` runs the same pieces on the trainer's chunks (no export,
no second process): they are wrapped as a :class:`~psft_megatron.evaluation.session.ScoringModel`,
global rank 0 runs lm-eval with the :class:`~psft_megatron.evaluation.lm_eval_model.PSFTMegatronLM`
over a :class:`~psft_megatron.evaluation.scoring.MegatronScorer`, and every rank serves the
forward passes through the :class:`~psft_megatron.evaluation.driver.Driver` (data-parallel
replicas split the rows; the pipeline runs the trainer's schedule). Rank 0 then sends the
flat metrics (``{"mmlu_anatomy/acc": ...}``) to every rank, so the logging rank (the last
stage) records them with the held-out numbers.

Only log-likelihood tasks: generation needs an exported copy (``psft-evaluate`` does that).

lm-eval (the ``eval`` extra) is imported when the first evaluation is prepared, not with this
module: every training process imports it, and lm-eval costs each one about 1.6 CPU-seconds.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from psft_megatron.data.templates import ChatTemplate
from psft_megatron.data.tokenizer import Tokenizer
from psft_megatron.evaluation.driver import Driver
from psft_megatron.evaluation.report import summarize_lm_eval
from psft_megatron.evaluation.scoring import LOGLIK, MegatronScorer, loglik_handler
from psft_megatron.evaluation.session import scoring_model_from_chunks
from psft_megatron.evaluation.tasks import RenderedTasks, render_tasks
from psft_megatron.model.config import ModelConfig

log = logging.getLogger("psft")

__all__ = ["TrainingTasks", "TaskEvalError"]


class TaskEvalError(RuntimeError):
    """lm-eval failed on rank 0 during an in-training evaluation (every rank raises it)."""


@contextmanager
def _rng_kept() -> Iterator[None]:
    """lm-eval seeds Python's, NumPy's and torch's global generators on rank 0: put them back, so a
    run with task evaluations draws the same random numbers as one without."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


class TrainingTasks:
    """lm-eval tasks scored on the trainer's chunks (collective: every rank builds one and calls
    :meth:`run` at the same steps).

    ``names``: short task names (:func:`~psft_megatron.evaluation.tasks.resolve_task_names`), all
    log-likelihood; ``data_paths``: their checked data (:func:`~psft_megatron.evaluation.tasks.check_data`);
    ``out_dir``: where the rendered task files and each evaluation's lm-eval files go (rank 0).
    """

    def __init__(self, chunks: Sequence[Any], model_cfg: ModelConfig, tokenizer: Tokenizer,
                 template: ChatTemplate | None, names: list[str], data_paths: dict[str, str], out_dir: str | Path,
                 *, limit: int | None = None, batch_size: int = 8, seed: int = 1234) -> None:
        self.model = scoring_model_from_chunks(list(chunks), model_cfg, source="the training model")
        self.tokenizer = tokenizer
        self.template = template
        self.names = names
        self.data_paths = data_paths
        self.out_dir = Path(out_dir)
        self.limit = limit
        self.batch_size = batch_size
        self.seed = seed
        # Collective (a new gloo group on every rank): built with the trainer, used at each evaluation.
        self.driver = Driver({LOGLIK: loglik_handler(self.model, batch_size, tokenizer.pad_id)})
        self._rendered: RenderedTasks | None = None

    def _render(self) -> RenderedTasks:
        if self._rendered is None:
            self._rendered = render_tasks(self.out_dir / "tasks", self.names, self.data_paths)
            if self._rendered.generate:  # the recipe check refuses these; a guard for direct callers
                raise ValueError(f"generation tasks cannot run during training: {self._rendered.generate}")
        return self._rendered

    def _lm_eval(self, step: int) -> dict[str, float]:
        """Rank 0: run the tasks through lm-eval, write its files, return the flat metrics."""
        # The eval extra, imported on first use (see the module docstring).
        from lm_eval.loggers import EvaluationTracker

        from psft_megatron.evaluation.harness import EvalSettings, run_tasks, task_manager, write_results
        from psft_megatron.evaluation.lm_eval_model import PSFTMegatronLM

        rendered = self._render()
        replicas = ps.get_data_parallel_world_size() * ps.get_context_parallel_world_size()
        pp = ps.get_pipeline_model_parallel_world_size()
        lm = PSFTMegatronLM(self.tokenizer, MegatronScorer(self.driver, self.batch_size * replicas * pp * 4),
                            template=self.template, batch_size=self.batch_size,
                            max_length=self.model.config.max_position_embeddings)
        settings = EvalSettings(limit=self.limit, apply_chat_template=self.template is not None,
                                bootstrap_iters=0, seed=self.seed)
        folder = self.out_dir / f"step_{step:06d}"
        tracker = EvaluationTracker(output_path=str(folder))
        with _rng_kept():
            results = run_tasks(lm, rendered.loglik, task_manager(rendered.folder), settings, tracker,
                                model_name=f"step_{step:06d}")
        summary = summarize_lm_eval(results, rendered.loglik)
        write_results(results, folder, tracker)
        return summary

    def run(self, step: int) -> dict[str, float]:
        """Score the tasks on the model as it is now: ``{"<task>/<metric>": value}`` on every rank.

        The chunks run in eval mode and return to train mode. An lm-eval failure on rank 0 is
        raised on every rank as :class:`TaskEvalError` after the workers are released."""
        start = time.monotonic()
        for chunk in self.model.chunks:
            chunk.eval()
        self.driver.begin()
        message: list[Any] = [None, {}]
        try:
            if self.driver.is_driver:
                try:
                    message[1] = self._lm_eval(step)
                except Exception as e:
                    log.error("evaluation tasks failed at step %d:\n%s", step, traceback.format_exc())
                    message[0] = f"{type(e).__name__}: {e}"
                finally:
                    self.driver.stop()
            else:
                self.driver.serve()
            if self.driver.distributed:
                dist.broadcast_object_list(message, src=0, group=self.driver.group)
        finally:
            for chunk in self.model.chunks:
                chunk.train()
        if message[0] is not None:
            raise TaskEvalError(f"evaluation tasks at step {step} failed on rank 0: {message[0]}")
        return dict(message[1], eval_tasks_s=round(time.monotonic() - start, 3))
