"""Checks of the machine and files a recipe names, run before anything is built.

:meth:`RecipeConfig.validate <psft_megatron.recipe.RecipeConfig.validate>` checks the recipe
itself; this checks what it points at: the starting checkpoint exists and is one, local
data files exist, ``training.eval_tasks`` have lm-eval and their data, the run and checkpoint
folders can be written, the checkpoint disk has room for one checkpoint, and the experiment
trackers it asks for are installed. ``psft-train --validate-only`` runs both, so a job that would
fail on these fails in a second on a login node, not after queueing.
Nothing here writes to disk.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from psft_megatron.checkpoint.lora import LoRACheckpointError, base_checkpoint, is_lora_meta
from psft_megatron.checkpoint.model_checkpoint import CheckpointError, read_meta
from psft_megatron.checkpoint.train_checkpoint import complete_checkpoints
from psft_megatron.config.load import ConfigError
from psft_megatron.data.sources import resolve_format
from psft_megatron.evaluation.inputs import EvalInputError
from psft_megatron.evaluation.tasks import check_data, default_paths, resolve_task_names
from psft_megatron.model.lora.count import adapter_parameters_per_model
from psft_megatron.recipe import RecipeConfig
from psft_megatron.training.trackers import missing_packages

__all__ = ["check_launch", "checkpoint_bytes", "preflight", "save_dir_of"]

log = logging.getLogger("psft")


def save_dir_of(recipe: RecipeConfig) -> Path:
    """Where the run's checkpoints go."""
    return Path(recipe.checkpoint.save_dir or Path(recipe.logging.run_dir) / "checkpoints")


def checkpoint_bytes(recipe: RecipeConfig) -> int:
    """Bytes of one training checkpoint: weights in their dtype, Adam's two fp32 moments, and
    the fp32 main copy of bf16 weights (RNG states and JSON are negligible). A LoRA run saves
    its adapters only."""
    model = recipe.resolved_model
    per_param = (2 + 4 if model.params_dtype == "bf16" else 4) + 8
    params = adapter_parameters_per_model(model) if model.lora is not None else model.num_parameters()
    return params * per_param


def _writable(path: Path) -> str | None:
    """Why ``path`` (a folder that may not exist yet) cannot be created and written, or None."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return f"{path}: no existing parent folder"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def preflight(recipe: RecipeConfig) -> None:
    """Raise :class:`ConfigError` (file:line of the field, what to change) for the first problem found."""
    where = recipe.origin.where
    for field, module, extra in missing_packages(recipe.logging.wandb, recipe.logging.mlflow):
        raise ConfigError(f"{where(field)}{field} is set but {module} is not installed: "
                          f"pip install -e \".[{extra}]\" (or remove {field})")
    save_dir = save_dir_of(recipe)
    resuming = save_dir.is_dir() and bool(complete_checkpoints(save_dir))
    init = recipe.checkpoint.init_from
    if init and not resuming:
        if not Path(init).exists():
            raise ConfigError(f"{where('checkpoint.init_from')}checkpoint.init_from: {init} does not exist")
        try:
            meta = read_meta(init)
            if is_lora_meta(meta):
                base_checkpoint(init, meta)
        except (CheckpointError, LoRACheckpointError) as e:
            raise ConfigError(f"{where('checkpoint.init_from')}checkpoint.init_from: {e}") from None
        if is_lora_meta(meta) and recipe.model.lora is None:
            raise ConfigError(
                f"{where('checkpoint.init_from')}checkpoint.init_from: {init} holds LoRA adapters; continue them "
                "with model.lora set as they were trained (see its psft_meta.json), or export it merged "
                "(psft-export-hf) and start a full fine-tune from a conversion of that"
            )
    for split in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, split)):
            if resolve_format(src) in ("jsonl", "json", "parquet") and not Path(src.path).is_file():
                raise ConfigError(f"{where(f'data.{split}[{i}].path')}data.{split}[{i}].path: no such file {src.path}")
    _check_eval_tasks(recipe)
    for field, folder in (("logging.run_dir", Path(recipe.logging.run_dir)), ("checkpoint.save_dir", save_dir),
                          ("data.cache_dir", Path(recipe.data.cache_dir))):
        problem = _writable(folder)
        if problem:
            raise ConfigError(f"{where(field)}{field}: cannot write {folder}: {problem}")
    hf_dir = recipe.checkpoint.save_hf_dir
    problem = _writable(Path(hf_dir)) if recipe.checkpoint.save_hf and hf_dir else None
    if problem:  # an HF copy is a by-product: its failures are warnings, never a stop (checkpoint/hf_copy.py)
        log.warning("%scheckpoint.save_hf_dir: cannot write %s: %s; the HF copies will fail (training and its "
                    "checkpoints are not affected)", where("checkpoint.save_hf_dir"), hf_dir, problem)
    need = checkpoint_bytes(recipe)
    free = shutil.disk_usage(_existing_parent(save_dir)).free
    if free < need:
        raise ConfigError(
            f"{where('checkpoint.save_dir')}checkpoint.save_dir: {save_dir} has {free / 2**30:.1f} GiB free, but one "
            f"checkpoint of this model takes about {need / 2**30:.1f} GiB (weights, Adam moments"
            f"{', fp32 main weights' if recipe.resolved_model.params_dtype == 'bf16' else ''}); free space or "
            "point checkpoint.save_dir at a larger disk"
        )


def _check_eval_tasks(recipe: RecipeConfig) -> None:
    """training.eval_tasks: lm-eval is installed and the tasks' data are there."""
    t = recipe.training
    if not t.eval_tasks:
        return
    where = recipe.origin.where
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"{where('training.eval_tasks')}training.eval_tasks needs lm-eval, the eval extra: "
                          "pip install -e \".[eval]\"")
    try:
        check_data(resolve_task_names(t.eval_tasks), default_paths(t.eval_tasks_data_root))
    except EvalInputError as e:
        missing = str(e).split(" (")[0]  # the path; the rest is psft-evaluate's --data hint
        raise ConfigError(f"{where('training.eval_tasks_data_root')}training.eval_tasks_data_root "
                          f"({t.eval_tasks_data_root}) lacks data training.eval_tasks need: {missing} "
                          "(lay it out like ../shared/data: ood/mmlu/{dev,test}, ood/TruthfulQA.csv)") from None


def check_launch(recipe: RecipeConfig, world_size: int, has_cuda: bool | None) -> None:
    """Everything a launch checks before it builds a weight, once per launch: the recipe at
    ``world_size`` (:meth:`RecipeConfig.validate`), what this machine can run
    (:meth:`RecipeConfig.validate_for_device`; skipped when ``has_cuda`` is None, as for
    ``--validate-only`` on a login node without GPUs) and the files and folders it names
    (:func:`preflight`). The launcher calls it before :func:`psft_megatron.run.run` does; the
    second call finds the recipe checked (and unchanged) and does nothing. Raises :class:`ConfigError`.
    """
    check = f"launch:world={world_size},cuda={has_cuda}"
    if recipe.passed(check):
        return
    recipe.validate(world_size)  # nothing to do for a recipe load_recipe validated at this size
    if has_cuda is not None:
        recipe.validate_for_device(has_cuda)
    preflight(recipe)
    recipe.mark_passed(check)
