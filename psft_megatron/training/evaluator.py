"""Evaluation during training: when it runs and what it records (held-out rows, lm-eval tasks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from megatron.core import parallel_state

from psft_megatron.data.batches import MicroBatch
from psft_megatron.data.config import DataConfig
from psft_megatron.data.templates import load_template
from psft_megatron.data.tokenizer import load_tokenizer
from psft_megatron.evaluation.tasks import check_data, default_paths, resolve_task_names
from psft_megatron.evaluation.training_tasks import TrainingTasks
from psft_megatron.model.config import ModelConfig
from psft_megatron.training.config import TrainingConfig
from psft_megatron.training.data_setup import TrainData
from psft_megatron.training.step import PassSetup, evaluate


def build_tasks(training: TrainingConfig, data: DataConfig, model_cfg: ModelConfig, chunks: Sequence[Any],
                run_dir: str | Path) -> TrainingTasks | None:
    """The lm-eval tasks of ``training.eval_tasks`` on the training model's ``chunks`` (None without
    any), prompted with the run's tokenizer and chat template; files under ``run_dir/eval_tasks``.
    Collective: every rank builds it."""
    if not training.eval_tasks:
        return None
    names = resolve_task_names(training.eval_tasks)
    paths = check_data(names, default_paths(training.eval_tasks_data_root))  # preflight checked them
    tokenizer = load_tokenizer(data.tokenizer, pad=data.pad)
    return TrainingTasks(chunks, model_cfg, tokenizer, load_template(data.chat_template, tokenizer), names, paths,
                         Path(run_dir) / "eval_tasks", limit=training.eval_tasks_limit,
                         batch_size=training.eval_tasks_batch_size, seed=training.seed)


class Evaluator:
    """Evaluates every ``interval`` optimizer steps (0 = never), and at step 0 when ``at_start``
    is set: the held-out rows (loss, entropy, and ``kl`` to ``start_model`` when given) and the
    lm-eval ``tasks`` (``"TASK/METRIC"`` fields), one record per evaluation.

    ``micro_batches`` yields this rank's share of the chosen held-out rows, the same
    rows on every call and at every layout (see ``TrainData.eval_micro_batches``); None: no
    held-out split (tasks only).
    """

    def __init__(self, interval: int, micro_batches: Callable[[], list[MicroBatch]] | None, setup: PassSetup,
                 at_start: bool = False, start_model: list | None = None, tasks: TrainingTasks | None = None) -> None:
        self.interval = interval
        self.at_start = at_start
        self._micro_batches = micro_batches
        self.setup = setup
        self.start_model = start_model  # frozen starting weights: each record also has "kl" to them
        self.tasks = tasks

    @classmethod
    def from_config(cls, training: TrainingConfig, data: TrainData, setup: PassSetup,
                    start_model: list | None = None, tasks: TrainingTasks | None = None) -> Evaluator:
        """Scores ``training.eval_rows`` held-out rows of ``data`` every ``training.eval_interval`` steps;
        with ``training.eval_kl_to_start``, also their KL to ``start_model`` (required then); and the
        ``tasks`` (:func:`build_tasks`)."""
        if training.eval_kl_to_start and start_model is None:
            raise ValueError("training.eval_kl_to_start needs the frozen starting model")
        rows = (lambda: data.eval_micro_batches(training.eval_rows)) if data.eval_loader is not None else None
        return cls(training.eval_interval, rows, setup, at_start=training.eval_at_start,
                   start_model=start_model if training.eval_kl_to_start else None, tasks=tasks)

    def should_evaluate_before(self, step: int) -> bool:
        """True before the first step of a fresh run (not of a resumed one) with ``at_start``."""
        return self.at_start and step == 0

    def should_evaluate(self, step: int, steps_just_run: int) -> bool:
        """True when the last ``steps_just_run`` steps (one global batch) crossed a multiple of the interval."""
        every = self.interval
        return bool(every) and step // every > (step - steps_just_run) // every

    def evaluate(self, model: list, step: int) -> dict[str, Any] | None:
        """The eval record of ``step`` (last pipeline stage; None elsewhere). Collective."""
        record: dict[str, Any] = {"step": step}
        if self._micro_batches is not None:
            stats = evaluate(model, self._micro_batches(), self.setup, reference=self.start_model)
            if stats is not None:
                record.update(loss=stats["loss"], entropy=stats["mean_entropy"], mean_logp=stats["mean_logp"],
                              tokens=int(stats["token_count"]))
                if "kl" in stats:
                    record["kl"] = stats["kl"]
        if self.tasks is not None:
            record.update(self.tasks.run(step))  # every rank: rank 0 ran lm-eval and sent the metrics
        return record if parallel_state.is_pipeline_last_stage(ignore_virtual=True) else None
