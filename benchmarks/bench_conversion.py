"""Checkpoint conversion time and peak memory, HF -> Megatron and back, on SmolLM2-135M-Instruct.

    python benchmarks/bench_conversion.py [--hf HF_DIR] [--repeats 3]

Without ``--hf`` the model is SmolLM2-135M-Instruct from ``../shared/models`` (GGUF,
dequantised to fp32 by transformers and saved as safetensors once, into ``--work``).
Each conversion runs in a fresh process (the ``tools/`` entry points' functions), which
reports its wall time and peak RSS (``ru_maxrss``); "baseline" is that process's RSS
after importing torch, megatron-core and the converter, before converting. The
"whole model" row is a process that just loads every HF tensor at once
(``safetensors.torch.load_file``): the floor for any converter that materialises the model.

The 70B figures are the memory model in ``predicted_peak_bytes`` (checked against the
SmolLM2 measurement) applied to Llama-3-70B's shapes in bf16. Prints a table and a JSON
line; docs/benchmarks.md ("## Conversion") records the figures.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MB = 2**20

# Runs in a fresh interpreter: imports, baseline RSS, the conversion, peak RSS.
_RUNNER = r"""
import json, resource, sys, time
kind, src, dst = sys.argv[1:4]
import torch
if kind == "load_all":
    from safetensors.torch import load_file
    import glob
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    sd = {{}}
    for f in sorted(glob.glob(src + "/*.safetensors")):  # load_file maps lazily: clone to hold the data
        sd.update({{k: v.clone() for k, v in load_file(f).items()}})
else:
    import megatron.core.dist_checkpointing, megatron.core.models.gpt
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if kind == "hf_to_megatron":
        convert_hf_to_megatron(src, dst)
    else:
        convert_megatron_to_hf(src, dst)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({{"seconds": seconds, "baseline_kb": base, "peak_kb": peak}}))
"""


def run(kind: str, src: Path, dst: Path) -> dict[str, float]:
    code = _RUNNER.format()  # the template's {{ }} are literal braces
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([sys.executable, "-c", code, kind, str(src), str(dst)], capture_output=True, text=True,
                          env=env, timeout=1200)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{kind} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def prepare_smollm2(work: Path) -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder (dequantised once from the GGUF)."""
    folder = work / "smollm2_hf"
    if (folder / "config.json").is_file():
        return folder
    from psft_megatron.conversion.gguf import gguf_to_hf

    return gguf_to_hf(GGUF, folder, SHARED / "tokenizers" / "smollm2")


def predicted_peak_bytes(shapes: dict[str, Any], direction: str) -> int:
    """Memory above the baseline that the streaming converters need (see docs/benchmarks.md).

    HF -> Megatron: torch's checkpoint writer keeps the last written chunk of every
    checkpoint key until the file is closed (embedding, output layer and one layer's
    tensors); on top, the tensor being produced and its HF inputs (the padded
    embedding's unpadded source, or gate + up + the fused fc1).
    Megatron -> HF: one group is loaded at a time (the largest is embedding + output)
    plus the read buffer of its largest stored tensor.
    """
    b = shapes["bytes_per_param"]
    h, ffn, kv = shapes["hidden"], shapes["ffn"], shapes["kv_dim"]
    emb = shapes["padded_vocab"] * h * b
    out = 0 if shapes["tied"] else emb
    layer = (h + 2 * kv) * h * b + h * h * b + 3 * h * ffn * b
    if direction == "hf_to_megatron":
        padded = shapes["padded_vocab"] != shapes["vocab"]
        produce = max(shapes["vocab"] * h * b if padded else 0, 4 * ffn * h * b)
        return emb + out + layer + produce
    return emb + out + max(emb, layer)


SMOLLM2 = dict(hidden=576, ffn=1536, kv_dim=3 * 64, vocab=49152, padded_vocab=49152, tied=True, bytes_per_param=4)
# Llama-3-70B: 128256 = 1002 x 128, so no padding at TP=1.
LLAMA3_70B = dict(hidden=8192, ffn=28672, kv_dim=8 * 128, vocab=128256, padded_vocab=128256, tied=False,
                  bytes_per_param=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", type=Path, default=None, help="HF folder to convert (default: SmolLM2 from GGUF)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "psft_bench_conversion")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    hf = args.hf or prepare_smollm2(args.work)
    size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
    results: dict[str, list[dict[str, float]]] = {"load_all": [], "hf_to_megatron": [], "megatron_to_hf": []}
    for i in range(args.repeats):
        ckpt, back = args.work / f"mg_{i}", args.work / f"back_{i}"
        for p in (ckpt, back):
            shutil.rmtree(p, ignore_errors=True)
        results["load_all"].append(run("load_all", hf, hf))
        results["hf_to_megatron"].append(run("hf_to_megatron", hf, ckpt))
        results["megatron_to_hf"].append(run("megatron_to_hf", ckpt, back))
        shutil.rmtree(back)
        if i:
            shutil.rmtree(ckpt)

    summary: dict[str, Any] = {"model_bytes": size, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                               "python": platform.python_version()}
    print(f"model: {hf}  ({size / MB:.0f} MiB of safetensors)")
    print(f"{'step':<16}{'seconds (median)':>18}{'peak RSS MiB':>14}{'baseline MiB':>14}{'above baseline':>16}")
    for kind, runs in results.items():
        sec = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_kb"] for r in runs) / 1024
        base = statistics.median(r["baseline_kb"] for r in runs) / 1024
        summary[kind] = {"seconds": round(sec, 2), "peak_mib": round(peak), "baseline_mib": round(base)}
        print(f"{kind:<16}{sec:>18.2f}{peak:>14.0f}{base:>14.0f}{peak - base:>16.0f}")
    for direction in ("hf_to_megatron", "megatron_to_hf"):
        small = predicted_peak_bytes(SMOLLM2, direction) / MB
        big = predicted_peak_bytes(LLAMA3_70B, direction) / 2**30
        summary[direction]["predicted_above_baseline_mib"] = round(small)
        summary[direction]["llama3_70b_predicted_above_baseline_gib"] = round(big, 1)
        print(f"{direction}: predicted above baseline {small:.0f} MiB (SmolLM2), {big:.1f} GiB (Llama-3-70B bf16)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
