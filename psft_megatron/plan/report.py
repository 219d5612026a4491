"""The plan as the lines ``launch/pretrain_psft.py RECIPE --plan`` prints."""

from __future__ import annotations

from psft_megatron.model.lora.count import adapter_parameters_per_model
from psft_megatron.plan.gpus import USABLE_FRACTION, GiB
from psft_megatron.plan.memory import Plan

__all__ = ["format_plan", "plan_summary"]

def _gib(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_plan(plan: Plan) -> str:
    """The plan as the lines ``--plan`` prints."""
    m = plan.model
    out = []
    gpu = f"{plan.gpu.name}, {plan.gpu.memory_bytes / GiB:.1f} GiB" + (" (assumed; pass --gpu)" if plan.gpu_assumed else "")
    out.append(f"plan: {plan.source or 'recipe'} on {plan.world_size} GPUs ({gpu})")
    out.append(f"  model: {m.family}, {m.num_parameters() / 1e9:.2f}B parameters, {m.num_layers} layers, hidden "
               f"{m.hidden_size}, {m.num_attention_heads} heads / {m.query_groups} KV groups, ffn {m.ffn_hidden_size}, "
               f"vocabulary {m.vocab_size} (padded {m.padded_vocab_size}), {m.params_dtype}")
    if m.is_moe:
        out.append(f"  experts: {m.num_experts} per layer in {len(m.moe_layers)} of {m.num_layers} layers, top "
                   f"{m.moe_router_topk}, width {m.moe_ffn_hidden_size}; {m.num_parameters(active=True) / 1e9:.2f}B "
                   f"parameters active per token")
    if m.lora is not None:
        out.append(f"  LoRA: rank {m.lora.rank}, alpha {m.lora.alpha:g} on {', '.join(m.lora.target_modules)}: "
                   f"{adapter_parameters_per_model(m) / 1e6:.1f}M adapter parameters train, the base is frozen")
    out.append(f"  layout: TP {plan.tp}{' + SP' if plan.sp else ''} x PP {plan.pp}"
               f"{f' (VP {plan.vp})' if plan.vp else ''} x CP {plan.cp} x DP {plan.dp}"
               + (f"; experts: EP {plan.ep} x expert TP {plan.etp} x expert DP {plan.edp}" if m.is_moe else "")
               + f"; seq_length {plan.seq}, "
               f"micro-batch {plan.micro}, {plan.micro_batches} micro-batches per mini-batch per DP rank, k = {plan.k}")
    attn = "TransformerEngine flash attention" if plan.impl == "transformer_engine" else "local spec (unfused attention, [s, s] scores)"
    out.append(f"  attention: {attn}; recompute: {plan.recompute}")
    names = [s.stage + (" stage" if s.stage != "only" else "") for s in plan.stages]
    out.append("memory per GPU (GiB)" + "".join(f"{n:>14}" for n in names))

    def row(label: str, values: list[float | None], detail: str = "") -> None:
        cells = "".join(f"{'-':>14}" if v is None else f"{v / GiB:14.2f}" for v in values)
        out.append(f"  {label:<52}{cells}" + (f"   {detail}" if detail else ""))

    for i, term in enumerate(plan.stages[0].static):
        row(term.name, [s.static[i].bytes for s in plan.stages], term.detail)
    alt = plan.stages[0].optimizer_alternative
    out.append(f"  {'  (' + alt.name + ')':<52}" + "".join(f"{s.optimizer_alternative.bytes / GiB:14.2f}" for s in plan.stages))
    row("activations kept, per micro-batch", [s.kept_per_micro_batch for s in plan.stages])
    row("activations kept, in flight", [s.kept.bytes for s in plan.stages],
        "; ".join(f"{s.stage}: x{s.in_flight:.2f}" for s in plan.stages))
    labels = []
    for s in plan.stages:
        for t in s.working:
            if t.name not in labels:
                labels.append(t.name)
    out.append("  working memory at the peak (the larger counts):")
    for label in labels:
        vals = [next((t.bytes for t in s.working if t.name == label), None) for s in plan.stages]
        detail = next((t.detail for s in plan.stages for t in s.working if t.name == label and t.detail), "")
        row("  " + label, vals, detail)
    for i, term in enumerate(plan.stages[0].other):
        row(term.name, [s.other[i].bytes for s in plan.stages], term.detail)
    row("total", [s.total for s in plan.stages])
    out.append(f"  {'usable: ' + f'{USABLE_FRACTION:.0%} of the GPU (allocator fragmentation)':<52}"
               f"{plan.usable_bytes / GiB:14.2f}")
    worst = plan.worst
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    out.append(f"  {verdict}: {worst.stage} stage {worst.total / GiB:.1f} GiB of {plan.usable_bytes / GiB:.1f} GiB usable "
               f"({worst.total / plan.usable_bytes:.0%})")
    fl = plan.flops
    out.append("time per optimizer step (whole job)")
    train = "2 x forward (frozen base) + the adapters' gradients" if m.lora is not None else "3 x forward"
    out.append(f"  model FLOPs: {fl['model_per_step']:.3e} = training {fl['train_per_step']:.3e} ({train} of "
               f"{fl['tokens_per_step']:.0f} tokens) + snapshot share {fl['snapshot_per_step']:.3e} ((k-1)/k forward)"
               + (f" + reference {fl['reference_per_step']:.3e}" if fl["reference_per_step"] else ""))
    if fl["hardware_per_step"] != fl["model_per_step"]:
        out.append(f"  hardware FLOPs with recompute: {fl['hardware_per_step']:.3e}")
    secs = plan.step_seconds
    if secs is None:
        out.append("  step time: unknown peak FLOP/s for this GPU")
    else:
        out.append(f"  at MFU {plan.mfu:.0%} of {plan.gpu.peak_flops / 1e12:.0f} TFLOP/s: {secs:.2f} s per step, "
                   f"{secs * plan.k:.1f} s per global batch of k = {plan.k} steps, "
                   f"{fl['tokens_per_step'] / secs:,.0f} trained tokens/s")
    for note in plan.notes:
        out.append(f"note: {note}")
    return "\n".join(out)


def plan_summary(plan: Plan) -> dict[str, float | int | str | bool | None]:
    """The plan's headline figures, flat (for experiment trackers): the GPU, the layout, the worst
    stage's memory against the usable memory, FLOPs and step time per optimizer step."""
    worst = plan.worst
    return {
        "gpu": plan.gpu.name + (" (assumed)" if plan.gpu_assumed else ""),
        "world_size": plan.world_size,
        "layout": f"TP{plan.tp}{'+SP' if plan.sp else ''} PP{plan.pp}{f' VP{plan.vp}' if plan.vp else ''} "
                  f"CP{plan.cp} DP{plan.dp}",
        "memory_gib": worst.total / GiB,
        "memory_stage": worst.stage,
        "usable_gib": plan.usable_bytes / GiB,
        "fits": plan.fits,
        "model_flops_per_step": plan.flops["model_per_step"],
        "step_time_s": plan.step_seconds,
        "mfu": plan.mfu,
    }
