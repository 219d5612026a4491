#!/usr/bin/env python
"""One training step of bench_trainer.py's model, timed and then profiled: tokens/s, model
TFLOP/s and MFU of the step, and where its time goes (torch.profiler).

    python benchmarks/gpu_profile_step.py [--layers 24 --hidden 2048 --seq 4096 --mini 4 --micro 1]
        [--timed-steps 3] [--steps 1] [--table profile.txt] [--json profile.json]

Builds the model bench_trainer.py builds for the same flags (its shape rule: SwiGLU width
hidden*8/3 rounded down to 64, max(4, hidden/64) heads, max(2, hidden/256) KV groups,
vocabulary 384; bf16 and the local layer spec on a GPU, fp32 on CPU) through the run's own
``build_trainer``, on NCCL (the rank initialises its own process group). After one warm-up
SFT step (one mini-batch: forward, backward, optimizer) it times ``--timed-steps`` steps
(median; model FLOPs counted as bench_trainer.py does: 3x the forward's matmuls, attention
included as if unmasked), then profiles ``--steps`` more and lists the top operators by
self device time (self CPU time on a CPU) and the share of each kind of work: matmuls, the
unfused attention's softmax and mask, casts and copies, other elementwise work, the
optimizer, NCCL.

Accepts and ignores bench_trainer.py's other flags (--k, --repeats, ...), so gpu_check.sh
passes both scripts the same geometry. Its step figures stand even where bench_trainer.py
fails.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

PEAK_TFLOPS = 989.0  # H200 SXM dense bf16, as bench_trainer.py's default --peak-tflops

# Kinds of work, matched on operator names in this order; the rest is "other".
KINDS = (
    ("matmul", re.compile(r"aten::(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_mm)\b")),
    ("softmax_mask", re.compile(r"aten::(_softmax|_softmax_backward_data|softmax|masked_fill_?|_masked_softmax)\b")),
    ("cast_copy", re.compile(r"aten::(copy_|_to_copy|to|contiguous|clone|cat|stack)\b")),
    ("optimizer", re.compile(r"aten::_foreach_|Optimizer|_fused_adam", re.I)),
    ("nccl", re.compile(r"nccl|c10d::", re.I)),
    ("elementwise", re.compile(r"aten::")),
)


def _recipe(data: Path, run: Path, a: argparse.Namespace, gpu: bool) -> dict:
    """bench_trainer.py's recipe for the same flags (see the module docstring)."""
    return {
        "model": {
            "family": "llama", "num_layers": a.layers, "hidden_size": a.hidden,
            "ffn_hidden_size": a.ffn or (a.hidden * 8 // 3 // 64 * 64 or 64),
            "num_attention_heads": a.heads or max(4, a.hidden // 64),
            "num_query_groups": a.kv_groups or max(2, a.hidden // 256), "vocab_size": a.vocab,
            "max_position_embeddings": a.seq,
            "params_dtype": "bf16" if gpu else "fp32", "transformer_impl": a.impl if gpu else "local",
        },
        "training": {
            "seq_length": a.seq, "global_batch_size": a.mini, "mini_batch_size": a.mini,
            "micro_batch_size": a.micro, "train_steps": 1000, "seed": 1,  # a long, flat lr schedule
        },
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5},
        "loss": {"name": "sft"},
        "data": {
            "train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": a.seq}],
            "tokenizer": str(data / "tokenizer"), "chat_template": "plain", "cache_dir": str(data / "cache"),
        },
        "checkpoint": {"allow_random_init": True, "save_at_end": False},
        "logging": {"run_dir": str(run), "tensorboard": False},
    }


def flops_per_token(m: dict, seq: int, padded_vocab: int) -> float:
    """Training FLOPs per token (3x forward) of the Llama-style decoder, as bench_trainer.py counts
    them: q/k/v/o and SwiGLU matmuls, attention scores and values over the full sequence, output layer."""
    h, L, f = m["hidden_size"], m["num_layers"], m["ffn_hidden_size"]
    kv = h * m["num_query_groups"] // m["num_attention_heads"]
    per_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * 3 * h * f + 2 * 2 * seq * h
    return 3 * (L * per_layer + 2 * h * padded_vocab)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def _self_time_us(evt, cuda: bool) -> float:
    if cuda:
        return float(getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0))
    return float(evt.self_cpu_time_total)


def summarize(events: list, cuda: bool, steps: int, top: int) -> dict:
    """Top operators and per-kind shares from profiler ``key_averages()`` rows (operators only:
    a kernel's time counts once, on the operator that launched it)."""
    rows = [e for e in events if not cuda or str(getattr(e, "device_type", "")).endswith("CPU")]
    total = sum(_self_time_us(e, cuda) for e in rows) or 1.0
    ranked = sorted(rows, key=lambda e: _self_time_us(e, cuda), reverse=True)
    kinds: dict[str, float] = {}
    for e in rows:
        kinds[kind_of(e.key)] = kinds.get(kind_of(e.key), 0.0) + _self_time_us(e, cuda) / total
    return {
        "measure": "self device time" if cuda else "self CPU time",
        "busy_s_per_step": total / 1e6 / steps,
        "categories": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [{"op": e.key, "kind": kind_of(e.key), "ms_per_step": _self_time_us(e, cuda) / 1e3 / steps,
                 "calls_per_step": e.count / steps, "share": _self_time_us(e, cuda) / total} for e in ranked[:top]],
    }


def profile_steps(recipe_dict: dict, timed: int, steps: int, top: int) -> dict:
    """Runs inside one rank: build as a run does, warm up, time ``timed`` steps, profile ``steps`` more."""
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    from psft_megatron.loss.objectives import ObjectiveConfig
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import build_trainer
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from psft_megatron.training.step import train_step

    env = init_distributed()
    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    init_model_parallel(recipe.parallel)
    set_seed(1)
    trainer = build_trainer(recipe, env)  # the run's own data, model, optimizer and pass set-up
    data, bundle, setup = trainer.data, trainer.bundle, trainer.setup
    cuda = env.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sft = ObjectiveConfig(name="sft")
    minis = [next(data.loader).mini_batches[0] for _ in range(1 + timed + steps)]
    train_step(bundle, minis[0], sft, setup, None)  # warm-up: allocator, cuBLAS handles, NCCL
    sync()
    times = []
    for mini in minis[1 : 1 + timed]:
        t0 = time.perf_counter()
        train_step(bundle, mini, sft, setup, None)
        sync()
        times.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for mini in minis[1 + timed :]:
            train_step(bundle, mini, sft, setup, None)
        sync()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    try:
        table = events.table(sort_by=sort, row_limit=top)
    except (AttributeError, KeyError):
        table = events.table(sort_by="self_device_time_total" if cuda else sort, row_limit=top)
    out = summarize(list(events), cuda, steps, top)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    params = sum(p.numel() for chunk in bundle.model for p in chunk.parameters())
    shapes = {n: p.shape for chunk in bundle.model for n, p in chunk.named_parameters()}
    heads = [s[0] for n, s in shapes.items() if n.endswith(("output_layer.weight", "word_embeddings.weight"))]
    padded_vocab = heads[0]  # the output layer's rows (the tied embedding's where shared), padding included
    return out | {"table": table, "step_s": statistics.median(times) if times else None,
                  "profiled_step_s": wall / steps, "steps": steps, "timed_steps": timed, "device": str(env.device),
                  "params": params, "padded_vocab": padded_vocab, "impl": setup.backend, "peak_gib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mini", type=int, default=4, help="sequences per training step")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--ffn", type=int, default=None, help="default: bench_trainer.py's rule")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-groups", type=int, default=None)
    p.add_argument("--vocab", type=int, default=384)
    p.add_argument("--impl", choices=["local", "auto", "transformer_engine"], default="local")
    p.add_argument("--timed-steps", type=int, default=3, help="timed training steps (median)")
    p.add_argument("--steps", type=int, default=1, help="profiled training steps")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS)
    p.add_argument("--top", type=int, default=25, help="operators listed")
    p.add_argument("--table", type=Path, default=None, help="also write the printed table here")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args, ignored = p.parse_known_args()
    if ignored:
        print(f"gpu_profile_step: ignoring {' '.join(ignored)} (bench_trainer.py flags with no effect here)")

    import torch

    from psft_megatron.data.synthetic import write_tiny_dataset
    from psft_megatron.testing.multiproc import run_in_processes

    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="gpu_profile_") as d:
        tmp = Path(d)
        write_tiny_dataset(tmp / "data", train=4000, eval=16)
        recipe = _recipe(tmp / "data", tmp / "run", args, gpu)
        # init_process_group=False: the rank's init_distributed picks NCCL on a GPU (gloo on CPU).
        res = run_in_processes(profile_steps, 1, init_process_group=False, timeout=1800, kwargs={
            "recipe_dict": recipe, "timed": args.timed_steps, "steps": args.steps, "top": args.top})[0]
    table = res.pop("table")
    if res["step_s"]:
        tokens = args.mini * args.seq
        res["tokens_per_s"] = tokens / res["step_s"]
        res["tflops"] = flops_per_token(recipe["model"], args.seq, res["padded_vocab"]) * tokens / res["step_s"] / 1e12
        res["mfu"] = res["tflops"] / args.peak_tflops if gpu else None
    head = (f"{res['device']}: {res['params'] / 1e6:.0f}M params, impl={res['impl']}, seq={args.seq}, "
            f"{args.mini} sequences per step in micro-batches of {args.micro}"
            + (f", peak {res['peak_gib']:.1f} GiB" if res["peak_gib"] is not None else ""))
    timed = (f"step (median of {args.timed_steps}): {res['step_s']:.3f} s, {res['tokens_per_s']:.0f} tok/s, "
             f"{res['tflops']:.1f} model TFLOP/s" + (f", MFU {res['mfu']:.1%} of {args.peak_tflops:.0f}" if res["mfu"] else "")
             if res["step_s"] else "no timed steps")
    prof = (f"profiled: {res['profiled_step_s']:.3f} s/step wall, {res['busy_s_per_step']:.3f} s/step {res['measure']}; "
            "time by kind: " + ", ".join(f"{k} {v:.1%}" for k, v in res["categories"].items()))
    print(head, timed, prof, table, sep="\n")
    if args.table:
        args.table.write_text("\n".join([head, timed, prof, table]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
