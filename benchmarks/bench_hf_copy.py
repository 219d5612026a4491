"""The HF copy at save (``checkpoint.save_hf``): what it costs a save, on SmolLM2-135M-Instruct.

    python benchmarks/bench_hf_copy.py [--repeats 3]

One Megatron checkpoint of SmolLM2-135M-Instruct (from ``../shared/models``, dequantised and
converted once into ``--work`` as in bench_conversion.py), then, interleaved in each repeat:

- foreground: ``psft-export-hf`` run to completion, as a blocking export inside a save would run
  (what the save would cost on the training ranks' critical path);
- background: what rank 0 spends in a save on the copy (:meth:`HfCopy.after_save`: prune, start
  the exporter) and the time until the copy is complete (:meth:`HfCopy.wait`), i.e. how long the
  training may run on before the next save would have to wait for it.

Prints the medians, their ratios and a JSON line; docs/benchmarks.md ("## HF copy at save")
records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from psft_megatron.checkpoint.hf_copy import HfCopy

from bench_conversion import prepare_smollm2


def foreground(ckpt: Path, out: Path) -> float:
    """Seconds for ``psft-export-hf`` run to completion (a fresh process, as the background copy is)."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "psft_megatron.cli.export_hf", "--ckpt", str(ckpt), "--out", str(out),
                           "--overwrite"], capture_output=True, text=True, timeout=1200)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"export failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds


def background(ckpt: Path, step: int) -> tuple[float, float]:
    """(seconds rank 0 spends in the save on the copy, seconds until the copy is complete)."""
    copies = HfCopy(every=1, save_interval=step, folder=None)
    shutil.rmtree(copies.out_dir(ckpt), ignore_errors=True)
    t = time.perf_counter()
    copies.after_save(ckpt, step, final=True)
    in_save = time.perf_counter() - t
    copies.wait()
    result = copies.results[-1]
    if not result["ok"]:
        raise RuntimeError(f"background export failed: {result['error']}")
    return in_save, result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "psft_bench_conversion")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    hf = prepare_smollm2(args.work)
    ckpt = args.work / "hf_copy_run" / "step_000100"  # named as the trainer names its checkpoints
    if not (ckpt / "psft_meta.json").is_file():  # in a process of its own: this one stays free of torch.distributed
        subprocess.run([sys.executable, "-m", "psft_megatron.cli.convert_hf", "--hf", str(hf), "--out", str(ckpt),
                        "--overwrite"], check=True, capture_output=True, timeout=1200)
    times: dict[str, list[float]] = {"foreground": [], "in_save": [], "background": []}
    for _ in range(args.repeats):
        times["foreground"].append(foreground(ckpt, args.work / "hf_copy_foreground"))
        in_save, total = background(ckpt, 100)
        times["in_save"].append(in_save)
        times["background"].append(total)
    med = {k: statistics.median(v) for k, v in times.items()}
    size = sum(f.stat().st_size for f in (ckpt.parent / "step_000100_hf").glob("*.safetensors"))
    print(f"model: SmolLM2-135M-Instruct, HF copy {size / 2**20:.0f} MiB of safetensors; medians of {args.repeats}")
    print(f"foreground export (blocking save):        {med['foreground']:8.2f} s")
    print(f"background: rank 0's time in the save:    {med['in_save']:8.3f} s   "
          f"({med['in_save'] / med['foreground']:.4f} x foreground)")
    print(f"background: until the copy is complete:   {med['background']:8.2f} s   "
          f"({med['background'] / med['foreground']:.2f} x foreground)")
    print(json.dumps({"medians_s": med, "runs_s": times, "hf_bytes": size, "python": platform.python_version(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores"}))


if __name__ == "__main__":
    main()
