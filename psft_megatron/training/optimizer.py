"""megatron-core's DDP wrapper, optimizer and LR scheduler for the model chunks."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from psft_megatron.training.config import OptimConfig

log = logging.getLogger(__name__)


@dataclass
class OptimizerBundle:
    """What a training step needs: DDP-wrapped chunks, the optimizer and its scheduler."""

    model: list  # megatron DistributedDataParallel chunks
    optimizer: object  # megatron MegatronOptimizer (ChainedOptimizer)
    scheduler: object  # megatron OptimizerParamScheduler


def wrap_ddp(chunks: list[torch.nn.Module], use_distributed_optimizer: bool) -> list:
    """Wrap each model chunk in megatron's DDP (contiguous fp32 grad buffers, reduced over DP)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        wrapped.append(
            DistributedDataParallel(
                config=chunk.config,
                ddp_config=ddp_config,
                module=chunk,
                # Only the first chunk may skip bucketing (Megatron-LM's rule for interleaving).
                disable_bucketing=i > 0,
            )
        )
    # The schedule calls these: finalize_model_grads reduces grads over DP (finish_grad_sync),
    # sums sequence-parallel norm grads over TP and tied-embedding grads over the pipeline
    # ends; no_sync defers DP reduction to the last micro-batch.
    config = chunks[0].config
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(chunks: list[torch.nn.Module], cfg: OptimConfig, total_steps: int, bf16: bool) -> OptimizerBundle:
    """AdamW with decoupled weight decay (norms and biases excluded, megatron's default),
    gradient clipping by global norm, and LR warm-up then cosine/linear/constant decay."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = wrap_ddp(chunks, cfg.use_distributed_optimizer)
    opt_config = OptimizerConfig(
        optimizer="adam",  # megatron's "adam" is torch AdamW: decoupled weight decay
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    decay_steps = max(total_steps, cfg.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr if cfg.lr_schedule != "constant" else cfg.lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.lr_schedule,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        # On resume the saved schedule wins over the recipe (a changed lr is logged, not applied).
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    log.info(
        "optimizer: megatron AdamW lr=%g wd=%g clip=%g schedule=%s warmup=%d decay_steps=%d distributed=%s",
        cfg.lr, cfg.weight_decay, cfg.clip_grad, cfg.lr_schedule, cfg.lr_warmup_steps, decay_steps,
        cfg.use_distributed_optimizer,
    )
    return OptimizerBundle(model=model, optimizer=optimizer, scheduler=scheduler)

