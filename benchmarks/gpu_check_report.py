#!/usr/bin/env python
"""The two Python steps of benchmarks/gpu_check.sh: what the machine is (``env``), and one JSON
of every stage's status and figures plus a printed summary (``collect``).

    python benchmarks/gpu_check_report.py env --json ENV.json [--wheels SITE_DIR] [--no-gpu]
    python benchmarks/gpu_check_report.py collect --work WORK_DIR --json OUT.json [--budget S --elapsed S]

``collect`` reads what the stages left in WORK_DIR: stages.tsv (name, status, exit code,
seconds, note), env.json, tests.xml (pytest's JUnit report), loss_fp32.json / loss_bf16.json
(bench_loss.py --json), trainer.log (bench_trainer.py's printed lines) and trainer.json
(its --json, where it has that flag; same keys as :func:`parse_trainer_output`, and it wins),
profile.json (gpu_profile_step.py) and fused.json (bench_fused_head.py --json). Any of them may be missing: a stage that failed
leaves its own figures out, not the others'.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# H200 SXM dense bf16 peak (vendor datasheet), and an 8192^3 bf16 matmul measured on one
# of these machines (KINDS.md, 2026-10-28): MFU is quoted against both.
PEAK_TFLOPS = 989.0
MATMUL_TFLOPS = 790.0
# Issue 14's targets.
TARGET_MFU = 0.35
TARGET_PSFT_OVER_FLOOR = 1.1
# The fused output layer + loss against megatron's output layer + the loss (issue: fused head).
TARGET_FUSED_MEM, TARGET_FUSED_TIME = 4.0, 1.15

# Packages whose versions the log should show (absent ones are reported as absent).
PACKAGES = (
    "torch", "megatron-core", "datasets", "dill", "multiprocess", "numpy", "pyarrow", "pandas", "fsspec",
    "huggingface-hub", "packaging", "transformers", "tokenizers", "sentencepiece", "safetensors", "psutil",
    "pyyaml", "jinja2", "tensorboard", "tqdm", "pytest", "pytest-timeout", "triton",
    "transformer-engine", "transformer_engine", "apex", "flash-attn",
)


# ----------------------------------------------------------------------------- env


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _import_where(module: str) -> dict[str, Any]:
    """Where ``module`` imports from, or the one-line error."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as e:  # report, never raise: the env stage describes, other stages fail
        return {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    return {"ok": True, "file": getattr(mod, "__file__", None)}


def unmet_requirements(site: Path) -> list[dict[str, Any]]:
    """Requires-Dist lines of every distribution installed under ``site`` (the carried wheels)
    that the running interpreter does not satisfy: missing, or a version outside the range.

    Markers are evaluated for this interpreter with no extras, so optional extras and other
    platforms' needs are left out. pip installed the wheels with --no-deps, so nothing else
    checks this before an import fails.
    """
    from importlib.metadata import PathDistribution

    from packaging.requirements import Requirement

    unmet = []
    for info in sorted(Path(site).glob("*.dist-info")):
        dist = PathDistribution(info)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(req.name)
            if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
                unmet.append({"wheel": dist.metadata["Name"], "requirement": str(req), "installed": have})
    return unmet


def _nvidia_smi() -> str | None:
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _gpu_rates() -> dict[str, float]:
    """bf16 8192^3 matmul TFLOP/s and device-to-device copy GB/s (read + written), each the
    median of 10 timed runs after 3 warm-ups, timed with CUDA events, on random data."""
    import statistics

    import torch

    def timed(fn, reps: int = 10) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return statistics.median(times)

    def matmul_s(n: int) -> float:
        x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        return timed(lambda: x @ y)

    def copy_s(nbytes: int) -> float:
        src = torch.randn(nbytes // 4, device="cuda")
        dst = torch.empty_like(src)
        return timed(lambda: dst.copy_(src))

    n, nbytes = 8192, 2 << 30  # 8192^3 bf16; 2 GiB of fp32 read and 2 GiB written
    rates = {"matmul_bf16_tflops": 2 * n**3 / matmul_s(n) / 1e12, "copy_gbps": 2 * nbytes / copy_s(nbytes) / 1e9}
    torch.cuda.empty_cache()
    return rates


def env_report(wheels: Path | None, gpu: bool) -> dict[str, Any]:
    """What the machine is and has; ``gpu``: also the device and its measured rates."""
    rep: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "imports": {m: _import_where(m) for m in ("psft_megatron", "megatron.core", "datasets", "torch")},
    }
    # The package must run from this checkout (what was sent), not from an installed copy.
    here = rep["imports"]["psft_megatron"].get("file")
    rep["package_from_checkout"] = bool(here) and Path(here).resolve().is_relative_to(Path(__file__).resolve().parents[1])
    if wheels is not None and Path(wheels).is_dir():
        rep["unmet_requirements"] = unmet_requirements(Path(wheels))
    import torch

    rep["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if gpu and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rep["gpu"] = {
            "name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "nvidia_smi": _nvidia_smi(), "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }
        try:
            rep["rates"] = _gpu_rates()
        except Exception as e:  # the description above is still worth writing
            rep["rates"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    return rep


def _print_env(rep: dict[str, Any]) -> None:
    print(f"python {rep['python']} ({rep['executable']}); torch {rep['torch']['version']} CUDA {rep['torch']['cuda']}")
    if "gpu" in rep:
        g = rep["gpu"]
        print(f"gpu {g['name']} x{g['count']}, sm_{g['capability'].replace('.', '')}, {g['multiprocessors']} SMs, "
              f"{g['memory_gib']} GiB, NCCL {g['nccl']}; nvidia-smi: {g['nvidia_smi']}")
        r = rep["rates"]
        if "error" in r:
            print(f"measuring the matmul and copy rates FAILED: {r['error']}")
        else:
            print(f"measured: bf16 matmul {r['matmul_bf16_tflops']:.0f} TFLOP/s, copy {r['copy_gbps']:.0f} GB/s")
    print("packages: " + ", ".join(f"{k} {v}" for k, v in rep["packages"].items() if v))
    print("absent: " + ", ".join(k for k, v in rep["packages"].items() if not v))
    for m, r in rep["imports"].items():
        print(f"import {m}: " + (r["file"] or "ok" if r["ok"] else f"FAILED {r['error']}"))
    for u in rep.get("unmet_requirements", []):
        print(f"unmet: {u['wheel']} needs {u['requirement']}, installed {u['installed']}")
    if not rep["package_from_checkout"]:
        print("psft_megatron does NOT import from this checkout: put the repository root first on PYTHONPATH")


# ----------------------------------------------------------------------------- collect

_TRAINER_PATTERNS = {
    "header": re.compile(r"^device (\S+) x(\d+), TP=(\d+), layers=(\d+) hidden=(\d+) seq=(\d+), "
                         r"k=(\d+) mini-batches of (\d+) sequences", re.M),
    "sft": re.compile(r"^SFT\s+([\d.]+) s/global batch\s+([\d.]+) tok/s", re.M),
    "psft": re.compile(r"^PSFT\s+([\d.]+) s/global batch\s+([\d.]+) tok/s", re.M),
    "ratio": re.compile(r"^PSFT/SFT ([\d.]+)\s+floor ([\d.]+)\s+\(forward-only ([\d.]+) s / "
                        r"training step ([\d.]+) s = ([\d.]+) per mini-batch\)", re.M),
    "tflops": re.compile(r"^(sft|psft): ([\d.]+) model TFLOP/s per GPU, MFU ([\d.]+)%", re.M),
}


def parse_trainer_output(text: str) -> dict[str, Any]:
    """The figures bench_trainer.py prints (its current format); missing lines leave keys out."""
    out: dict[str, Any] = {}
    if m := _TRAINER_PATTERNS["header"].search(text):
        out["geometry"] = {"device": m[1], "nproc": int(m[2]), "tp": int(m[3]), "layers": int(m[4]),
                           "hidden": int(m[5]), "seq": int(m[6]), "k": int(m[7]), "mini": int(m[8])}
    for name in ("sft", "psft"):
        if m := _TRAINER_PATTERNS[name].search(text):
            out[f"{name}_s"], out[f"{name}_tokens_per_s"] = float(m[1]), float(m[2])
    if m := _TRAINER_PATTERNS["ratio"].search(text):
        out["psft_over_sft"], out["floor"] = float(m[1]), float(m[2])
        out["forward_only_s"], out["train_step_s"], out["forward_share"] = float(m[3]), float(m[4]), float(m[5])
    for m in _TRAINER_PATTERNS["tflops"].finditer(text):
        out[f"{m[1]}_tflops"] = float(m[2])
        out[f"{m[1]}_mfu_printed"] = float(m[3]) / 100
    return out


def trainer_figures(raw: dict[str, Any], matmul_measured: float | None) -> dict[str, Any]:
    """Derived figures: MFU against the peak, the 790 measured here earlier and this run's matmul."""
    out = dict(raw)
    if "psft_over_sft" in raw and raw.get("floor"):
        out["psft_over_floor"] = raw["psft_over_sft"] / raw["floor"]
    for name in ("sft", "psft"):
        tf = raw.get(f"{name}_tflops")
        if tf is None:
            continue
        out[f"{name}_mfu"] = tf / PEAK_TFLOPS
        out[f"{name}_mfu_vs_790"] = tf / MATMUL_TFLOPS
        if matmul_measured:
            out[f"{name}_mfu_vs_measured_matmul"] = tf / matmul_measured
    return out


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and the failing tests (name and the first line of the message) of a JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                if (el := case.find(tag)) is not None:
                    msg = (el.get("message") or el.text or "").strip().splitlines()
                    failed.append({"test": name, "kind": tag, "message": (msg[0] if msg else "")[:300]})
            if (el := case.find("skipped")) is not None:
                skipped.append({"test": name, "reason": (el.get("message") or "")[:200]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts | {"failed": failed, "skipped_tests": skipped}


def loss_figures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bench_loss.py --json rows, with time and peak memory relative to megatron's CE."""
    rows = []
    for r in results:
        res = r["results"]
        ref = res.get("mcore_ce")
        methods = {}
        for m, v in res.items():
            shard = v["shard_fp32_bytes"]
            methods[m] = {
                "time_s": v["time_s"], "peak_mib": v["peak_bytes"] / 2**20, "peak_fp32_shards": v["peak_bytes"] / shard,
                "time_vs_mcore_ce": v["time_s"] / ref["time_s"] if ref else None,
                "peak_vs_mcore_ce": v["peak_bytes"] / ref["peak_bytes"] if ref and ref["peak_bytes"] else None,
            }
        rows.append({"vocab": r["vocab"], "tokens": r["tokens"], "tp": r["tp"], "dtype": r["dtype"], "methods": methods})
    return rows


def fused_figures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """bench_fused_head.py --json rows: the fused head's peak memory and time against the unfused path."""
    return [{"vocab": r["vocab"], "tokens": r["tokens"], "hidden": r["hidden"], "dtype": r["dtype"],
             "grad_mode": r["grad_mode"], "mem_ratio": r["mem_ratio"], "time_ratio": r["time_ratio"],
             "unfused_peak_mib": r["results"]["unfused"]["peak_bytes"] / 2**20,
             "fused_peak_mib": r["results"]["fused"]["peak_bytes"] / 2**20,
             "unfused_s": r["results"]["unfused"]["time_s"], "fused_s": r["results"]["fused"]["time_s"],
             "grad_rel_diff": r["grad_rel_diff"]} for r in results]


def read_stages(path: Path) -> dict[str, dict[str, Any]]:
    stages = {}
    for line in path.read_text().splitlines():
        name, status, rc, secs, note = (line.split("\t") + [""] * 5)[:5]
        stages[name] = {"status": status, "exit": int(rc) if rc else None, "seconds": int(secs or 0), "note": note}
    return stages


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def collect(work: Path, budget: int | None = None, elapsed: int | None = None) -> dict[str, Any]:
    """Everything the stages left in ``work``, as one dict (see the module docstring)."""
    stages = read_stages(work / "stages.tsv") if (work / "stages.tsv").is_file() else {}
    env = _load_json(work / "env.json")
    rep: dict[str, Any] = {"budget_s": budget, "elapsed_s": elapsed, "stages": stages, "env": env}
    if (work / "tests.xml").is_file():
        try:
            rep["tests"] = parse_junit(work / "tests.xml")
        except ET.ParseError as e:
            rep["tests"] = {"error": f"unreadable JUnit XML: {e}"}
    loss = []
    for dtype in ("fp32", "bf16"):
        if (rows := _load_json(work / f"loss_{dtype}.json")) is not None:
            loss += loss_figures(rows)
    if loss:
        rep["loss"] = loss
    if (rows := _load_json(work / "fused.json")) is not None:
        rep["fused"] = fused_figures(rows)
    # The printed lines, overridden by bench_trainer.py's own JSON where it wrote one (same keys).
    raw = parse_trainer_output((work / "trainer.log").read_text(errors="replace")) if (work / "trainer.log").is_file() else {}
    raw |= _load_json(work / "trainer.json") or {}
    matmul = ((env or {}).get("rates") or {}).get("matmul_bf16_tflops")
    if raw:
        rep["trainer"] = trainer_figures(raw, matmul)
    if (prof := _load_json(work / "profile.json")) is not None:
        rep["profile"] = prof
        if matmul and prof.get("tflops"):
            prof["mfu_vs_measured_matmul"] = prof["tflops"] / matmul
    t = rep.get("trainer", {})
    # The step's MFU: bench_trainer.py's SFT figure, else the profile stage's timed steps (same model).
    mfu, source = (t["sft_mfu"], "trainer") if "sft_mfu" in t else ((prof or {}).get("mfu"), "profile")
    rep["targets"] = {
        "mfu": mfu, "mfu_from": source if mfu is not None else None,
        "mfu_at_least_35pct": None if mfu is None else mfu >= TARGET_MFU,
        "psft_within_1.1x_floor": None if "psft_over_floor" not in t else t["psft_over_floor"] <= TARGET_PSFT_OVER_FLOOR,
        "fused_memory_at_least_4x": None if "fused" not in rep else all(
            r["mem_ratio"] >= TARGET_FUSED_MEM for r in rep["fused"]),
        "fused_time_within_1.15x": None if "fused" not in rep else all(
            r["time_ratio"] <= TARGET_FUSED_TIME for r in rep["fused"]),
    }
    bad = [n for n, s in stages.items() if s["status"] in ("fail", "timeout") or s["note"] == "budget spent"]
    rep["failed_stages"] = bad
    rep["ok"] = bool(stages) and not bad
    return rep


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def summary_lines(rep: dict[str, Any]) -> list[str]:
    """The short table printed last (the device tool returns the end of the output)."""
    lines = ["", "==== gpu_check summary ===="]
    env = rep.get("env") or {}
    if g := env.get("gpu"):
        r = env.get("rates", {})
        lines.append(f"machine: {g['name']}, {g['memory_gib']} GiB, torch {env['torch']['version']}, "
                     f"measured bf16 matmul {_fmt(r.get('matmul_bf16_tflops'), '.0f')} TFLOP/s, "
                     f"copy {_fmt(r.get('copy_gbps'), '.0f')} GB/s")
    for u in env.get("unmet_requirements", []):
        lines.append(f"unmet requirement: {u['wheel']} needs {u['requirement']} (installed {u['installed']})")
    for name, s in rep["stages"].items():
        lines.append(f"stage {name:<8} {s['status']:<8} {s['seconds']:>4}s" + (f"  ({s['note']})" if s["note"] else ""))
    if t := rep.get("tests"):
        if "error" in t:
            lines.append(f"tests: {t['error']}")
        else:
            lines.append(f"tests: {t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped")
            lines += [f"  FAILED {f['test']}: {f['message']}" for f in t["failed"]]
    for row in rep.get("loss", []):
        lines.append(f"loss V={row['vocab']} T={row['tokens']} {row['dtype']} (time s, x mcore_ce, peak MiB):")
        for m, v in row["methods"].items():
            lines.append(f"  {m:<13} {_fmt(v['time_s'], '.4f')} {_fmt(v['time_vs_mcore_ce'], '6.2f')}x "
                         f"{_fmt(v['peak_mib'], '8.0f')}")
    for r in rep.get("fused", []):
        lines.append(f"fused head V={r['vocab']} T={r['tokens']} h={r['hidden']} {r['dtype']} {r['grad_mode']}: "
                     f"peak {r['unfused_peak_mib']:.0f} -> {r['fused_peak_mib']:.0f} MiB ({r['mem_ratio']:.1f}x less), "
                     f"time {r['unfused_s'] * 1e3:.1f} -> {r['fused_s'] * 1e3:.1f} ms ({r['time_ratio']:.2f}x)")
    if t := rep.get("trainer"):
        g = t.get("geometry", {})
        if g:
            lines.append(f"trainer: layers={g['layers']} hidden={g['hidden']} seq={g['seq']} k={g['k']} mini={g['mini']}")
        lines.append(f"  SFT {_fmt(t.get('sft_s'))} s/gb {_fmt(t.get('sft_tokens_per_s'), '.0f')} tok/s; "
                     f"PSFT {_fmt(t.get('psft_s'))} s/gb {_fmt(t.get('psft_tokens_per_s'), '.0f')} tok/s")
        lines.append(f"  PSFT/SFT {_fmt(t.get('psft_over_sft'))} floor {_fmt(t.get('floor'))} "
                     f"ratio/floor {_fmt(t.get('psft_over_floor'))} (target <= {TARGET_PSFT_OVER_FLOOR})")
        for name in ("sft", "psft"):
            if f"{name}_tflops" in t:
                lines.append(f"  {name}: {t[name + '_tflops']:.1f} TFLOP/s, MFU {_fmt(t.get(name + '_mfu'), '.1%')} of "
                             f"{PEAK_TFLOPS:.0f}, {_fmt(t.get(name + '_mfu_vs_790'), '.1%')} of {MATMUL_TFLOPS:.0f}, "
                             f"{_fmt(t.get(name + '_mfu_vs_measured_matmul'), '.1%')} of this run's matmul")
    if p := rep.get("profile"):
        lines.append(f"profile: one step {_fmt(p.get('step_s'))} s, {_fmt(p.get('tokens_per_s'), '.0f')} tok/s, "
                     f"{_fmt(p.get('tflops'), '.1f')} TFLOP/s, MFU {_fmt(p.get('mfu'), '.1%')} of {PEAK_TFLOPS:.0f}; "
                     f"peak {_fmt(p.get('peak_gib'), '.1f')} GiB, {_fmt((p.get('params') or 0) / 1e9, '.2f')}B params")
        cats = ", ".join(f"{k} {v:.0%}" for k, v in p.get("categories", {}).items())
        lines.append(f"  {p.get('measure', 'time')} by kind: {cats}")
    tg = rep["targets"]
    lines.append(f"targets: MFU >= {TARGET_MFU:.0%}: {tg['mfu_at_least_35pct']} ({_fmt(tg['mfu'], '.1%')}, {tg['mfu_from']}); "
                 f"PSFT/SFT <= {TARGET_PSFT_OVER_FLOOR}x floor: {tg['psft_within_1.1x_floor']}; "
                 f"fused head memory >= {TARGET_FUSED_MEM:.0f}x less: {tg['fused_memory_at_least_4x']}, "
                 f"time <= {TARGET_FUSED_TIME}x: {tg['fused_time_within_1.15x']}")
    lines.append("result: " + ("all stages passed" if rep["ok"] else f"FAILED stages: {', '.join(rep['failed_stages']) or 'none ran'}")
                 + (f" ({rep['elapsed_s']}s of {rep['budget_s']}s)" if rep.get("elapsed_s") is not None else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="describe the machine into a JSON")
    e.add_argument("--json", type=Path, required=True)
    e.add_argument("--wheels", type=Path, default=None, help="the folder the carried wheels were installed into")
    e.add_argument("--no-gpu", action="store_true", help="skip the GPU description and rates")
    c = sub.add_parser("collect", help="merge the stages' outputs into one JSON and print the summary")
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--json", type=Path, required=True)
    c.add_argument("--budget", type=int, default=None)
    c.add_argument("--elapsed", type=int, default=None)
    args = ap.parse_args(argv)
    if args.cmd == "env":
        rep = env_report(args.wheels, gpu=not args.no_gpu)
        args.json.write_text(json.dumps(rep, indent=1))
        _print_env(rep)
        # A failed import or measurement, or an unmet requirement, fails this stage; the later stages still run.
        failed = [m for m, r in rep["imports"].items() if not r["ok"]]
        bad = failed or rep.get("unmet_requirements") or not rep["package_from_checkout"] or "error" in rep.get("rates", {})
        return 1 if bad else 0
    rep = collect(args.work, args.budget, args.elapsed)
    args.json.write_text(json.dumps(rep, indent=1))
    print("\n".join(summary_lines(rep)))
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
