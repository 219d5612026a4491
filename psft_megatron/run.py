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
from psft_megatron.checkpoint.lora import LORA_BASE, lora_base_for
from psft_megatron.checkpoint.model_checkpoint import load_model_checkpoint, read_meta
from psft_megatron.data.masks import check_model_honours_mask
from psft_megatron.model.build import BuiltModel, build_model
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.init import init_layout_independent
from psft_megatron.model.lora.state import BaseModelView
from psft_megatron.plan import GPUS, detect_gpu, format_plan, plan_recipe, plan_summary
from psft_megatron.preflight import check_launch, save_dir_of
from psft_megatron.recipe import RecipeConfig
from psft_megatron.runtime.distributed import DistEnv, init_distributed, init_model_parallel, set_seed, teardown
from psft_megatron.training.batch_cursor import BatchCursor
from psft_megatron.training.data_setup import TrainData, build_data
from psft_megatron.training.evaluator import Evaluator, build_tasks
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
    resolved = recipe.to_dict()
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    model_cfg = recipe.resolved_model  # model.hf_config was read once, when the recipe was validated
    t = recipe.training
    data = build_data(recipe.data, t, recipe.parallel, env)
    built = _build_policy_model(recipe, model_cfg, env)
    steps = total_steps(recipe, data)
    checkpointer = Checkpointer(recipe.checkpoint, save_dir_of(recipe), model_cfg, meta=_checkpoint_meta(recipe),
                                adapter_seed=t.seed)
    checkpointer.find_resume_point()
    # Before the optimizer copies the weights into its fp32 main params.
    if not checkpointer.load_initial_weights(built.chunks):
        init_layout_independent(built.chunks, t.seed)  # the same random model at every layout
    # The frozen starting weights: sft_kl's reference and/or the evaluator's KL baseline (one copy;
    # with LoRA the base itself, the adapters switched off).
    reference = _build_reference(recipe, model_cfg, built.chunks) \
        if recipe.loss.needs_reference or t.eval_kl_to_start else None
    bundle = build_optimizer(built.chunks, recipe.optimizer, steps, bf16=model_cfg.params_dtype == "bf16")
    progress, cursor = TrainProgress(), BatchCursor.from_config(t)
    states = {"progress": progress, "data": data.loader, "batch": cursor}
    checkpointer.resume(bundle.model, bundle.optimizer, bundle.scheduler, states)

    setup = PassSetup.for_model(built, model_cfg, env.device)
    is_logger = env.rank == env.world_size - 1  # the last pipeline stage holds the loss
    metrics = MetricsWriter.from_config(recipe.logging, is_logger, steps, resumed_at=progress.step,
                                        run_config=resolved)
    if metrics.trackers:
        metrics.log_plan(*_plan_for_trackers(recipe, env))
    return Trainer(
        bundle=bundle,
        data=data,
        setup=setup,
        phases=PhaseSchedule.from_config(recipe.loss, t),
        checkpointer=checkpointer,
        evaluator=Evaluator.from_config(t, data, setup, start_model=reference,
                                        tasks=build_tasks(t, recipe.data, model_cfg, bundle.model, run_dir)),
        metrics=metrics,
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


def _checkpoint_meta(recipe: RecipeConfig) -> dict:
    """What every checkpoint of the run records besides the model: the tokenizer, and for a LoRA run
    the full base checkpoint its adapters adapt (checkpoints hold the adapters only)."""
    meta = {"tokenizer": recipe.data.tokenizer}
    if recipe.model.lora is not None:
        init = recipe.checkpoint.init_from
        meta[LORA_BASE] = str(lora_base_for(init, read_meta(init)))
    return meta


def _plan_for_trackers(recipe: RecipeConfig, env: DistEnv) -> tuple[dict, str]:
    """The ``--plan`` summary and report of this launch (its world size; this machine's GPU, else an H100)."""
    gpu = detect_gpu() if env.device.type == "cuda" else None
    plan = plan_recipe(recipe, env.world_size, gpu or GPUS["h100-80gb"], gpu_assumed=gpu is None,
                       device=env.device.type)
    return plan_summary(plan), format_plan(plan)


def _build_policy_model(recipe: RecipeConfig, model_cfg: ModelConfig, env: DistEnv) -> BuiltModel:
    """The trained model's chunks on this rank (weights loaded later, by the checkpointer)."""
    built = build_model(model_cfg, recipe.parallel, fused_output_layer=recipe.loss.fused_output_layer)
    if built.transformer_impl == "local":
        for chunk in built.chunks:  # packed rows rely on the block-diagonal mask being applied
            check_model_honours_mask(chunk)
    if env.rank == 0:
        log.info("model: %s", built.description)
    return built


def _build_reference(recipe: RecipeConfig, model_cfg: ModelConfig, chunks: list) -> list:
    """The frozen reference model (the run's starting weights) for objectives that need one and
    for the evaluator's KL to the start: the same layout, forward-only, never in the optimizer.
    Costs one more copy of the weights per rank (no gradients, no optimizer state), and a forward
    pass per global batch (sft_kl) or per evaluation.

    With LoRA the reference is the base model: the trained ``chunks`` with their adapters switched
    off (:class:`BaseModelView`), no copy of the weights. That is the run's start when it begins
    from a full checkpoint (B = 0); a run continuing a LoRA checkpoint measures against the base
    under it, not against the adapters it continued from."""
    if model_cfg.lora is not None:
        log.info("reference model: the base model (the LoRA model with its adapters off)")
        return [BaseModelView(c) for c in chunks]
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
    checkpoint), which job scripts read to decide whether to requeue; the logging rank tells
    the experiment trackers the same, and rank 0 waits for an HF copy still being written
    (not after a preemption). The default process group is destroyed at the end only if this
    call created it, so a caller (a test) may run several recipes in one job.
    """
    owns_process_group = not dist.is_initialized()
    backend = None if recipe.distributed.backend == "auto" else recipe.distributed.backend
    env = init_distributed(backend, recipe.distributed.timeout_minutes)
    trainer: Trainer | None = None
    try:
        init_model_parallel(recipe.parallel)
        set_seed(recipe.training.seed)
        trainer = build_trainer(recipe, env)
        result = train(trainer)
    except TrainingDiverged as e:
        _end_launch(recipe, env, trainer, "diverged", reason=str(e))
        raise
    except Exception as e:
        _end_launch(recipe, env, trainer, "failed", reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        teardown(destroy_process_group=owns_process_group)
    status = "preempted" if result.preempted else ("stopped" if result.stop_reason else "finished")
    _end_launch(recipe, env, trainer, status, reason=result.stop_reason, step=result.step,
                checkpoint=str(result.last_checkpoint) if result.last_checkpoint else None,
                skipped_steps=result.skipped_steps)
    return result


def _end_launch(recipe: RecipeConfig, env: DistEnv, trainer: Trainer | None, status: str, **fields: object) -> None:
    """How the launch ended, to run_status.json (rank 0) and the trackers (the logging rank); then the
    wait for an HF copy in flight (rank 0; a preempted launch leaves it running on its own)."""
    _write_status(recipe, env, status, **fields)
    if trainer is not None:
        trainer.metrics.finish(status, **fields)
        trainer.checkpointer.finish(wait=status != "preempted")


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
