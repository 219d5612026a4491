"""One entry for a training run: initialise -> build -> train -> teardown.

    result = run(load_recipe("recipes/tiny_cpu.yaml"))

The launcher, the tests and the benchmarks all go through :func:`run` (or
:func:`build_trainer` when they drive the passes themselves), so the set-up sequence
is written once.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch.distributed as dist
import yaml

from psft_megatron.checkpoint.checkpointer import Checkpointer
from psft_megatron.checkpoint.model_checkpoint import load_model_checkpoint
from psft_megatron.data.masks import check_model_honours_mask
from psft_megatron.model.build import BuiltModel, build_model
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.init import init_layout_independent
from psft_megatron.preflight import check_launch, save_dir_of
from psft_megatron.recipe import RecipeConfig
from psft_megatron.runtime.distributed import DistEnv, init_distributed, init_model_parallel, set_seed, teardown
from psft_megatron.training.batch_cursor import BatchCursor
from psft_megatron.training.data_setup import TrainData, build_data
from psft_megatron.training.evaluator import Evaluator
from psft_megatron.training.guards import LossSpikeDetector, NonFiniteGuard, TrainingDiverged
from psft_megatron.training.loop import Trainer, TrainResult, train
from psft_megatron.training.metrics import MetricsWriter
from psft_megatron.training.moe_metrics import MoEMetrics
from psft_megatron.training.optimizer import build_optimizer
from psft_megatron.training.phases import PhaseSchedule
from psft_megatron.training.progress import TrainProgress
from psft_megatron.training.step import PassSetup
from psft_megatron.training.stopping import StopPolicy

log = logging.getLogger("psft")

__all__ = ["build_trainer", "run", "total_steps"]


def total_steps(recipe: RecipeConfig, data: TrainData) -> int:
    """Optimizer steps of the run: training.train_steps, or epochs x global batches x k x passes."""
    t = recipe.training
    if t.train_steps is not None:
        return t.train_steps
    k = t.steps_per_global_batch
    return max(1, math.floor(t.epochs * data.loader.steps_per_epoch)) * k


def build_trainer(recipe: RecipeConfig, env: DistEnv) -> Trainer:
    """Build this rank's data, model, optimizer and run components for ``recipe``, resumed from
    the latest checkpoint when there is one. Needs :func:`init_model_parallel` and :func:`set_seed`."""
    check_launch(recipe, env.world_size, has_cuda=env.device.type == "cuda")  # done already when launched
    run_dir = Path(recipe.logging.run_dir)
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    model_cfg = recipe.resolved_model  # model.hf_config was read once, when the recipe was validated
    t = recipe.training
    data = build_data(recipe.data, t, recipe.parallel, env)
    built = _build_policy_model(recipe, model_cfg, env)
    steps = total_steps(recipe, data)
    checkpointer = Checkpointer(recipe.checkpoint, save_dir_of(recipe), model_cfg,
                                meta={"tokenizer": recipe.data.tokenizer})
    checkpointer.find_resume_point()
    # Before the optimizer copies the weights into its fp32 main params.
    if not checkpointer.load_initial_weights(built.chunks):
        init_layout_independent(built.chunks, t.seed)  # the same random model at every layout
    # The frozen starting weights: sft_kl's reference and/or the evaluator's KL baseline (one copy).
    reference = _build_reference(recipe, model_cfg) if recipe.loss.needs_reference or t.eval_kl_to_start else None
    bundle = build_optimizer(built.chunks, recipe.optimizer, steps, bf16=model_cfg.params_dtype == "bf16")
    progress, cursor = TrainProgress(), BatchCursor.from_config(t)
    states = {"progress": progress, "data": data.loader, "batch": cursor}
    checkpointer.resume(bundle.model, bundle.optimizer, bundle.scheduler, states)

    setup = PassSetup.for_model(built, model_cfg, env.device)
    is_logger = env.rank == env.world_size - 1  # the last pipeline stage holds the loss
    return Trainer(
        bundle=bundle,
        data=data,
        setup=setup,
        phases=PhaseSchedule.from_config(recipe.loss, t),
        checkpointer=checkpointer,
        evaluator=Evaluator.from_config(t, data, setup, start_model=reference),
        metrics=MetricsWriter.from_config(recipe.logging, is_logger, steps, resumed_at=progress.step),
        stop=StopPolicy.from_config(t, progress.step, env.device),
        progress=progress,
        cursor=cursor,
        guard=NonFiniteGuard.from_config(t),
        spikes=LossSpikeDetector.from_config(t),
        total_steps=steps,
        tokens_per_step=t.mini_batch_size * t.seq_length,
        is_logger=is_logger,
        passes_per_snapshot=t.passes_per_snapshot,
        states=states,
        reference=reference,
        moe=MoEMetrics(built.chunks, model_cfg, t.mini_batch_size // t.micro_batch_size) if model_cfg.is_moe else None,
    )


def _build_policy_model(recipe: RecipeConfig, model_cfg: ModelConfig, env: DistEnv) -> BuiltModel:
    """The trained model's chunks on this rank (weights loaded later, by the checkpointer)."""
    built = build_model(model_cfg, recipe.parallel, fused_output_layer=recipe.loss.fused_output_layer)
    if built.transformer_impl == "local":
        for chunk in built.chunks:  # packed rows rely on the block-diagonal mask being applied
            check_model_honours_mask(chunk)
    if env.rank == 0:
        log.info("model: %s", built.description)
    return built


def _build_reference(recipe: RecipeConfig, model_cfg: ModelConfig) -> list:
    """The frozen reference model (the run's starting weights) for objectives that need one and
    for the evaluator's KL to the start: the same layout, forward-only, never in the optimizer.
    Costs one more copy of the weights per rank (no gradients, no optimizer state), and a forward
    pass per global batch (sft_kl) or per evaluation."""
    ref = build_model(model_cfg, recipe.parallel, fused_output_layer=recipe.loss.fused_output_layer)
    if recipe.checkpoint.init_from:
        load_model_checkpoint(ref.chunks, recipe.checkpoint.init_from)
    else:  # a random start is reproducible: the same draws as the trained model's first weights
        init_layout_independent(ref.chunks, recipe.training.seed)
    for chunk in ref.chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    users = [f"loss {recipe.loss.name}"] if recipe.loss.needs_reference else []
    users += ["eval_kl_to_start"] if recipe.training.eval_kl_to_start else []
    log.info("frozen starting model (for %s): %s", ", ".join(users), ref.description)
    return ref.chunks


def run(recipe: RecipeConfig) -> TrainResult:
    """Train ``recipe`` in this process (one rank of a torchrun job, or alone): set up
    torch.distributed and megatron's parallel state, build, train or resume, tear down.

    Rank 0 records how the launch ended in ``<run_dir>/run_status.json`` (``finished``,
    ``stopped``, ``preempted``, ``diverged`` or ``failed``, with the step and the last
    checkpoint), which job scripts read to decide whether to requeue. The default process
    group is destroyed at the end only if this call created it, so a caller (a test) may
    run several recipes in one job.
    """
    owns_process_group = not dist.is_initialized()
    backend = None if recipe.distributed.backend == "auto" else recipe.distributed.backend
    env = init_distributed(backend, recipe.distributed.timeout_minutes)
    try:
        init_model_parallel(recipe.parallel)
        set_seed(recipe.training.seed)
        result = train(build_trainer(recipe, env))
    except TrainingDiverged as e:
        _write_status(recipe, env, "diverged", reason=str(e))
        raise
    except Exception as e:
        _write_status(recipe, env, "failed", reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        teardown(destroy_process_group=owns_process_group)
    status = "preempted" if result.preempted else ("stopped" if result.stop_reason else "finished")
    _write_status(recipe, env, status, reason=result.stop_reason, step=result.step,
                  checkpoint=str(result.last_checkpoint) if result.last_checkpoint else None,
                  skipped_steps=result.skipped_steps)
    return result


def _write_status(recipe: RecipeConfig, env: DistEnv, status: str, **fields: object) -> None:
    if env.rank != 0:
        return
    path = Path(recipe.logging.run_dir) / "run_status.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"status": status, **fields}, indent=1) + "\n")
        tmp.replace(path)
    except OSError as e:  # the status is a convenience: never mask the run's own outcome
        log.warning("could not write %s: %s", path, e)
