#!/usr/bin/env python
"""LoRA-PSFT against full PSFT at a SmolLM2-135M-sized model: step time, memory, the snapshot pass.

    python benchmarks/bench_lora.py [--base CKPT] [--rank 16] [--seq 128] [--mini 2] [--k 4] [--repeats 2]

Both runs are built in one process from the same base checkpoint (``--base``, e.g. the converted
SmolLM2 at runs/psft_vs_sft/smollm2_megatron; default: a random model of SmolLM2-135M's shape, 30
layers, hidden 576, ffn 1536, 9 heads / 3 KV heads, vocabulary 49152, saved first) and measured
side by side, global batch by global batch, interleaved in alternating order (medians):

* seconds per PSFT global batch (the snapshot pass and k optimizer steps), and of the snapshot
  pass alone (one forward over mini-batches 2..k);
* the model state each run holds, counted from the live tensors: weights, gradient buffers
  (megatron DDP's fp32 main_grad) and optimizer state (Adam's moments, fp32 main copies);
* the peak memory of one optimizer step above what was held before it (activations and
  transients), from torch's profiler (every CPU allocation and free).

Prints the LoRA / full ratios. Figures and the machine they came from: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SMOLLM2 = {"family": "llama", "num_layers": 30, "hidden_size": 576, "ffn_hidden_size": 1536,
           "num_attention_heads": 9, "num_query_groups": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
           "rope_theta": 100000.0, "norm_epsilon": 1e-5, "tie_word_embeddings": True}


def _recipe(data: Path, run: Path, base: str, model: dict, args: argparse.Namespace, lora: bool) -> dict:
    m = dict(model, params_dtype="fp32", transformer_impl="local")
    if lora:
        m["lora"] = {"rank": args.rank, "alpha": 2 * args.rank}
    return {
        "model": m,
        "training": {"seq_length": args.seq, "global_batch_size": args.k * args.mini, "mini_batch_size": args.mini,
                     "micro_batch_size": args.micro, "train_steps": args.k * 1000, "seed": 1},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5},
        "loss": {"name": "psft"},
        "data": {"train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": args.seq}],
                 "tokenizer": str(data / "tokenizer"), "chat_template": "plain", "cache_dir": str(data / "cache")},
        "checkpoint": {"init_from": base, "save_at_end": False},
        "logging": {"run_dir": str(run), "tensorboard": False},
    }


def _save_random_base(model: dict, out: str) -> None:
    """A random model of ``model``'s shape as a full checkpoint (the LoRA run needs a base)."""
    from psft_megatron.checkpoint.model_checkpoint import save_model_checkpoint
    from psft_megatron.model.build import build_model
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.model.init import init_layout_independent
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_model_parallel, set_seed

    cfg = ModelConfig(**dict(model, params_dtype="fp32", transformer_impl="local"))
    init_model_parallel(ParallelConfig())
    set_seed(0)
    built = build_model(cfg, ParallelConfig())
    init_layout_independent(built.chunks, 0)
    save_model_checkpoint(built.chunks, out, {"model": cfg})


def _state_bytes(trainer) -> dict[str, int]:
    """Weights, gradient buffers and optimizer state the trainer holds (live tensors, bytes)."""
    params = [p for c in trainer.bundle.model for p in c.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params if hasattr(p, "main_grad"))
    opt = 0
    for o in getattr(trainer.bundle.optimizer, "chained_optimizers", [trainer.bundle.optimizer]):
        for state in o.optimizer.state.values():
            opt += sum(t.numel() * t.element_size() for t in state.values() if hasattr(t, "numel") and t.dim() > 0)
        for group in getattr(o, "fp32_from_float16_groups", []):  # bf16 weights' fp32 main copies
            opt += sum(p.numel() * p.element_size() for p in group)
    trained = sum(p.numel() for p in params if p.requires_grad)
    return {"weights": weights, "gradients": grads, "optimizer": opt, "trained_parameters": trained,
            "parameters": sum(p.numel() for p in params)}


def _step_peak(trainer, objective) -> float:
    """Peak bytes allocated above the start during one optimizer step (torch's profiler)."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from psft_megatron.training.step import prepare_global_batch, train_step

    mini = prepare_global_batch(next(trainer.data.loader), trainer.setup)[0]
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(trainer.bundle, mini, objective, trainer.setup, None)
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    sizes = [e["args"]["Bytes"] for e in sorted((e for e in events if e.get("name") == "[memory]"),
                                                 key=lambda e: e["ts"])]
    return float(np.cumsum(sizes).max()) if sizes else 0.0


def measure(recipes: dict[str, dict], repeats: int) -> dict:
    """Runs in the benchmark's one rank: builds both runs, then alternates their global batches."""
    import copy

    from psft_megatron.loss.objectives import ObjectiveConfig
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import build_trainer
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from psft_megatron.training.step import prepare_global_batch, snapshot, train_global_batch

    env = init_distributed()
    trainers = {}
    for name, r in recipes.items():
        recipe = recipe_from_dict(copy.deepcopy(r))
        init_model_parallel(recipe.parallel)
        set_seed(1)
        trainers[name] = build_trainer(recipe, env)
    psft = ObjectiveConfig(name="psft")

    def global_batch(t) -> float:
        gb = next(t.data.loader)
        t0 = time.perf_counter()
        for _ in train_global_batch(t.bundle, gb, psft, t.setup):
            pass
        return time.perf_counter() - t0

    def snapshot_pass(t) -> float:
        minis = prepare_global_batch(next(t.data.loader), t.setup)
        t0 = time.perf_counter()
        snapshot(t.bundle.model, [mb for mini in minis[1:] for mb in mini.micro_batches], t.setup)
        return time.perf_counter() - t0

    for t in trainers.values():  # warm-up (and Adam's state exists after it)
        global_batch(t)
    times: dict[str, dict[str, list[float]]] = {n: {"global_batch": [], "snapshot": []} for n in trainers}
    names = list(trainers)
    for i in range(repeats):  # alternate the order, so neither run always goes first
        for name in names if i % 2 == 0 else names[::-1]:
            times[name]["global_batch"].append(global_batch(trainers[name]))
            times[name]["snapshot"].append(snapshot_pass(trainers[name]))
    out = {}
    for name, t in trainers.items():
        out[name] = {k: statistics.median(v) for k, v in times[name].items()}
        out[name].update(_state_bytes(t), step_peak=_step_peak(t, psft))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="a full model checkpoint to start both runs from "
                   "(default: a random model of SmolLM2-135M's shape)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="mini-batches per global batch")
    p.add_argument("--mini", type=int, default=2, help="mini-batch size (sequences)")
    p.add_argument("--micro", type=int, default=1)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args()

    from psft_megatron.checkpoint.model_checkpoint import model_config_of, read_meta
    from psft_megatron.data.synthetic import write_tiny_dataset
    from psft_megatron.testing.multiproc import run_in_processes

    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp_name:
        tmp = Path(tmp_name)
        write_tiny_dataset(tmp / "data", train=2000, eval=16)
        base = args.base
        if base is None:
            base = str(tmp / "base")
            run_in_processes(_save_random_base, 1, kwargs={"model": SMOLLM2, "out": base}, timeout=900)
            model = SMOLLM2
        else:
            model = {k: v for k, v in model_config_of(read_meta(base)).to_dict().items()
                     if k not in ("params_dtype", "transformer_impl", "lora", "hf_config")}
        recipes = {name: _recipe(tmp / "data", tmp / name, str(Path(base).resolve()), model, args, name == "lora")
                   for name in ("full", "lora")}
        res = run_in_processes(measure, 1, kwargs={"recipes": recipes, "repeats": args.repeats}, timeout=3600)[0]
    full, lora = res["full"], res["lora"]
    mib = 2**20
    print(f"model: {full['parameters'] / 1e6:.1f}M parameters ({'random, SmolLM2-135M shape' if args.base is None else base}), "
          f"fp32, CPU, one process; seq {args.seq}, k={args.k} mini-batches of {args.mini} rows, micro {args.micro}; "
          f"LoRA rank {args.rank} on every projection: {lora['trained_parameters'] / 1e6:.2f}M trained")
    print(f"{'':28}{'full':>12}{'LoRA':>12}{'LoRA/full':>12}")
    rows = [("PSFT global batch (s)", "global_batch", 1), ("snapshot pass (s)", "snapshot", 1),
            ("weights (MiB)", "weights", mib), ("gradient buffers (MiB)", "gradients", mib),
            ("optimizer state (MiB)", "optimizer", mib), ("step peak above held (MiB)", "step_peak", mib)]
    for label, key, div in rows:
        a, b = full[key] / div, lora[key] / div
        print(f"{label:28}{a:12.3f}{b:12.3f}{(b / a if a else float('nan')):12.3f}")
    held = {n: r["weights"] + r["gradients"] + r["optimizer"] for n, r in res.items()}
    print(f"{'held + step peak (MiB)':28}{(held['full'] + full['step_peak']) / mib:12.1f}"
          f"{(held['lora'] + lora['step_peak']) / mib:12.1f}"
          f"{(held['lora'] + lora['step_peak']) / (held['full'] + full['step_peak']):12.3f}")
    for name, r in res.items():
        print(f"{name}: snapshot pass = {r['snapshot'] / r['global_batch']:.1%} of a PSFT global batch")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, **res}, indent=1, default=str))


if __name__ == "__main__":
    main()
