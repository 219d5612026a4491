"""Forward+backward of the PSFT loss with entropy on [T x V] logits, three ways, side by side.

    python benchmarks/bench_loss.py            # T=4096, V in {32000, 128256}, TP in {1, 2}
    python benchmarks/bench_loss.py --quick    # small sizes, seconds

Methods (all produce the gradient w.r.t. this rank's logits shard):
  ours         psft_megatron.loss: vocab-parallel logp + entropy (chunked fp32), PSFT, global-token
               normalisation, statistics (entropy, ratio, clip fraction)
  ours_inplace the same with inplace=True (backward writes the gradient into the logits' storage)
  naive        all-gather the vocabulary, log_softmax in fp32, gather the label, entropy from the
               full log-probs, PSFT + statistics (gradient = own slice, as megatron's gather does)
  mcore_ce     megatron-core tensor_parallel.vocab_parallel_cross_entropy alone (fwd+bwd of sum)
  mcore_full   a separate no-grad vocab-parallel entropy pass, then mcore_ce's logp, PSFT + statistics

Each configuration runs in fresh processes (TP ranks via run_in_processes on gloo; one
OpenMP thread per process), methods interleaved round-robin per repetition; time is the
median of the timed repetitions. Logits are refreshed from a copy before every repetition
(outside the timed region) because megatron's cross entropy overwrites fp32 logits.

Peak memory "above the logits" = peak during fwd+bwd minus what was allocated just before
(the logits, labels, etc.), including the returned logits gradient:
  * CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats;
  * CPU: the kernel's peak resident set (VmHWM) after resetting it through
    /proc/self/clear_refs, minus VmRSS before. The children run with
    MALLOC_MMAP_THRESHOLD_=65536 so glibc serves every large buffer from mmap and returns it
    to the OS on free: resident memory then tracks live tensors (plus ~MBs of noise), and
    the peak includes temporaries inside aten ops that no Python-level hook sees.
Reported as multiples of one fp32 logits shard (T x V/TP x 4 bytes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from psft_megatron.testing.multiproc import run_in_processes

METHODS = ("ours", "ours_inplace", "naive", "mcore_ce", "mcore_full")
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ----------------------------------------------------------------------------- memory probes


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


class PeakMeter:
    """Peak bytes allocated above the level at ``start()`` (CUDA allocator or process RSS)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _proc_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_kib("VmHWM") * 1024 - self.base


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024


# ----------------------------------------------------------------------------- the methods


class _GatherVocab(torch.autograd.Function):
    """Naive all-gather along the vocabulary; backward keeps this rank's slice (as megatron's
    gather_from_tensor_model_parallel_region, which itself needs CUDA)."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        ctx.rank, ctx.v = rank, x.shape[-1]
        if world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.rank * ctx.v : (ctx.rank + 1) * ctx.v], None, None, None


@torch.no_grad()
def _entropy_pass(logits: torch.Tensor, group) -> torch.Tensor:
    """Vocab-parallel entropy in plain torch (no grad), as one would add next to megatron's CE."""
    z = logits.float()
    m = z.amax(-1)
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    w = z - m.unsqueeze(-1)
    e = w.exp()
    s = torch.stack([e.sum(-1), (e * w).sum(-1)])
    dist.all_reduce(s, group=group)
    return s[0].log() - s[1] / s[0]


def _psft_rest(logp, entropy, mask, lp_old, count, cfg):
    from psft_megatron.loss import LossStats, normalized_loss, token_losses

    tl = token_losses(cfg, logp, mask, lp_old)
    loss = normalized_loss(tl.loss, mask, count)
    stats = LossStats.from_tokens(tl, logp.detach(), entropy, mask)
    return loss, stats


def _run_method(name, logits, labels, mask, lp_old, count, cfg, group, rank, world, chunk):
    from megatron.core import tensor_parallel

    from psft_megatron.loss import micro_batch_loss

    if name in ("ours", "ours_inplace"):
        out = micro_batch_loss(
            logits, labels, mask, count, cfg, lp_old, tp_group=group, chunk_size=chunk, inplace=name == "ours_inplace"
        )
        loss, stats = out.loss, out.stats
    elif name == "naive":
        full = _GatherVocab.apply(logits, group, rank, world)
        logq = torch.log_softmax(full.float(), dim=-1)
        logp = logq.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(logq.exp() * logq).sum(-1)
        loss, stats = _psft_rest(logp, entropy, mask, lp_old, count, cfg)
    elif name == "mcore_ce":
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.clamp(min=0)).sum()
        stats = None
    elif name == "mcore_full":
        entropy = _entropy_pass(logits, group)  # before the CE: it overwrites fp32 logits
        logp = -tensor_parallel.vocab_parallel_cross_entropy(logits, labels.clamp(min=0))
        loss, stats = _psft_rest(logp, entropy, mask, lp_old, count, cfg)
    else:
        raise ValueError(name)
    (grad,) = torch.autograd.grad(loss, logits)
    if stats is not None:
        stats.summary()  # the host sync a trainer does for logging
    return grad


def _worker(tp: int, tokens: int, vocab: int, dtype: str, reps: int, chunk: int | None, methods: list[str], device: str) -> dict:
    from megatron.core import parallel_state

    from psft_megatron.loss import ObjectiveConfig, global_token_count, snapshot_logp

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dev = torch.device(device)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    v_local = vocab // tp

    g = torch.Generator().manual_seed(1000 + rank)
    # The refresh copy is kept in bf16 to halve its footprint; values are then bf16-representable.
    base = (torch.randn(tokens, 1, v_local, generator=g) * 2.0).to(torch.bfloat16).to(dev)
    g0 = torch.Generator().manual_seed(7)  # labels/mask identical on all TP ranks
    labels = torch.randint(0, vocab, (tokens, 1), generator=g0).to(dev)
    mask = (torch.rand(tokens, 1, generator=g0) < 0.9).to(dev)
    labels[~mask] = -100
    logits = torch.empty(tokens, 1, v_local, dtype=dt, device=dev, requires_grad=True)
    with torch.no_grad():
        logits.copy_(base)
    lp_old = snapshot_logp(logits.detach(), labels, tp_group=group, chunk_size=chunk)
    lp_old = lp_old + (torch.rand(tokens, 1, generator=g0).to(dev) - 0.5) * 0.6  # some ratios clip
    count = global_token_count(mask, group=dist.new_group([dist.get_rank()]))  # DP = 1 here
    cfg = ObjectiveConfig(name="psft")

    meter = PeakMeter(dev)
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks: dict[str, list[int]] = {m: [] for m in methods}
    for rep in range(reps + 1):  # rep 0 is warm-up
        for name in methods:
            with torch.no_grad():
                logits.copy_(base)
            dist.barrier(group=group)
            meter.start()
            t0 = time.perf_counter()
            grad = _run_method(name, logits, labels, mask, lp_old, count, cfg, group, rank, world, chunk)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt_s = time.perf_counter() - t0
            peak = meter.stop()
            del grad
            if rep > 0:
                times[name].append(dt_s)
                peaks[name].append(peak)
    shard_bytes = tokens * v_local * 4
    return {
        m: {"time_s": statistics.median(times[m]), "peak_bytes": max(peaks[m]), "shard_fp32_bytes": shard_bytes}
        for m in methods
    }


# ----------------------------------------------------------------------------- driver


def _naive_fits(tokens: int, vocab: int, tp: int) -> tuple[bool, float]:
    # naive peaks at ~3 full-vocab fp32 buffers per rank, +1 for the gathered copy at TP > 1
    # (measured with --quick), plus the logits shard and its bf16 refresh copy per rank.
    full = tokens * vocab * 4
    need = tp * (3 + (tp > 1)) * full + 1.5 * full
    return need < 0.6 * mem_available_bytes(), need / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T=512, V in {4096, 16384}, 2 repetitions")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: auto, 128 MiB fp32)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.vocab, args.reps = 512, [4096, 16384], 2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device={device} dtype={args.dtype} T={args.tokens} reps={args.reps} (median) "
          f"chunk={args.chunk_size or 'auto'} torch={torch.__version__} cpus={os.cpu_count()}")
    results = []
    for vocab in args.vocab:
        for tp in args.tp:
            if device == "cuda" and tp > 1:
                print(f"V={vocab} TP={tp}: skipped (one process per GPU; run TP>1 on a multi-GPU launcher)")
                continue
            methods = list(args.methods)
            if "naive" in methods and device == "cpu":
                fits, need = _naive_fits(args.tokens, vocab, tp)
                if not fits:
                    print(f"V={vocab} TP={tp}: naive skipped: needs ~{need:.1f} GiB, "
                          f"{mem_available_bytes() / 2**30:.1f} GiB available")
                    methods.remove("naive")
            kwargs = dict(tp=tp, tokens=args.tokens, vocab=vocab, dtype=args.dtype, reps=args.reps,
                          chunk=args.chunk_size, methods=methods, device=device)
            per_rank = run_in_processes(_worker, tp, timeout=3600, kwargs=kwargs, env=MMAP_ENV)
            res = per_rank[0]  # rank 0's view; ranks run in lockstep
            ref_t = res["mcore_ce"]["time_s"] if "mcore_ce" in res else None
            shard = res[methods[0]]["shard_fp32_bytes"]
            print(f"\nV={vocab} TP={tp}  logits shard {args.tokens}x{vocab // tp} {args.dtype}; "
                  f"one fp32 shard = {shard / 2**20:.0f} MiB")
            print(f"  {'method':<13} {'time s':>8} {'x mcore_ce':>10} {'peak MiB':>9} {'x fp32 shard':>12}")
            for m in methods:
                r = res[m]
                ratio = f"{r['time_s'] / ref_t:10.2f}" if ref_t else f"{'-':>10}"
                print(f"  {m:<13} {r['time_s']:8.3f} {ratio} {r['peak_bytes'] / 2**20:9.0f} "
                      f"{r['peak_bytes'] / shard:12.2f}")
            results.append({"vocab": vocab, "tp": tp, "tokens": args.tokens, "dtype": args.dtype, "results": res})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
