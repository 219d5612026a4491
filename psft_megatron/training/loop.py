"""The PSFT training loop: warm-up SFT, then per global batch a snapshot pass and k optimizer steps.

For each global batch (this DP rank's share, already split by the loader into k
mini-batches of micro-batches):

1. phase = ``sft`` during the first ``training.sft_warmup_steps`` optimizer steps, else
   ``loss.name``;
2. for ``psft`` with k > 1: one forward-only snapshot pass over mini-batches 2..k records
   logp_old (mini-batch 1 runs on the snapshot weights themselves, so its own detached
   log-probs are its logp_old: that saves 1/k of the pass);
3. each mini-batch: forward+backward through megatron's pipeline schedule, one
   optimizer step, one metrics.jsonl record;
4. evaluation and checkpoints between global batches.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from psft_megatron.checkpoint.model_checkpoint import load_model_checkpoint
from psft_megatron.checkpoint.train_checkpoint import (
    find_latest,
    load_training_checkpoint,
    save_training_checkpoint,
)
from psft_megatron.config.model import ModelConfig
from psft_megatron.config.recipe import RecipeConfig
from psft_megatron.data.masks import check_model_honours_mask
from psft_megatron.loss.objectives import ObjectiveConfig
from psft_megatron.model.build import build_model
from psft_megatron.runtime.distributed import DistEnv
from psft_megatron.training.data_setup import TrainData, build_data
from psft_megatron.training.metrics import MetricsWriter, train_record
from psft_megatron.training.optimizer import OptimizerBundle, build_optimizer
from psft_megatron.training.step import PassSetup, evaluate, train_global_batch

log = logging.getLogger("psft")


@dataclass
class TrainResult:
    """What a finished run returns (on every rank; metrics only on the logging rank)."""

    step: int
    records: list[dict[str, Any]]
    eval_records: list[dict[str, Any]]
    last_checkpoint: Path | None


def total_steps(recipe: RecipeConfig, data: TrainData) -> int:
    """Optimizer steps of the run: training.train_steps, or epochs x global batches x k."""
    t = recipe.training
    if t.train_steps is not None:
        return t.train_steps
    k = t.mini_batches_per_global_batch
    return max(1, math.floor(t.epochs * data.loader.steps_per_epoch)) * k


def _save_dir(recipe: RecipeConfig) -> Path:
    return Path(recipe.checkpoint.save_dir or Path(recipe.logging.run_dir) / "checkpoints")


def _meta(model_cfg: ModelConfig, recipe: RecipeConfig, step: int) -> dict[str, Any]:
    return {"model": model_cfg, "step": step, "tokenizer": recipe.data.tokenizer}


def _latest_checkpoint(recipe: RecipeConfig, save_dir: Path) -> Path | None:
    """The checkpoint to resume from, chosen by rank 0 and broadcast (ranks must agree, even
    on a filesystem whose metadata caches disagree right after a crash)."""
    found = find_latest(save_dir) if dist.get_rank() == 0 else None
    choice = [str(found) if found else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    if not recipe.checkpoint.resume:  # raised on every rank: none is left waiting
        raise ValueError(
            f"checkpoint.resume is false but {save_dir} already holds checkpoints ({Path(choice[0]).name}) from an "
            "earlier run, which this run's saves would mix with: use a fresh checkpoint.save_dir or "
            "logging.run_dir, or set checkpoint.resume: true"
        )
    return Path(choice[0])


def _phase_objective(recipe: RecipeConfig, step: int) -> ObjectiveConfig:
    if step < recipe.training.sft_warmup_steps:
        return replace(recipe.loss, name="sft")
    return recipe.loss


def train(recipe: RecipeConfig, env: DistEnv) -> TrainResult:
    """Run (or resume) the recipe on an initialised job; see the module docstring."""
    recipe.validate(env.world_size)
    recipe.validate_for_device(env.device.type == "cuda")
    run_dir = Path(recipe.logging.run_dir)
    is_logger = env.rank == env.world_size - 1  # the last pipeline stage holds the loss
    if env.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

    model_cfg = recipe.model.resolve()  # reads model.hf_config once, if set
    data = build_data(recipe, env)
    built = build_model(model_cfg, recipe.parallel)
    if built.transformer_impl == "local":
        for chunk in built.chunks:  # packed rows rely on the block-diagonal mask being applied
            check_model_honours_mask(chunk)
    if env.rank == 0:
        log.info("model: %s", built.description)
    steps_total = total_steps(recipe, data)
    save_dir = _save_dir(recipe)
    latest = _latest_checkpoint(recipe, save_dir)
    if latest is None:
        # Before the optimizer is built: bf16 runs keep fp32 main copies of the weights, made
        # from the model's parameters when the optimizer is created.
        if recipe.checkpoint.init_from:
            load_model_checkpoint(built.chunks, recipe.checkpoint.init_from)
            log.info("initialised weights from %s", recipe.checkpoint.init_from)
        else:
            log.warning("starting from RANDOM weights (checkpoint.allow_random_init is set)")
    bundle: OptimizerBundle = build_optimizer(
        built.chunks, recipe.optimizer, steps_total, bf16=model_cfg.params_dtype == "bf16"
    )
    setup = PassSetup(
        backend="te" if built.transformer_impl == "transformer_engine" else "local",
        device=env.device,
        vocab_size=model_cfg.vocab_size,  # the loss leaves the padded columns out
    )

    step, consumed_tokens = 0, 0
    if latest is not None:
        # Weights, fp32 main weights and optimizer state, schedule, RNG: all from the checkpoint.
        state = load_training_checkpoint(latest, bundle.model, bundle.optimizer, bundle.scheduler)
        data.loader.load_state_dict(state["data"])
        step, consumed_tokens = int(state["step"]), int(state["consumed_tokens"])
    start_step = step

    metrics = MetricsWriter(run_dir, is_logger, steps_total, recipe.logging.tensorboard, recipe.logging.log_interval,
                            recipe.logging.progress_bar, resumed_at=step)
    records: list[dict[str, Any]] = []
    eval_records: list[dict[str, Any]] = []
    last_ckpt: Path | None = latest
    k = recipe.training.mini_batches_per_global_batch
    tokens_per_step = recipe.training.mini_batch_size * recipe.training.seq_length
    try:
        while step < steps_total:
            gb = next(data.loader)
            objective = _phase_objective(recipe, step)
            t0 = time.monotonic()
            for result in train_global_batch(bundle, gb, objective, setup):
                step += 1
                consumed_tokens += tokens_per_step
                seconds = time.monotonic() - t0
                t0 = time.monotonic()
                if result.stats is not None:
                    rec = train_record(step, objective.name, result.stats, result.grad_norm,
                                       result.lr, tokens_per_step, seconds)
                    records.append(rec)
                    metrics.write(rec)
                    metrics.progress(rec)
            every = recipe.training.eval_interval
            if every and step // every > (step - k) // every:  # crossed a multiple of eval_interval
                ev = _evaluate(bundle.model, data, recipe, setup, step)
                if ev is not None:
                    eval_records.append(ev)
                    metrics.write(ev, prefix="eval")
                    if is_logger:
                        log.info("eval step %d: loss %.4f entropy %.4f", step, ev["loss"], ev["entropy"])
            interval = recipe.checkpoint.save_interval
            limit = recipe.training.exit_after_steps
            exiting = limit is not None and step - start_step >= limit
            if (
                (interval and step % interval == 0 and step < steps_total)
                or (step >= steps_total and recipe.checkpoint.save_at_end)
                or (exiting and step < steps_total)
            ):
                train_state = {"step": step, "consumed_tokens": consumed_tokens, "data": data.loader.state_dict(),
                               "phase": _phase_objective(recipe, step).name}
                last_ckpt = save_training_checkpoint(
                    save_dir, step, bundle.model, bundle.optimizer, bundle.scheduler, train_state,
                    _meta(model_cfg, recipe, step), keep_last=recipe.checkpoint.keep_last,
                )
            if exiting and step < steps_total:
                log.info("stopping after step %d (training.exit_after_steps); relaunch to resume", step)
                break
    finally:
        metrics.close()
    return TrainResult(step=step, records=records, eval_records=eval_records, last_checkpoint=last_ckpt)


def _evaluate(model: list, data: TrainData, recipe: RecipeConfig, setup: PassSetup, step: int) -> dict[str, Any] | None:
    micro_batches = data.eval_micro_batches(recipe.training.eval_rows)
    stats = evaluate(model, micro_batches, setup)
    if stats is None:
        return None
    return {"step": step, "loss": stats["loss"], "entropy": stats["mean_entropy"],
            "mean_logp": stats["mean_logp"], "tokens": int(stats["token_count"])}
