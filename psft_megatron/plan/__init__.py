"""A recipe's memory and time per GPU, worked out before anything starts (``--plan``).

    plan = plan_recipe(recipe, world_size=64, gpu=GPUS["h100-80gb"])
    print(format_plan(plan))
    check_fits(plan, recipe)    # ConfigError naming the biggest term and what to change

Everything is counted per GPU, for the worst rank of each pipeline-stage kind (the first
stage holds the most activations in flight, the last one the output layer and the loss).
One job per module: ``gpus`` (GPU models), ``layer`` (what a layer keeps), ``stage``
(a chunk's activations, the head, the schedule's in-flight micro-batches), ``memory``
(weights, gradients, optimizer and the per-stage totals), ``moe`` (expert layers: parameters
over EP, routed-token activations, dispatcher buffers), ``flops`` (FLOPs and step time),
``report`` (the printout), ``fit`` (the refusal).

Measured against: ``tests/test_plan.py`` (CPU runs: weights, gradients and optimizer state to
the byte; activations against measured peak memory) and the published formulas.
"""

from psft_megatron.plan.fit import check_fits
from psft_megatron.plan.flops import forward_flops_per_token, step_flops
from psft_megatron.plan.gpus import DEFAULT_MFU, GPUS, GpuSpec, detect_gpu
from psft_megatron.plan.layer import Kernels, Shape, Term, kernels_for, layer_saved
from psft_megatron.plan.memory import (
    Plan,
    StageMemory,
    optimizer_bytes_per_param,
    plan_recipe,
    stage_adapter_parameters,
    stage_parameter_split,
    stage_parameters,
)
from psft_megatron.plan.report import format_plan, plan_summary
from psft_megatron.plan.stage import in_flight_chunks, stage_activations

__all__ = ["DEFAULT_MFU", "GPUS", "GpuSpec", "Kernels", "Plan", "Shape", "StageMemory", "Term", "check_fits", "detect_gpu",
           "format_plan", "forward_flops_per_token", "in_flight_chunks", "kernels_for", "layer_saved",
           "optimizer_bytes_per_param", "plan_recipe", "plan_summary", "stage_activations", "stage_adapter_parameters",
           "stage_parameter_split", "stage_parameters", "step_flops"]
