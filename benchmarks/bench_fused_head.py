"""Output layer + PSFT loss, forward+backward: fused (no logits) against unfused, side by side.

    python benchmarks/bench_fused_head.py            # V in {128256, 151936}, h=256, T=4096, fp32
    python benchmarks/bench_fused_head.py --quick    # small sizes, seconds

Methods, same weights, hidden states, labels, snapshot log-probs (some ratios clip):
  unfused  megatron-core's output layer (tensor_parallel.ColumnParallelLinear, TP = 1,
           gather_output=False) -> logits [T, 1, V] -> psft_megatron.loss.micro_batch_loss with
           inplace=True (PSFT, entropy, global-token normalisation, statistics)
  fused    psft_megatron.loss.micro_batch_loss(hidden, ..., head=OutputHead(layer.weight)), as the
           trainer calls it: psft_megatron.loss.fused_head_loss, token chunks of logits only (auto
           chunk size), the loss's gradient formed in the forward pass (three matmuls)
  recompute  (--with-recompute) psft_megatron.loss.fused_token_stats (differentiable logp and
           entropy, backward recomputes each chunk's logits: four matmuls) + the same objective
All run forward, then backward to the hidden states and the weight.

Weight-gradient modes (--grad-mode):
  plain     plain autograd: the weight's gradient lands in ``weight.grad`` (counted in the peak)
  main_grad as under megatron's DDP: the weight has an fp32 ``main_grad`` buffer (allocated
            before the measurement, like DDP's grad buffer) and DDP's hook (add param.grad to
            main_grad, drop param.grad). unfused returns a weight-sized gradient that the hook
            adds; fused (given the trainer's grad_scale, here 1) accumulates into main_grad directly
            during the forward pass and returns megatron's dummy
            (``torch.empty``, never written: no resident memory on CPU; on a GPU the caching
            allocator would count it, as it does for megatron's own fused wgrad path).

Peak memory above the hidden states = peak during forward+backward minus the level just before
it (hidden states, weight, main_grad, labels allocated), including the returned gradients.
CPU: the kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus VmRSS
before, in a child process run with MALLOC_MMAP_THRESHOLD_=65536 so every large buffer is an
mmap returned to the OS on free (resident memory tracks live tensors, temporaries inside aten
ops included). CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats.
Time: median of --reps timed repetitions after one warm-up, methods interleaved round-robin;
wall-clock and, on CPU, the process's CPU time (time.process_time: with one OpenMP thread the
compute itself, much less disturbed than wall time by other jobs on a shared machine). The
ratio is taken from CPU time on CPU, from wall time on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from psft_megatron.testing.multiproc import run_in_processes

from bench_loss import MMAP_ENV, PeakMeter  # (the same memory probe as the loss benchmark)

METHODS = ("unfused", "fused")
RECOMPUTE = "recompute"


def _ddp_like(weight: torch.nn.Parameter) -> None:
    """Give ``weight`` what megatron's DDP gives a parameter: an fp32 main_grad and its hook."""
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    weight.grad_added_to_main_grad = False

    def hook(p: torch.nn.Parameter) -> None:  # megatron DDP's _make_backward_post_hook, minus bucketing
        if p.grad is not None and not p.grad_added_to_main_grad:
            p.main_grad.add_(p.grad)
        p.grad = None

    weight.register_post_accumulate_grad_hook(hook)


def _worker(tokens: int, hidden: int, vocab: int, dtype: str, reps: int, grad_mode: str, chunk: int | None,
            with_recompute: bool = False) -> dict:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer import TransformerConfig

    from psft_megatron.loss import (
        ObjectiveConfig,
        OutputHead,
        fused_token_stats,
        micro_batch_loss,
        normalized_loss,
        snapshot_logp,
        token_losses,
    )
    from psft_megatron.loss.fused_head import fused_chunk_size
    from psft_megatron.runtime import cpu_compat

    cpu_compat.apply()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    config = TransformerConfig(
        num_layers=1, hidden_size=hidden, num_attention_heads=1, params_dtype=dt,
        # CPU initialisation everywhere: megatron's GPU init needs its CUDA RNG tracker seeded, and
        # the weights are overwritten below anyway.
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
    )  # fmt: skip
    layer = tensor_parallel.ColumnParallelLinear(
        hidden, vocab, config=config, init_method=torch.nn.init.zeros_, bias=False, gather_output=False
    ).to(dev)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if dev.type == "cuda":  # a V x 4096 weight drawn on the GPU: seconds less of the stage's budget
            w = torch.randn(vocab, hidden, generator=torch.Generator(dev).manual_seed(0), device=dev)
        else:
            w = torch.randn(vocab, hidden, generator=g)
        layer.weight.copy_(w * hidden**-0.5)
        del w
    x = (torch.randn(tokens, 1, hidden, generator=g)).to(dt).to(dev).requires_grad_()
    labels = torch.randint(0, vocab, (tokens, 1), generator=g).to(dev)
    mask = (torch.rand(tokens, 1, generator=g) < 0.9).to(dev)
    labels[~mask] = -100
    count = mask.sum()
    cfg = ObjectiveConfig(name="psft")
    head = OutputHead(weight=layer.weight)
    with torch.no_grad():
        lp_old = snapshot_logp(x, labels, head=head)
    lp_old = lp_old + (torch.rand(tokens, 1, generator=g).to(dev) - 0.5) * 0.6
    if grad_mode == "main_grad":
        _ddp_like(layer.weight)

    def run(name: str) -> float:
        if name == "unfused":
            logits, _ = layer(x)
            out = micro_batch_loss(logits, labels, mask, count, cfg, lp_old, inplace=True)
            del logits  # the graph keeps what backward needs, as in a trainer's loss_func
        elif name == "fused":  # the trainer's grad_scale: the gradient backward sends in (1 here)
            out = micro_batch_loss(x, labels, mask, count, cfg, lp_old, head=head, chunk_size=chunk,
                                   grad_scale=1.0 if grad_mode == "main_grad" else None)  # fmt: skip
        else:  # differentiable logp / entropy through the recomputing head, then the same objective
            ts = fused_token_stats(x, layer.weight, labels, chunk_size=chunk)
            loss = normalized_loss(token_losses(cfg, ts.logp, mask, lp_old).loss, mask, count)
            loss.backward()
            return float(loss)
        out.loss.backward()
        out.stats.summary()  # the host sync a trainer does for logging
        return float(out.loss)

    methods = METHODS + ((RECOMPUTE,) if with_recompute else ())
    meter = PeakMeter(dev)
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu_times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[int]] = {m: [] for m in methods}
    losses: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}
    for rep in range(reps + 1):  # rep 0 is the warm-up
        for name in methods:
            x.grad = None
            layer.weight.grad = None
            if grad_mode == "main_grad":
                layer.weight.main_grad.zero_()
                layer.weight.grad_added_to_main_grad = False
            meter.start()
            t0, c0 = time.perf_counter(), time.process_time()
            losses[name] = run(name)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = meter.stop()
            if rep == 0:  # keep one copy of each method's gradients for the agreement check
                w_grad = layer.weight.main_grad if grad_mode == "main_grad" else layer.weight.grad
                grads[name] = torch.cat([x.grad.flatten(), w_grad.flatten()]).float().clone()
            if rep > 0:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
                peaks[name].append(peak)
    diff = max(float((grads[m] - grads["unfused"]).abs().max() / grads["unfused"].abs().max()) for m in methods[1:])
    return {
        "results": {
            m: {
                "time_s": statistics.median(times[m]),
                "cpu_s": statistics.median(cpu_times[m]),
                "peak_bytes": max(peaks[m]),
            }
            for m in methods
        },
        "loss_diff": max(abs(losses[m] - losses["unfused"]) for m in methods[1:]),
        "grad_rel_diff": diff,
        "logits_fp32_bytes": tokens * vocab * 4,
        "weight_bytes": vocab * hidden * torch.finfo(dt).bits // 8,
        "threads": torch.get_num_threads(),
        "fused_chunk_tokens": chunk or fused_chunk_size(vocab, dev),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T=256, h=64, V=16384, 1 repetition")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--grad-mode", nargs="+", choices=["plain", "main_grad"], default=["plain", "main_grad"])
    ap.add_argument("--chunk-size", type=int, default=None, help="fused: tokens per chunk (default: auto)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of the child process")
    ap.add_argument("--with-recompute", action="store_true",
                    help="also time the recomputing fused head (fused_token_stats + the objective)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.reps = 256, 64, [16384], 1

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} dtype={args.dtype} T={args.tokens} h={args.hidden} reps={args.reps} (median) "
          f"threads={args.threads} torch={torch.__version__} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    rows = []
    env = dict(MMAP_ENV, OMP_NUM_THREADS=str(args.threads))
    for vocab in args.vocab:
        for mode in args.grad_mode:
            kwargs = dict(tokens=args.tokens, hidden=args.hidden, vocab=vocab, dtype=args.dtype, reps=args.reps,
                          grad_mode=mode, chunk=args.chunk_size, with_recompute=args.with_recompute)
            r = run_in_processes(_worker, 1, timeout=7200, kwargs=kwargs, env=env)[0]
            u, f = r["results"]["unfused"], r["results"]["fused"]
            mem_ratio = u["peak_bytes"] / max(f["peak_bytes"], 1)
            key = "cpu_s" if device == "cpu" else "time_s"
            time_ratio = f[key] / u[key]
            print(f"\nV={vocab} grad={mode}: logits {args.tokens}x{vocab} fp32 = "
                  f"{r['logits_fp32_bytes'] / 2**20:.0f} MiB, weight {r['weight_bytes'] / 2**20:.0f} MiB, "
                  f"fused chunk {r['fused_chunk_tokens']} tokens; "
                  f"fused vs unfused: loss diff {r['loss_diff']:.1e}, "
                  f"max grad diff {r['grad_rel_diff']:.1e} of the largest")
            print(f"  {'method':<9} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
            for m, res in r["results"].items():
                print(f"  {m:<9} {res['time_s']:8.2f} {res['cpu_s']:8.2f} {res['peak_bytes'] / 2**20:9.0f}")
            print(f"  peak memory unfused/fused = {mem_ratio:.1f}x (target >= 4); "
                  f"{key[:-2]} time fused/unfused = {time_ratio:.2f}x (target <= 1.15)")
            if RECOMPUTE in r["results"]:
                rc = r["results"][RECOMPUTE]
                print(f"  recompute: peak unfused/recompute = {u['peak_bytes'] / max(rc['peak_bytes'], 1):.1f}x, "
                      f"{key[:-2]} time recompute/unfused = {rc[key] / u[key]:.2f}x")
            rows.append(dict(vocab=vocab, grad_mode=mode, tokens=args.tokens, hidden=args.hidden, dtype=args.dtype,
                             mem_ratio=mem_ratio, time_ratio=time_ratio, **r))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
