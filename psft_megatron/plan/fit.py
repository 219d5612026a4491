"""Refuse a recipe that cannot fit: one line naming the biggest term and the change that helps most."""

from __future__ import annotations

import copy
from dataclasses import replace

from psft_megatron.config.load import ConfigError
from psft_megatron.plan.gpus import GiB
from psft_megatron.plan.memory import Plan, plan_recipe
from psft_megatron.recipe import RecipeConfig

__all__ = ["check_fits"]



def _with(recipe: RecipeConfig, **sections: dict) -> RecipeConfig:
    """A copy of ``recipe`` with some fields of some sections replaced."""
    out = copy.copy(recipe)  # keeps the origin and the model.hf_config already read
    for name, fields in sections.items():
        setattr(out, name, replace(getattr(recipe, name), **fields))
    return out


def _candidates(recipe: RecipeConfig, plan: Plan, biggest: str) -> list[tuple[str, str, RecipeConfig]]:
    """(field, what to write, changed recipe) remedies for the biggest term, most effective kind first."""
    m, par, tr = recipe.model, recipe.parallel, recipe.training
    out = []
    full = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if biggest.startswith("optimizer") and not recipe.optimizer.use_distributed_optimizer:
        out.append(("optimizer.use_distributed_optimizer", "set optimizer.use_distributed_optimizer: true",
                    _with(recipe, optimizer=dict(use_distributed_optimizer=True))))
    if biggest.startswith(("activations", "backward")):
        if par.tensor_model_parallel_size > 1 and not par.sequence_parallel:
            out.append(("parallel.sequence_parallel", "set parallel.sequence_parallel: true",
                        _with(recipe, parallel=dict(sequence_parallel=True))))
        if plan.impl == "local" and m.recompute_granularity is None:
            out.append(("model.recompute_granularity", "set model.recompute_granularity: selective (drops the [s, s] "
                        "scores)", _with(recipe, model=dict(recompute_granularity="selective"))))
        if m.recompute_granularity != "full":
            out.append(("model.recompute_granularity", "set model.recompute_granularity: full, recompute_method: "
                        "uniform, recompute_num_layers: 1", _with(recipe, model=full)))
        elif m.recompute_method != "uniform" or (m.recompute_num_layers or 1) > 1:
            out.append(("model.recompute_num_layers", "set model.recompute_method: uniform, recompute_num_layers: 1",
                        _with(recipe, model=full)))
        if tr.micro_batch_size > 1:
            out.append(("training.micro_batch_size", "set training.micro_batch_size: 1",
                        _with(recipe, training=dict(micro_batch_size=1))))
    if biggest.startswith("output layer") and not recipe.loss.fused_output_layer:
        out.append(("loss.fused_output_layer", "set loss.fused_output_layer: true",
                    _with(recipe, loss=dict(fused_output_layer=True))))
    return out


def _generic_advice(biggest: str) -> tuple[str, str]:
    if biggest.startswith(("weights", "gradients", "optimizer", "reference")):
        return ("parallel.tensor_model_parallel_size",
                "raise parallel.tensor_model_parallel_size or pipeline_model_parallel_size, or run on more GPUs "
                "(a larger data-parallel size shards the distributed optimizer further)")
    return ("parallel.context_parallel_size",
            "raise parallel.context_parallel_size (each rank then holds 1/CP of every sequence) or "
            "tensor_model_parallel_size, or lower training.seq_length")


def check_fits(plan: Plan, recipe: RecipeConfig) -> None:
    """Raise :class:`ConfigError` (one line) when the worst stage exceeds the usable memory: the
    biggest term, and the first change that makes the plan fit (or the best of them)."""
    if plan.fits:
        return
    worst = plan.worst
    biggest = max(worst.terms, key=lambda x: x.bytes)
    head = (f"does not fit on {plan.gpu.name}: the {worst.stage} pipeline stage needs {worst.total / GiB:.1f} GiB per "
            f"GPU, {plan.usable_bytes / GiB:.1f} GiB usable; the biggest term is {biggest.name} "
            f"({biggest.bytes / GiB:.1f} GiB)")
    best = None
    for field_name, advice, changed in _candidates(recipe, plan, biggest.name):
        try:
            changed.resolved_model.validate(changed.parallel)
        except Exception:  # a remedy the layout rules refuse is no remedy
            continue
        alt = plan_recipe(changed, plan.world_size, plan.gpu, mfu=plan.mfu, device=plan.device)
        if best is None or alt.worst.total < best[2]:
            best = (field_name, advice, alt.worst.total, alt.fits)
        if alt.fits:
            break
    if best is not None:
        field_name, advice, total, fits = best
        outcome = "then it fits" if fits else "not enough alone"
        raise ConfigError(f"{plan_where(recipe, field_name)}{head}: {advice} ({outcome}: {total / GiB:.1f} GiB)")
    field_name, advice = _generic_advice(biggest.name)
    raise ConfigError(f"{plan_where(recipe, field_name)}{head}: {advice}")


def plan_where(recipe: RecipeConfig, field_name: str) -> str:
    """``file:line: `` of ``field_name`` in the recipe (or of its section)."""
    return recipe.origin.where(field_name)
