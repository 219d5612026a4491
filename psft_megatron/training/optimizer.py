"""megatron-core's DDP wrapper, optimizer and LR scheduler for the model chunks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from psft_megatron.runtime.cpu_compat import PatchTarget
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


# Where megatron-core 0.16's distributed optimizer goes wrong over torch's AdamW (its fallback
# without TransformerEngine or apex, on any device), worked around by the two functions below.
# tests/test_cpu_compat_targets.py checks that each fragment still stands in its place, so a
# megatron upgrade that changes one fails loudly (then re-check whether the fix is still needed).
TORCH_ADAM_TARGETS: tuple[PatchTarget, ...] = (
    PatchTarget(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        'steps = list(set([s["step"].item() for s in inner_state_dict["state"].values()]))',
        "state_dict() reads torch AdamW's per-parameter step, which a fresh optimizer does not have yet",
    ),
    PatchTarget(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        's["step"] = step',
        "load_state_dict gives every parameter the same step tensor; torch's foreach AdamW adds 1 to it per parameter",
    ),
    PatchTarget(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        'dst_tensors = {"param": main_param, **optim_state}',
        "_set_main_param_and_optimizer_states copies every state key, torch AdamW's step included",
    ),
    PatchTarget(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        'if k == "step":\n                            # Handle torch Adam "step" state separately.',
        "the fully reshardable loader leaves step out (load_state_dict already set it)",
    ),
)


def _init_torch_adam_state(optimizer: object) -> None:
    """Give each distributed optimizer's torch Adam the state its first step would create.

    Without TransformerEngine or apex, megatron's DistributedOptimizer wraps torch's AdamW and
    reads every parameter's ``step`` to build its state dict (``assert len(steps) == 1``), but
    torch creates that state lazily at the first step: a fresh optimizer can be neither saved
    nor loaded into (a resume fails). Creating it now, as torch's ``Adam._init_group`` would
    (step 0, zero moments), changes no update: the first step finds it and skips its own init.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    # torch's scalar dtype for a non-fused, non-capturable step (torch.optim.optimizer._get_scalar_dtype).
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(opt, DistributedOptimizer) or type(inner) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        if any(g.get("fused") or g.get("capturable") or g.get("amsgrad") for g in inner.param_groups):
            continue  # other state layouts; megatron never builds these
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {
                        "step": torch.tensor(0.0, dtype=step_dtype),
                        "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                    }


def _fix_torch_adam_state_load() -> None:
    """Let the distributed optimizer load its fully reshardable state into torch's AdamW.

    Two things go wrong in megatron-core 0.16 with torch's AdamW. ``load_state_dict`` sets one
    shared ``step`` tensor for every parameter (from the checkpoint's param groups); torch's
    foreach AdamW then adds 1 to it once per parameter on each step, which corrupts the bias
    correction of every step after a resume. And ``load_parameter_state_from_fully_reshardable``
    hands ``_set_main_param_and_optimizer_states`` the main param and moments but not ``step``,
    while that method copies every key of the optimizer state, ``step`` included (KeyError).
    So ``step`` is set aside while the rest is copied, and each parameter gets its own copy back.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if getattr(DistributedOptimizer, "_psft_own_steps", False):
        return
    original = DistributedOptimizer.load_parameter_state_from_fully_reshardable

    def load_parameter_state_from_fully_reshardable(self: Any, state_dict: dict) -> None:
        if not isinstance(self.optimizer, torch.optim.Adam):
            return original(self, state_dict)
        steps = {p: st.pop("step") for p, st in self.optimizer.state.items() if "step" in st}
        try:
            original(self, state_dict)
        finally:
            for p, step in steps.items():
                self.optimizer.state[p]["step"] = step.clone()  # one tensor per parameter, as torch keeps it

    DistributedOptimizer.load_parameter_state_from_fully_reshardable = load_parameter_state_from_fully_reshardable
    DistributedOptimizer._psft_own_steps = True


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
    if cfg.use_distributed_optimizer:
        _init_torch_adam_state(optimizer)
        _fix_torch_adam_state_load()
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

