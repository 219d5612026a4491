#!/usr/bin/env python
"""Seconds per global batch of PSFT against SFT, beside the floor the snapshot pass implies.

    python benchmarks/bench_trainer.py [--nproc 1] [--tp 1] [--hidden 256] [--layers 4] [--repeats 3]

Same model, same data, same layout, measured side by side in one run (interleaved
repeats, medians). With k mini-batches per global batch, PSFT adds one forward-only
pass over mini-batches 2..k (mini-batch 1 reuses its own log-probs), so

    floor = 1 + (k - 1) / k * (forward-only time / training-step time)   per mini-batch.

Also prints tokens/s. On a GPU (CUDA present) it runs in bf16 and reports model
TFLOP/s and MFU against --peak-tflops (default: H100 SXM dense bf16, 989).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _recipe(data: Path, run: Path, args: argparse.Namespace, gpu: bool) -> dict:
    return {
        "model": {
            "family": "llama", "num_layers": args.layers, "hidden_size": args.hidden,
            "ffn_hidden_size": args.ffn or (args.hidden * 8 // 3 // 64 * 64 or 64),
            "num_attention_heads": args.heads or max(4, args.hidden // 64),
            "num_query_groups": args.kv_groups or max(2, args.hidden // 256),
            # The data's tokenizer has 384 tokens; a larger vocabulary adds realistic embedding/output rows.
            "vocab_size": max(384, args.vocab), "max_position_embeddings": args.seq,
            "params_dtype": "bf16" if gpu else "fp32", "transformer_impl": args.impl or ("auto" if gpu else "local"),
        },
        "parallel": {"tensor_model_parallel_size": args.tp},
        "training": {
            "seq_length": args.seq, "global_batch_size": args.k * args.mini, "mini_batch_size": args.mini,
            "micro_batch_size": args.micro, "train_steps": args.k * 1000, "seed": 1,  # a long, flat lr schedule
        },
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5},
        # sft_kl makes the run build the frozen reference model, so its cost is measured too.
        "loss": {"name": "sft_kl" if args.with_kl else "psft"},
        "data": {
            "train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": args.seq}],
            "tokenizer": str(data / "tokenizer"), "chat_template": "plain", "cache_dir": str(data / "cache"),
        },
        "checkpoint": {"allow_random_init": True, "save_at_end": False},
        "logging": {"run_dir": str(run), "tensorboard": False},
    }


def _flops_per_token(m: dict, seq: int) -> float:
    """Training FLOPs per token (fwd+bwd = 3x forward) of a Llama-style decoder (padded vocabulary)."""
    h, L, f = m["hidden_size"], m["num_layers"], m["ffn_hidden_size"]
    divisible_by = m.get("make_vocab_size_divisible_by", 128)  # ModelConfig's padding rule and default
    v = -(-m["vocab_size"] // divisible_by) * divisible_by
    heads, groups = m["num_attention_heads"], m["num_query_groups"]
    kv = h * groups // heads
    per_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * 3 * h * f + 2 * 2 * seq * h  # qkvo, swiglu, attention
    return 3 * (L * per_layer + 2 * h * v)


def measure(recipe_dict: dict, repeats: int) -> dict:
    """Runs inside each rank: alternates SFT and PSFT (and, with a reference model, SFT-KL)
    global batches, times each pass."""
    import copy

    import torch

    from psft_megatron.loss.objectives import ObjectiveConfig
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import build_trainer
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from psft_megatron.training.step import snapshot, train_global_batch, train_step

    env = init_distributed()
    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    init_model_parallel(recipe.parallel)
    set_seed(1)
    trainer = build_trainer(recipe, env)  # the run's own data, model, optimizer and pass set-up
    data, bundle, setup = trainer.data, trainer.bundle, trainer.setup
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    k = recipe.training.mini_batches_per_global_batch
    sft, psft = ObjectiveConfig(name="sft"), ObjectiveConfig(name="psft")
    sft_kl = ObjectiveConfig(name="sft_kl") if trainer.reference is not None else None

    def global_batch(objective: ObjectiveConfig) -> float:
        gb = next(data.loader)
        sync()
        t0 = time.perf_counter()
        for _ in train_global_batch(bundle, gb, objective, setup, trainer.reference):
            pass
        sync()
        return time.perf_counter() - t0

    def forward_share() -> tuple[float, float]:
        mini = next(data.loader).mini_batches[0]
        sync()
        t0 = time.perf_counter()
        snapshot(bundle.model, mini.micro_batches, setup)
        sync()
        t1 = time.perf_counter()
        train_step(bundle, mini, sft, setup, None)
        sync()
        return t1 - t0, time.perf_counter() - t1

    global_batch(sft), global_batch(psft)  # warm-up
    times: dict[str, list[float]] = {"sft": [], "psft": [], "fwd": [], "step": []}
    if sft_kl is not None:
        times["sft_kl"] = []
        global_batch(sft_kl)
    for _ in range(repeats):
        times["sft"].append(global_batch(sft))
        times["psft"].append(global_batch(psft))
        if sft_kl is not None:
            times["sft_kl"].append(global_batch(sft_kl))
        f, s = forward_share()
        times["fwd"].append(f)
        times["step"].append(s)
    ref_bytes = sum(p.numel() * p.element_size() for c in trainer.reference or [] for p in c.parameters())
    return {name: statistics.median(v) for name, v in times.items()} | {"k": k, "device": str(env.device),
                                                                       "reference_bytes": ref_bytes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--k", type=int, default=8, help="mini-batches per global batch")
    p.add_argument("--mini", type=int, default=4, help="mini-batch size (sequences)")
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ffn", type=int, default=0, help="FFN size (default: 8/3 x hidden, rounded to 64)")
    p.add_argument("--heads", type=int, default=0, help="attention heads (default: hidden / 64)")
    p.add_argument("--kv-groups", type=int, default=0, help="key/value heads (default: hidden / 256)")
    p.add_argument("--vocab", type=int, default=384, help="vocabulary rows (>= the data's 384 tokens)")
    p.add_argument("--impl", choices=["auto", "local", "transformer_engine"], default=None,
                   help="layer spec (default: auto on GPU, local on CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--with-kl", action="store_true", help="also time SFT-KL (builds the frozen reference model)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-GPU dense bf16 peak for MFU")
    args = p.parse_args()

    import torch

    from psft_megatron.data.synthetic import write_tiny_dataset
    from psft_megatron.testing.multiproc import run_in_processes

    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp_name:
        tmp = Path(tmp_name)
        write_tiny_dataset(tmp / "data", train=4000, eval=16)
        recipe = _recipe(tmp / "data", tmp / "run", args, gpu)
        env = {"PSFT_DIST_BACKEND": "nccl"} if gpu else {}
        # On a GPU the ranks set up NCCL themselves (init_distributed); a gloo default group
        # would make megatron's gradient all-reduce of CUDA tensors fail.
        res = run_in_processes(measure, args.nproc, kwargs={"recipe_dict": recipe, "repeats": args.repeats},
                               timeout=1800, env=env, init_process_group=not gpu)[-1]
    k = res["k"]
    share = res["fwd"] / res["step"]
    floor = 1 + (k - 1) / k * share
    tokens = k * args.mini * args.seq
    print(f"device {res['device']} x{args.nproc}, TP={args.tp}, layers={args.layers} hidden={args.hidden} "
          f"seq={args.seq}, k={k} mini-batches of {args.mini} sequences")
    print(f"SFT  {res['sft']:.3f} s/global batch  {tokens / res['sft']:.0f} tok/s")
    print(f"PSFT {res['psft']:.3f} s/global batch  {tokens / res['psft']:.0f} tok/s")
    if "sft_kl" in res:
        print(f"SFT-KL {res['sft_kl']:.3f} s/global batch  {tokens / res['sft_kl']:.0f} tok/s  "
              f"SFT-KL/SFT {res['sft_kl'] / res['sft']:.3f} (floor {1 + share:.3f}: one reference forward per "
              f"mini-batch); reference weights {res['reference_bytes'] / 2**20:.1f} MiB per rank")
    print(f"PSFT/SFT {res['psft'] / res['sft']:.3f}   floor {floor:.3f}  "
          f"(forward-only {res['fwd']:.3f} s / training step {res['step']:.3f} s = {share:.3f} per mini-batch)")
    # The keys benchmarks/gpu_check_report.py reads (parse_trainer_output's).
    figures = {"geometry": {"device": res["device"], "nproc": args.nproc, "tp": args.tp, "layers": args.layers,
                            "hidden": args.hidden, "seq": args.seq, "k": k, "mini": args.mini},
               "sft_s": res["sft"], "psft_s": res["psft"], "sft_tokens_per_s": tokens / res["sft"],
               "psft_tokens_per_s": tokens / res["psft"], "psft_over_sft": res["psft"] / res["sft"], "floor": floor,
               "forward_only_s": res["fwd"], "train_step_s": res["step"], "forward_share": share}
    if gpu:
        fpt = _flops_per_token(recipe["model"], args.seq)
        for name in ("sft", "psft"):
            tflops = fpt * tokens / res[name] / 1e12 / args.nproc
            figures[f"{name}_tflops"] = tflops
            figures[f"{name}_mfu_printed"] = tflops / args.peak_tflops
            print(f"{name}: {tflops:.1f} model TFLOP/s per GPU, MFU {tflops / args.peak_tflops:.1%} (snapshot pass not counted)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
