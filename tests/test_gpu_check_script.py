"""benchmarks/gpu_check.sh and its helpers on a machine without a GPU: what can be checked before
the one short GPU session that runs it.

- Arguments: --help exits 0 and names every option; a bad argument is one line, exit 2.
- No GPU: one line, exit 3, within seconds and before anything is installed or written, both
  when nvidia-smi is missing and when it is there but torch sees no CUDA device.
- The budget: stages it leaves no time for are skipped and reported as failed, in the JSON.
  A failing stage is recorded with its exit code and the next stages still run (slow).
- gpu_check_report.py: bench_trainer.py's printed figures, a real pytest JUnit report, the
  carried wheels' Requires-Dist against what is installed, and the merged JSON (MFU against
  989 / 790 / the run's own matmul, the targets, failed and budget-skipped stages).
- The set of carried wheels is complete: the package's dependencies and the wheels' own
  requirements are each in the H200 image's package list (benchmarks/gpu_image_packages.txt)
  or carried (slow: downloads them; skips without PyPI).
- slow: the whole script end to end at toy sizes on the CPU (--toy), and tests/test_gpu.py's
  code run on the CPU (fp32, gloo), so an API change of the package shows here, not first
  in the GPU session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from psft_megatron.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FETCH = ROOT / "benchmarks" / "fetch_gpu_wheels.sh"
# The device machine's package list, kept as data in the repository (its header says when it was read).
IMAGE_PACKAGES = ROOT / "benchmarks" / "gpu_image_packages.txt"
CARRIED = ("megatron-core", "datasets", "dill", "multiprocess")


def _benchmark(name: str):
    """benchmarks/NAME.py, loaded by path: benchmarks/ holds scripts, not a package."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _benchmark("gpu_check_report")

no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run for real")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _path_without_nvidia_smi() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "nvidia-smi").exists())


def _run(args: list[str], tmp_path: Path, path: str | None = None, timeout: float = 120,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, PATH=path or os.environ["PATH"], **(extra_env or {}))
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout)


# ----------------------------------------------------------------------------- arguments and the no-GPU exit


def test_help_exits_zero_and_names_every_option(tmp_path):
    r = _run(["--help"], tmp_path)
    assert r.returncode == 0 and r.stderr == ""
    for opt in ("--out", "--wheels", "--budget", "--trainer-args", "--skip-install", "--skip-tests", "--skip-bench",
                "--skip-profile", "--toy", "--help"):
        assert opt in r.stdout, opt
    assert not (tmp_path / "gpu_check_out").exists()


@pytest.mark.parametrize("args", [["--bogus"], ["--out"], ["--budget", "soon"], ["--trainer-args"], ["--toy", "extra"]])
def test_bad_argument_is_one_line_and_exit_2(tmp_path, args):
    r = _run(args, tmp_path)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: ") and "--help" in lines[0], r.stderr


@no_gpu_here
def test_no_nvidia_smi_fails_fast_with_one_line(tmp_path):
    t0 = time.monotonic()
    r = _run(["--out", str(tmp_path / "out")], tmp_path, path=_path_without_nvidia_smi())
    assert time.monotonic() - t0 < 10
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "gpu_check: error: no CUDA GPU here (nvidia-smi not found): run this on the GPU machine (device tool), "
        "or pass --toy for a CPU self-test"
    ]
    assert not (tmp_path / "out").exists(), "nothing may be written before the GPU check"


@pytest.mark.slow  # starts Python
@no_gpu_here
def test_torch_without_cuda_fails_with_one_line(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: Fake GPU (UUID: GPU-0)"\n')
    (fake / "nvidia-smi").chmod(0o755)
    r = _run(["--out", str(tmp_path / "out")], tmp_path, path=f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert r.returncode == 3 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0] == f"gpu_check: error: no usable CUDA GPU here: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device"
    assert not (tmp_path / "out").exists()


def test_a_spent_budget_skips_stages_and_still_writes_the_json(tmp_path):
    out = tmp_path / "out"
    r = _run(["--toy", "--skip-install", "--budget", "10", "--out", str(out)], tmp_path)
    assert r.returncode == 1
    rep = json.loads((out / "gpu_check.json").read_text())
    assert {k: (s["status"], s["note"]) for k, s in rep["stages"].items()} == {
        "install": ("skipped", "--skip-install"),
        **{k: ("skipped", "budget spent") for k in ("env", "tests", "loss", "fused", "trainer", "profile")}}
    assert rep["failed_stages"] == ["env", "tests", "loss", "fused", "trainer", "profile"]
    assert r.stdout.strip().splitlines()[-1].startswith("result: FAILED stages: env, tests, loss, fused, trainer, profile")
    assert "[trainer] skipped: the budget is spent" in (out / "gpu_check.log").read_text()


# ----------------------------------------------------------------------------- gpu_check_report.py

# bench_trainer.py's lines on a GPU, as its f-strings print them (the end-to-end test below
# parses the real output on the CPU, which has no TFLOP/s lines).
TRAINER_GPU_OUTPUT = """\
device cuda:0 x1, TP=1, layers=24 hidden=2048 seq=4096, k=4 mini-batches of 4 sequences
SFT  6.500 s/global batch  10082 tok/s
PSFT 7.400 s/global batch  8856 tok/s
PSFT/SFT 1.138   floor 1.120  (forward-only 0.400 s / training step 1.880 s = 0.160 per mini-batch)
sft: 395.6 model TFLOP/s per GPU, MFU 40.0% (snapshot pass not counted)
psft: 347.5 model TFLOP/s per GPU, MFU 35.1% (snapshot pass not counted)
"""


def test_trainer_figures_from_bench_trainer_output():
    raw = report.parse_trainer_output("megatron noise\n" + TRAINER_GPU_OUTPUT + "[rank0] more noise\n")
    assert raw["geometry"] == {"device": "cuda:0", "nproc": 1, "tp": 1, "layers": 24, "hidden": 2048, "seq": 4096,
                               "k": 4, "mini": 4}
    assert (raw["sft_s"], raw["sft_tokens_per_s"], raw["psft_s"], raw["psft_tokens_per_s"]) == (6.5, 10082, 7.4, 8856)
    assert (raw["psft_over_sft"], raw["floor"], raw["forward_share"]) == (1.138, 1.12, 0.16)
    assert (raw["sft_tflops"], raw["psft_tflops"]) == (395.6, 347.5)
    t = report.trainer_figures(raw, matmul_measured=780.0)
    assert t["sft_mfu"] == pytest.approx(395.6 / 989) and t["sft_mfu_vs_790"] == pytest.approx(395.6 / 790)
    assert t["sft_mfu_vs_measured_matmul"] == pytest.approx(395.6 / 780)
    assert t["sft_mfu"] == pytest.approx(raw["sft_mfu_printed"], abs=5e-4)  # bench_trainer's own MFU agrees
    assert t["psft_over_floor"] == pytest.approx(1.138 / 1.12)
    assert report.parse_trainer_output("nothing printed") == {}


def test_profile_step_counts_model_flops_as_bench_trainer_does():
    bench_trainer, gpu_profile_step = _benchmark("bench_trainer"), _benchmark("gpu_profile_step")
    args = SimpleNamespace(layers=24, hidden=2048, seq=4096, ffn=None, heads=None, kv_groups=None, vocab=384, impl="local",
                           mini=4, micro=1, tp=1, k=4, with_kl=False)
    ours = gpu_profile_step._recipe(Path("d"), Path("r"), args, gpu=True)["model"]
    theirs = bench_trainer._recipe(Path("d"), Path("r"), args, gpu=True)["model"]
    assert {k: ours[k] for k in theirs if k != "transformer_impl"} == {k: v for k, v in theirs.items() if k != "transformer_impl"}
    # Both count the output layer at the model's own padded rows (ModelConfig.padded_vocab_size):
    padded = ModelConfig(**{k: v for k, v in ours.items() if k in ModelConfig.__dataclass_fields__}).padded_vocab_size
    assert gpu_profile_step.flops_per_token(ours, 4096, padded) == bench_trainer._flops_per_token(theirs, 4096)
    wider = dict(theirs, vocab_size=385)  # one row over a multiple of 128 pads to the next one
    assert bench_trainer._flops_per_token(wider, 4096) == gpu_profile_step.flops_per_token(ours, 4096, 512)


@pytest.mark.slow  # starts Python
def test_junit_report_of_a_real_pytest_run(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok():\n    assert True\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='needs a CUDA GPU')\ndef test_skipped():\n    pass\n"
    )
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_sample.py")], capture_output=True, cwd=tmp_path, timeout=120)
    j = report.parse_junit(xml)
    assert (j["tests"], j["passed"], j["failures"], j["errors"], j["skipped"]) == (3, 1, 1, 0, 1)
    assert [f["test"].split("::")[-1] for f in j["failed"]] == ["test_bad"]
    assert "one is not two" in j["failed"][0]["message"]
    assert j["skipped_tests"][0]["reason"].endswith("needs a CUDA GPU")


def _dist_info(site: Path, name: str, requires: list[str]) -> None:
    d = site / f"{name}-1.0.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: " + name + "\nVersion: 1.0\n"
                                + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_unmet_requirements_of_the_carried_wheels(tmp_path):
    import numpy

    _dist_info(tmp_path, "carried_a", [
        f"torch>={torch.__version__.split('+')[0]}",  # met exactly
        "numpy<1",  # installed, outside the range
        "not-a-package-anywhere-xyz",  # missing
        "pywin32; sys_platform == 'win32'",  # not for this platform
        "sphinx; extra == 'docs'",  # an extra
    ])
    _dist_info(tmp_path, "carried_b", [])
    unmet = report.unmet_requirements(tmp_path)
    assert unmet == [
        {"wheel": "carried_a", "requirement": "numpy<1", "installed": numpy.__version__},
        {"wheel": "carried_a", "requirement": "not-a-package-anywhere-xyz", "installed": None},
    ]


def _work_dir(tmp_path: Path, stages: list[str]) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "stages.tsv").write_text("".join(s + "\n" for s in stages))
    (work / "env.json").write_text(json.dumps({"rates": {"matmul_bf16_tflops": 800.0, "copy_gbps": 4300.0},
                                               "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8},
                                               "torch": {"version": "2.11.0+cu130"}}))
    (work / "trainer.log").write_text(TRAINER_GPU_OUTPUT)
    shard = 16384 * 128256 * 4
    res = {"ours": {"time_s": 0.030, "peak_bytes": shard, "shard_fp32_bytes": shard},
           "mcore_ce": {"time_s": 0.020, "peak_bytes": 2 * shard, "shard_fp32_bytes": shard}}
    (work / "loss_bf16.json").write_text(json.dumps([{"vocab": 128256, "tp": 1, "tokens": 16384, "dtype": "bf16",
                                                      "results": res}]))
    fused = [{"vocab": v, "tokens": 16384, "hidden": 4096, "dtype": "bf16", "grad_mode": "main_grad", "mem_ratio": m,
              "time_ratio": t, "grad_rel_diff": 1e-3, "loss_diff": 0.0,
              "results": {"unfused": {"time_s": 0.1, "cpu_s": 0.1, "peak_bytes": 8 << 30},
                          "fused": {"time_s": 0.1 * t, "cpu_s": 0.1, "peak_bytes": int((8 << 30) / m)}}}
             for v, m, t in ((128256, 6.0, 1.05), (151936, 7.0, 1.2))]
    (work / "fused.json").write_text(json.dumps(fused))
    return work


def test_collect_merges_every_stage_and_judges_the_targets(tmp_path, capsys):
    work = _work_dir(tmp_path, ["install\tpass\t0\t3\t", "env\tpass\t0\t9\t", "tests\tfail\t1\t80\t",
                                "loss\ttimeout\t124\t120\t", "trainer\tpass\t0\t150\t", "profile\tskipped\t\t0\tbudget spent",
                                "extra\tskipped\t\t0\t--skip-bench"])
    rep = report.collect(work, budget=450, elapsed=400)
    assert rep["failed_stages"] == ["tests", "loss", "profile"] and rep["ok"] is False
    assert rep["stages"]["loss"] == {"status": "timeout", "exit": 124, "seconds": 120, "note": ""}
    t = rep["trainer"]
    assert t["sft_mfu"] == pytest.approx(395.6 / 989) and t["sft_mfu_vs_measured_matmul"] == pytest.approx(395.6 / 800)
    assert rep["targets"] == {"mfu": pytest.approx(395.6 / 989), "mfu_from": "trainer", "mfu_at_least_35pct": True,
                              "psft_within_1.1x_floor": True, "fused_memory_at_least_4x": True,
                              "fused_time_within_1.15x": False}  # one of the two vocabularies took 1.2x
    assert [r["vocab"] for r in rep["fused"]] == [128256, 151936]
    assert [r["fused_peak_mib"] for r in rep["fused"]] == pytest.approx([8192 / 6, 8192 / 7])
    (row,) = rep["loss"]
    assert row["methods"]["ours"]["time_vs_mcore_ce"] == pytest.approx(1.5)
    assert row["methods"]["ours"]["peak_vs_mcore_ce"] == pytest.approx(0.5)
    assert row["methods"]["ours"]["peak_fp32_shards"] == pytest.approx(1.0)
    out = tmp_path / "out.json"
    assert report.main(["collect", "--work", str(work), "--json", str(out), "--budget", "450", "--elapsed", "400"]) == 1
    assert json.loads(out.read_text())["failed_stages"] == ["tests", "loss", "profile"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "result: FAILED stages: tests, loss, profile (400s of 450s)"
    assert any("MFU 40.0% of 989" in line for line in printed)


def test_collect_passes_when_every_stage_passed_and_misses_show(tmp_path):
    work = _work_dir(tmp_path, ["env\tpass\t0\t9\t", "trainer\tpass\t0\t150\t", "install\tskipped\t\t0\t--skip-install"])
    (work / "trainer.log").write_text(TRAINER_GPU_OUTPUT.replace("sft: 395.6", "sft: 200.0").replace("floor 1.120", "floor 1.000"))
    rep = report.collect(work)
    assert rep["ok"] is True and rep["failed_stages"] == []
    (work / "fused.json").unlink()  # the stage did not run: no verdict
    rep = report.collect(work)
    assert rep["targets"] == {"mfu": pytest.approx(200 / 989), "mfu_from": "trainer", "mfu_at_least_35pct": False,
                              "psft_within_1.1x_floor": False, "fused_memory_at_least_4x": None,
                              "fused_time_within_1.15x": None}
    assert report.collect(tmp_path / "empty")["ok"] is False  # nothing ran: not a pass


def test_collect_takes_the_step_mfu_from_the_profile_stage_when_the_trainer_failed(tmp_path):
    work = _work_dir(tmp_path, ["trainer\tfail\t1\t20\t", "profile\tpass\t0\t60\t"])
    (work / "trainer.log").write_text("Traceback (most recent call last):\nRuntimeError: no\n")
    (work / "profile.json").write_text(json.dumps({"step_s": 2.0, "tokens_per_s": 8192.0, "tflops": 296.7, "mfu": 0.3,
                                                   "categories": {"matmul": 0.6, "softmax_mask": 0.4}}))
    rep = report.collect(work)
    assert "trainer" not in rep and rep["failed_stages"] == ["trainer"]
    assert rep["targets"] == {"mfu": 0.3, "mfu_from": "profile", "mfu_at_least_35pct": False,
                              "psft_within_1.1x_floor": None, "fused_memory_at_least_4x": True,
                              "fused_time_within_1.15x": False}
    assert rep["profile"]["mfu_vs_measured_matmul"] == pytest.approx(296.7 / 800)
    assert any(line.startswith("profile: one step 2.000 s, 8192 tok/s, 296.7 TFLOP/s, MFU 30.0%")
               for line in report.summary_lines(rep))


# ----------------------------------------------------------------------------- the carried set


def _h200_packages() -> set[str]:
    """The GPU image's package names, one per line of benchmarks/gpu_image_packages.txt (# comments)."""
    lines = (line.strip() for line in IMAGE_PACKAGES.read_text().splitlines())
    names = {_norm(line) for line in lines if line and not line.startswith("#")}
    assert "torch" in names and len(names) > 50, f"{IMAGE_PACKAGES} looks truncated"
    return names


def test_the_package_needs_only_what_the_image_has_or_what_is_carried():
    have = _h200_packages() | set(CARRIED)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from packaging.requirements import Requirement

    needed = {_norm(Requirement(r).name) for r in meta["dependencies"]}
    needed |= {"pytest", "pytest-timeout"}  # the GPU tests' runner and its timeout plug-in
    assert needed - have == set(), "add these to benchmarks/fetch_gpu_wheels.sh"


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/dill/", timeout=8).close()
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_fetch_downloads_the_pinned_wheels_and_they_install_for_python312(tmp_path):
    if not _pypi_reachable():
        pytest.skip("PyPI is not reachable from here")
    from importlib.metadata import version

    from packaging.markers import Marker
    from packaging.requirements import Requirement

    dest = tmp_path / "whl"
    r = subprocess.run(["bash", str(FETCH), "--dest", str(dest)], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 0, r.stderr
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    assert len(wheels) == len(CARRIED)
    for name in CARRIED:  # exactly the version this environment runs, one wheel each
        prefix = f"{name.replace('-', '_')}-{version(name)}-"
        assert sum(w.startswith(prefix) for w in wheels) == 1, (prefix, wheels)
    assert any(re.search(r"megatron_core-.*-cp312-cp312-manylinux.*x86_64\.whl", w) for w in wheels), wheels
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    assert total < 56 * 2**20 and f"total {total} bytes" in r.stdout  # the device call carries 64 MiB in all

    # The install gpu_check.sh does there, here for Python 3.12 (pip checks the tags, not this interpreter).
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), "--python-version", "3.12",
                    "--implementation", "cp", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                    *map(str, dest.glob("*.whl"))], check=True, capture_output=True, timeout=300)
    infos = {_norm(p.name.split("-")[0]) for p in site.glob("*.dist-info")}
    assert infos == set(CARRIED)
    assert report.unmet_requirements(site) == []  # this environment has the same versions

    # Every requirement of a carried wheel, for Python 3.12 on x86-64 Linux, is in the image or carried.
    h200 = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    needed = set()
    for info in site.glob("*.dist-info"):
        for line in (info / "METADATA").read_text().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is None or Marker(str(req.marker)).evaluate(h200):
                    needed.add(_norm(req.name))
    assert needed - (_h200_packages() | set(CARRIED)) == set()


def test_fetch_check_only_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "dill-0.0.1-py3-none-any.whl").write_bytes(b"")
    r = subprocess.run(["bash", str(FETCH), "--dest", str(tmp_path), "--check-only"], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 1
    errors = r.stderr.splitlines()
    assert any("is not dill==" in e for e in errors) and any("no wheel for megatron-core==" in e for e in errors)
    r = subprocess.run(["bash", str(FETCH), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("fetch_gpu_wheels: error: unknown argument")


# ----------------------------------------------------------------------------- end to end on the CPU


@pytest.mark.slow
@no_gpu_here
def test_toy_run_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "out"
    r = _run(["--toy", "--skip-install", "--out", str(out), "--budget", "900"], tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("result: all stages passed")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.json", "gpu_check.log", "profile.txt"]  # the device tool returns 8 at most
    rep = json.loads((out / "gpu_check.json").read_text())
    assert {k: s["status"] for k, s in rep["stages"].items()} == {
        "install": "skipped", "env": "pass", "tests": "pass", "loss": "pass", "fused": "pass", "trainer": "pass",
        "profile": "pass"}
    assert rep["env"]["package_from_checkout"] is True
    tests = rep["tests"]
    assert tests["failures"] == tests["errors"] == 0
    assert tests["skipped"] >= 10 and all(s["test"].startswith("tests.test_gpu") for s in tests["skipped_tests"])
    assert tests["passed"] >= 5  # test_cpu_compat_targets runs on any machine
    t = rep["trainer"]  # bench_trainer.py's real output, parsed
    assert t["geometry"]["device"] == "cpu" and t["sft_s"] > 0 and t["psft_s"] > 0 and t["floor"] >= 1.0
    assert t["psft_over_floor"] == pytest.approx(t["psft_over_sft"] / t["floor"])
    assert [(row["dtype"], sorted(row["methods"])) for row in rep["loss"]] == [  # --toy: fp32 logits only
        ("fp32", ["mcore_ce", "mcore_full", "naive", "ours", "ours_inplace"])]
    (fused,) = rep["fused"]  # bench_fused_head.py's real JSON at toy size
    assert fused["vocab"] == 4096 and fused["mem_ratio"] > 0 and fused["time_ratio"] > 0 and fused["grad_rel_diff"] < 1e-5
    prof = rep["profile"]
    assert sum(prof["categories"].values()) == pytest.approx(1.0) and prof["top"] and prof["params"] > 0


@pytest.mark.slow
def test_a_failing_stage_is_recorded_and_the_next_ones_still_run(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    out = tmp_path / "out"
    r = _run(["--toy", "--skip-tests", "--skip-bench", "--wheels", str(wheels), "--out", str(out)], tmp_path,
             extra_env={"GPU_CHECK_SITE": str(tmp_path / "site")}, timeout=600)
    assert r.returncode == 1
    rep = json.loads((out / "gpu_check.json").read_text())
    assert {k: s["status"] for k, s in rep["stages"].items()} == {
        "install": "fail", "env": "pass", "tests": "skipped", "loss": "skipped", "fused": "skipped", "trainer": "skipped",
        "profile": "skipped"}
    assert rep["stages"]["install"]["exit"] not in (0, None) and rep["failed_stages"] == ["install"]
    assert rep["env"]["imports"]["psft_megatron"]["ok"]  # the stage after the failed one ran and reported
    assert r.stdout.strip().splitlines()[-1].startswith("result: FAILED stages: install")


@pytest.mark.slow
def test_gpu_test_code_runs_on_cpu(monkeypatch, tmp_path):
    """tests/test_gpu.py's code, with fp32 and the plain optimizer on gloo where CUDA is absent:
    every part runs and agrees with its reference (the CUDA claims themselves need the GPU)."""
    import test_gpu

    from psft_megatron.data.synthetic import write_tiny_dataset
    from psft_megatron.testing.multiproc import run_in_processes

    monkeypatch.setattr(test_gpu, "DEV", "cpu")
    test_gpu.test_token_stats_on_cuda_match_float64_reference(torch.float32)
    test_gpu.test_fused_output_head_on_cuda_matches_float64_reference(torch.float32)
    test_gpu.test_fused_head_loss_on_cuda_matches_float64_and_the_recomputing_head(torch.float32)
    test_gpu.test_psft_micro_batch_loss_on_cuda_matches_float64_reference()

    write_tiny_dataset(tmp_path / "data", train=200, eval=8)
    init, resume = test_gpu._recipe(tmp_path / "data", tmp_path), test_gpu._resume_recipe(tmp_path / "data", tmp_path)
    init["model"]["params_dtype"] = resume["model"]["params_dtype"] = "fp32"
    resume["optimizer"]["use_distributed_optimizer"] = False
    parts = run_in_processes(test_gpu.gpu_process, 1, kwargs={"init_recipe": init, "resume_recipe": resume,
                                                               "tmp": str(tmp_path)},
                             init_process_group=False, timeout=600)[0]
    nccl = test_gpu._value(parts, "nccl")
    assert nccl["backend"] == "gloo" and max(nccl[k] for k in ("all_reduce", "all_gather", "reduce_scatter", "coalesced")) == 0
    assert test_gpu._value(parts, "init_from") < 1e-9  # fp32 weights move by ~lr = 1e-12 at most
    v = test_gpu._value(parts, "resume")
    assert v["state"]["max_diff"] == 0.0 and v["state"]["moved_from_initial"] == v["state"]["params"] > 0
    assert [r["step"] for r in v["stopped"]["records"] + v["resumed"]["records"]] == [1, 2, 3, 4]
    assert test_gpu._max_diff(v["stopped"]["records"] + v["resumed"]["records"], v["ref"]["records"]) == 0.0
    ce = test_gpu._value(parts, "mcore_ce")
    assert ce["logp"] <= 1e-4 and ce["grad"] <= 1e-6
