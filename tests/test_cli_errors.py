"""Every entry point, given bad input, stops with one line that says what to fix.

The entry points: the console scripts of pyproject.toml's ``[project.scripts]``
(``psft-train``, ``psft-evaluate``, ...), ``python -m psft_megatron.train``, and the path
wrappers the README calls (``launch/pretrain_psft.py``, ``tools/*.py``). Each case runs one as
a real process, from a folder outside the repository (an installed package works from any
folder), and checks: exit status 2, exactly one stderr line starting with ``error:`` that
names the offending path or option (and the OS error where one is involved), no traceback
anywhere, and no output left behind. Every entry point has at least one such case
(``test_every_entry_point_has_a_bad_input_case``). Usage errors (an unknown flag, a missing
argument) exit 2 through argparse, and every command's ``--help`` exits 0 and documents the
exit status.

Inputs, built in tmp_path: a tiny random Llama saved by transformers, its conversion by
the CLI (the one successful run here), damaged copies of both, and the synthetic data
set. A read-only location is a chmod-555 folder, or a read-only tmpfs when running as
root (root ignores permission bits); with neither, those cases skip. The disk-full case
needs a small tmpfs (root); a path under a file is unwritable for everyone.

Every start costs seconds of imports, so all cases run concurrently in one fixture; the
converters' checks run before megatron-core is imported, so most cases end in a second.
The trainer's own error cases are in tests/test_faults.py and tests/test_trainer_errors.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from psft_megatron.conversion.checks import check_free_space
from psft_megatron.conversion.errors import ConversionError, describe, writing_to

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("convert_hf_to_megatron", "convert_megatron_to_hf", "prepare_data", "score")
# pip puts the console scripts beside the interpreter (the virtual environment's bin/).
BIN = Path(sys.executable).parent
CONSOLE_SCRIPTS = tuple(sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]))
PATH_WRAPPERS = tuple(sorted(str(p.relative_to(ROOT)) for d in ("launch", "tools") for p in (ROOT / d).glob("*.py")))


@dataclass
class Case:
    """One run of a tool and what its error line must name."""

    tool: str
    args: list[Any]
    expect: list[str] = field(default_factory=list)  # substrings of the one error line
    any_of: list[str] = field(default_factory=list)  # ... and at least one of these (the OS error)
    absent: list[Path] = field(default_factory=list)  # outputs that must not exist afterwards
    needs_checkpoint: bool = False  # runs after the successful conversion
    skip: str | None = None  # why this machine cannot build the input


BAD_INPUT = [
    "hf:unsupported_model_type", "hf:missing_config", "hf:missing_folder", "hf:truncated_safetensors",
    "hf:corrupt_header", "hf:output_exists", "hf:read_only_output", "hf:output_under_a_file", "hf:disk_full",
    "mg:missing", "mg:not_a_checkpoint", "mg:truncated_distcp", "mg:corrupt_common_pt", "mg:read_only_output",
    "data:missing_source", "data:empty_file", "data:every_sample_dropped", "data:malformed_line",
    "data:read_only_out", "data:out_under_a_file", "data:missing_tokenizer", "data:missing_source_yaml",
    "score:missing_checkpoint", "score:missing_data", "score:checkpoint_is_a_file",
]
# One or more bad-input cases per entry point beyond the tools above (named by entry point first).
ENTRY_BAD_INPUT = [
    "psft-train:missing_recipe", "psft-plan:unknown_gpu", "psft-convert-hf:missing_folder",
    "psft-export-hf:missing_checkpoint", "psft-convert-gguf:missing_gguf", "psft-prepare-data:missing_tokenizer",
    "psft-evaluate:missing_checkpoint", "psft-evaluate:nll_checkpoint_is_a_file", "psft-compare:missing_run",
    "-m psft_megatron.train:missing_recipe", "launch/pretrain_psft.py:unknown_key",
    "tools/convert_gguf_to_hf.py:output_exists", "tools/evaluate.py:bad_data_option",
    "tools/compare_runs.py:folder_without_runs", "tools/make_tiny_dataset.py:out_under_a_file",
    "tools/make_tiny_dataset.py:no_samples",
]
USAGE = [f"{tool}:{kind}" for tool in TOOLS for kind in ("no_arguments", "unknown_flag")]
HELP = [f"{tool}:help" for tool in TOOLS] + [f"{script}:help" for script in CONSOLE_SCRIPTS] + \
    ["-m psft_megatron.train:help"]


def _command(tool: str) -> list[str]:
    """The command line of an entry point: a console script, ``-m MODULE``, a file path, or a tools/ name."""
    if tool.startswith("psft-"):
        return [str(BIN / tool)]
    if tool.startswith("-m "):
        return [sys.executable, "-m", tool[3:]]
    return [sys.executable, str(ROOT / (tool if "/" in tool else f"tools/{tool}.py"))]


def _tool(tool: str, args: list[Any], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run an entry point from ``cwd`` (outside the repository), as a user would: no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1")
    cmd = [*_command(tool), *map(str, args)]
    if not Path(cmd[0]).exists():
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]} not found: `pip install -e .` installs it")
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _mount_tmpfs(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> Iterator[Path | None]:
    """A folder this process cannot write, or None."""
    folder = tmp_path_factory.mktemp("read_only")
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root: permission bits do not apply; a read-only mount does
        folder.chmod(0o755)
        if not _mount_tmpfs(folder, "ro,size=64k"):
            yield None
            return
        try:
            assert not os.access(folder, os.W_OK)
            yield folder
        finally:
            _unmount(folder)
        return
    try:
        yield folder
    finally:
        folder.chmod(0o755)


def _tiny_llama(folder: Path) -> int:
    """Save a tiny random Llama with transformers; returns its tensor bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _damaged_hf(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _edit_config(**changes: Any) -> Any:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _corrupt_header(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts at byte 8
    (folder / "model.safetensors").write_bytes(bytes(data))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> tuple[Path, int]:
    """A tiny random Llama folder and its tensor bytes."""
    folder = tmp_path_factory.mktemp("hf") / "hf"
    return folder, _tiny_llama(folder)


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory, hf_model) -> Iterator[Path | None]:
    """A tmpfs with room for the model's tensors (the converter's up-front check passes) but
    not the checkpoint's own overhead, so it fills up while torch writes; None unless root."""
    folder = tmp_path_factory.mktemp("small_disk")
    size = -(-(hf_model[1] + 8192) // 4096) * 4096
    if not _mount_tmpfs(folder, f"size={size}"):
        yield None
        return
    try:
        yield folder
    finally:
        _unmount(folder)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_data, read_only, hf_model, small_disk) -> dict[str, Any]:
    """Every case's input and expectation."""
    root = tmp_path_factory.mktemp("cli")
    hf = hf_model[0]
    mg = root / "mg"  # written by the successful conversion
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    ro_skip = None if read_only else "no read-only location: not root and permission bits are ignored"
    ro = read_only or root / "unused"
    small = small_disk or root / "unused"

    bad = {tag: _damaged_hf(hf, root / f"hf_{tag}", edit) for tag, edit in {
        "arch": _edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
        "no_config": lambda d: (d / "config.json").unlink(),
        "truncated": lambda d: _truncate(d / "model.safetensors"),
        "header": _corrupt_header,
    }.items()}

    data, tok = tiny_data / "train.jsonl", tiny_data / "tokenizer"
    rows = data.read_text().splitlines()
    empty = root / "empty.jsonl"
    empty.write_text("")
    short = root / "three.jsonl"
    short.write_text("\n".join(rows[:3]) + "\n")
    malformed = root / "malformed.jsonl"
    malformed.write_text("\n".join(rows[:2]) + '\n{"prompt": "What is 1 plus 1?", "response": \n')
    existing = root / "existing_ckpt"
    existing.mkdir()
    score_data = root / "score.jsonl"
    score_data.write_text(json.dumps({"prompt": "What is 1 plus 1?", "response": "2"}) + "\n")

    def hf_case(src: Path, expect: list[str], out: Path | None = None, **kw: Any) -> Case:
        out = out or root / f"out_{len(cases)}"
        return Case("convert_hf_to_megatron", ["--hf", src, "--out", out], expect,
                    absent=[out, out.with_name(out.name + ".partial")], **kw)

    def mg_case(ckpt: Path, expect: list[str], out: Path | None = None, **kw: Any) -> Case:
        out = out or root / f"out_{len(cases)}"
        return Case("convert_megatron_to_hf", ["--ckpt", ckpt, "--out", out], expect,
                    absent=[out, out.with_name(out.name + ".partial")], **kw)

    def data_case(path: Path, expect: list[str], *extra: Any, out: Path | None = None, **kw: Any) -> Case:
        out = out or root / f"cache_{len(cases)}"
        args = ["--tokenizer", tok, "--template", "plain", "--out", out, *extra]
        if "--tokenizer" in extra:
            args = args[2:]
        return Case("prepare_data", args + (["--path", path] if path else []), expect, absent=[out], **kw)

    cases: dict[str, Case] = {}
    cases["hf:ok"] = Case("convert_hf_to_megatron", ["--hf", hf, "--out", mg])
    cases["hf:unsupported_model_type"] = hf_case(bad["arch"], [f"{bad['arch'] / 'config.json'}", "model_type='gpt2'",
                                                               "supported model types"])
    cases["hf:missing_config"] = hf_case(bad["no_config"], [f"{bad['no_config'] / 'config.json'} does not exist"])
    cases["hf:missing_folder"] = hf_case(root / "no_such_model", [f"{root / 'no_such_model'} does not exist"])
    cases["hf:truncated_safetensors"] = hf_case(bad["truncated"], [f"{bad['truncated'] / 'model.safetensors'} is truncated"])
    cases["hf:corrupt_header"] = hf_case(bad["header"], [f"{bad['header'] / 'model.safetensors'} has a corrupt "
                                                         "safetensors header"])
    cases["hf:output_exists"] = hf_case(hf, [f"{existing} exists", "--overwrite"], out=existing)
    cases["hf:output_exists"].absent = [existing.with_name(existing.name + ".partial")]  # the folder itself stays
    read_only_errors = ["Read-only file system", "Permission denied"]
    cases["hf:read_only_output"] = hf_case(hf, [f"cannot write {ro / 'out'}", "[Errno"], out=ro / "out", skip=ro_skip,
                                           any_of=read_only_errors)
    cases["hf:output_under_a_file"] = hf_case(hf, [f"cannot write {a_file / 'out'}", f"{a_file} is a file"],
                                              out=a_file / "out")
    cases["hf:disk_full"] = hf_case(hf, [f"could not write {small / 'mg'}"], out=small / "mg",
                                    any_of=["No space left on device", "(disk full?)"],
                                    skip=None if small_disk else "needs root to mount a small tmpfs")

    cases["mg:missing"] = mg_case(root / "no_such_ckpt", [f"{root / 'no_such_ckpt'} does not exist"])
    cases["mg:not_a_checkpoint"] = mg_case(hf, [f"{hf} is not a psft_megatron model checkpoint"])
    broken = {name: root / f"mg_{name}" for name in ("truncated", "common")}
    cases["mg:truncated_distcp"] = mg_case(broken["truncated"], [f"{broken['truncated'] / 'model' / '__0_0.distcp'} "
                                                                 "is truncated"], needs_checkpoint=True)
    cases["mg:corrupt_common_pt"] = mg_case(broken["common"], [f"{broken['common'] / 'model' / 'common.pt'} is "
                                                               "unreadable"], needs_checkpoint=True)
    cases["mg:read_only_output"] = mg_case(hf, [f"cannot write {ro / 'hf'}", "[Errno"], out=ro / "hf", skip=ro_skip,
                                           any_of=read_only_errors)

    nowhere = root / "nowhere.jsonl"
    cases["data:missing_source"] = data_case(nowhere, [f"{nowhere}: file not found"])
    cases["data:empty_file"] = data_case(empty, [f"{empty}: no samples to cache", "empty file"])
    cases["data:every_sample_dropped"] = data_case(short, [f"{short}: no samples to cache", "every sample was dropped",
                                                           "too_long: 3"], "--max-length", 4)
    cases["data:malformed_line"] = data_case(malformed, [f"{malformed}, line 3: malformed JSON"])
    cases["data:read_only_out"] = data_case(data, [f"cannot write the cache {ro / 'cache'}", "[Errno"],
                                            out=ro / "cache", skip=ro_skip, any_of=read_only_errors)
    cases["data:out_under_a_file"] = data_case(data, [f"cannot write the cache {a_file / 'cache'}",
                                                      f"{a_file} is a file"], out=a_file / "cache")
    cases["data:missing_tokenizer"] = data_case(data, [f"{root / 'no_tokenizer'}: tokenizer path not found"],
                                                "--tokenizer", root / "no_tokenizer")
    cases["data:missing_source_yaml"] = data_case(None, [f"cannot read --source {root / 'none.yaml'}",
                                                         "No such file or directory"], "--source", root / "none.yaml")

    cases["score:missing_checkpoint"] = Case(
        "score", ["--ckpt", root / "no_such_ckpt", "--data", score_data, "--out", root / "s1.jsonl",
                  "--tokenizer", tok], [f"{root / 'no_such_ckpt'} does not exist"], absent=[root / "s1.jsonl"])
    cases["score:missing_data"] = Case(
        "score", ["--ckpt", mg, "--data", nowhere, "--out", root / "s2.jsonl", "--tokenizer", tok],
        [f"{nowhere}: file not found"], absent=[root / "s2.jsonl"], needs_checkpoint=True)
    cases["score:checkpoint_is_a_file"] = Case(
        "score", ["--ckpt", a_file, "--data", score_data, "--out", root / "s3.jsonl"],
        [f"{a_file} is a file, not a checkpoint directory"], absent=[root / "s3.jsonl"])

    required = {"convert_hf_to_megatron": ["--hf", hf, "--out", root / "u1"],
                "convert_megatron_to_hf": ["--ckpt", mg, "--out", root / "u2"],
                "prepare_data": ["--tokenizer", tok, "--path", data, "--out", root / "u3"],
                "score": ["--ckpt", mg, "--data", score_data, "--out", root / "u4"]}
    for tool in TOOLS:
        cases[f"{tool}:no_arguments"] = Case(tool, [], ["the following arguments are required"])
        cases[f"{tool}:unknown_flag"] = Case(tool, [*required[tool], "--no-such-flag"],
                                             ["unrecognized arguments: --no-such-flag"])
    for name in HELP:
        cases[name] = Case(name.rsplit(":", 1)[0], ["--help"])
    cases.update(_entry_point_cases(root, tiny_data, a_file, score_data))
    return {"cases": cases, "mg": mg, "broken": broken, "cwd": tmp_path_factory.mktemp("elsewhere")}


def _entry_point_cases(root: Path, tiny_data: Path, a_file: Path, score_data: Path) -> dict[str, Case]:
    """ENTRY_BAD_INPUT's cases: each entry point's own bad input, checked before any weight is built."""
    tiny = ROOT / "recipes" / "tiny_cpu.yaml"
    runs = root / "no_runs_here"
    runs.mkdir()
    existing = root / "existing_hf"
    existing.mkdir()
    evaluate_ok = importlib.util.find_spec("lm_eval") and importlib.util.find_spec("math_verify")
    return {
        "psft-train:missing_recipe": Case("psft-train", [root / "none.yaml"],
                                          [f"bad recipe: recipe file not found: {root / 'none.yaml'}"]),
        "psft-plan:unknown_gpu": Case("psft-plan", [tiny, "--gpu", "b300"], ["--gpu b300: unknown GPU; use one of"]),
        "psft-convert-hf:missing_folder": Case("psft-convert-hf", ["--hf", root / "no_hf", "--out", root / "e1"],
                                               [f"{root / 'no_hf'} does not exist"], absent=[root / "e1"]),
        "psft-export-hf:missing_checkpoint": Case("psft-export-hf", ["--ckpt", root / "no_ckpt", "--out", root / "e2"],
                                                  [f"{root / 'no_ckpt'} does not exist"], absent=[root / "e2"]),
        "psft-convert-gguf:missing_gguf": Case("psft-convert-gguf", ["--gguf", root / "no.gguf", "--out", root / "e3"],
                                               [f"{root / 'no.gguf'}: no such file (--gguf)"], absent=[root / "e3"]),
        "psft-prepare-data:missing_tokenizer": Case(
            "psft-prepare-data", ["--tokenizer", root / "no_tok", "--path", tiny_data / "train.jsonl",
                                  "--out", root / "e4"], [f"{root / 'no_tok'}: tokenizer path not found"],
            absent=[root / "e4"]),
        "psft-evaluate:missing_checkpoint": Case(
            "psft-evaluate", ["--ckpt", root / "no_ckpt", "--tasks", "gsm8k", "--out", root / "e5"],
            [f"{root / 'no_ckpt'} does not exist (--ckpt)" if evaluate_ok else "not installed"], absent=[root / "e5"]),
        "psft-evaluate:nll_checkpoint_is_a_file": Case(
            "psft-evaluate", ["--mode", "nll", "--ckpt", a_file, "--data", score_data, "--out", root / "e6.jsonl"],
            [f"{a_file} is a file, not a checkpoint directory"], absent=[root / "e6.jsonl"]),
        "psft-compare:missing_run": Case("psft-compare", [root / "no_run", "--out", root / "e7"],
                                         [f"{root / 'no_run'}: run folder not found"]),
        "-m psft_megatron.train:missing_recipe": Case("-m psft_megatron.train", [root / "none.yaml"],
                                                      ["bad recipe: recipe file not found"]),
        "launch/pretrain_psft.py:unknown_key": Case(
            "launch/pretrain_psft.py", [tiny, "training.trian_steps=4", "--validate-only"],
            ["bad recipe: command-line override: unknown key training.trian_steps"]),
        "tools/convert_gguf_to_hf.py:output_exists": Case(
            "tools/convert_gguf_to_hf.py", ["--gguf", root / "no.gguf", "--out", existing],
            [f"{existing} exists; choose another output folder"]),
        "tools/evaluate.py:bad_data_option": Case(
            "tools/evaluate.py", ["--ckpt", root / "no_ckpt", "--tasks", "gsm8k", "--data", "gsm8k", "--out", root / "e8"],
            ["--data 'gsm8k': expected KEY=VALUE" if evaluate_ok else "not installed"], absent=[root / "e8"]),
        "tools/compare_runs.py:folder_without_runs": Case("tools/compare_runs.py", [runs, "--out", root / "e9"],
                                                          [f"{runs}: neither metrics.jsonl nor an evaluation summary.json"]),
        "tools/make_tiny_dataset.py:out_under_a_file": Case("tools/make_tiny_dataset.py", [a_file / "tiny"],
                                                            ["Not a directory", f"{a_file / 'tiny'}"]),
        "tools/make_tiny_dataset.py:no_samples": Case("tools/make_tiny_dataset.py", [root / "e10", "--train", "0"],
                                                      ["--train 0", "need at least one training sample"],
                                                      absent=[root / "e10"]),
    }


@pytest.fixture(scope="module")
def results(work) -> dict[str, subprocess.CompletedProcess]:
    """Run every case: first the conversion and all that do not need it, then the rest."""
    cases: dict[str, Case] = work["cases"]

    def run_all(names: list[str]) -> dict[str, subprocess.CompletedProcess]:
        # The slow starts (megatron-core imported) first, so the quick ones fill the gaps.
        heavy = ("hf:ok", "hf:disk_full", "mg:not_a_checkpoint", "mg:truncated_distcp", "mg:corrupt_common_pt",
                 "psft-train:missing_recipe", "-m psft_megatron.train:missing_recipe", "launch/pretrain_psft.py:unknown_key")
        names = sorted(names, key=lambda n: n not in heavy)
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {n: pool.submit(_tool, cases[n].tool, cases[n].args, work["cwd"]) for n in names}
            return {n: f.result() for n, f in futures.items()}

    runnable = [n for n, c in cases.items() if c.skip is None]
    out = run_all([n for n in runnable if not cases[n].needs_checkpoint])
    ok = out["hf:ok"]
    assert ok.returncode == 0 and (work["mg"] / "psft_meta.json").is_file(), ok.stderr[-3000:]
    for name, target in work["broken"].items():
        shutil.copytree(work["mg"], target)
        if name == "truncated":
            _truncate(target / "model" / "__0_0.distcp", 1 / 3)  # an incomplete copy
        else:
            (target / "model" / "common.pt").write_bytes(b"garbage")
    out.update(run_all([n for n in runnable if cases[n].needs_checkpoint]))
    return out


def test_every_entry_point_has_a_bad_input_case():
    """A new console script or path wrapper needs a case here (the tools/ names of BAD_INPUT count)."""
    tools_cases = {f"tools/{tool}.py" for tool in TOOLS}
    covered = {name.rsplit(":", 1)[0] for name in ENTRY_BAD_INPUT} | tools_cases
    assert set(CONSOLE_SCRIPTS) | set(PATH_WRAPPERS) | {"-m psft_megatron.train"} <= covered
    assert {name.split(":")[0] for name in BAD_INPUT} == {"hf", "mg", "data", "score"}  # the TOOLS' cases


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_INPUT + ENTRY_BAD_INPUT)
def test_bad_input_is_one_error_line(name, work, results):
    case = work["cases"][name]
    if case.skip:
        pytest.skip(case.skip)
    run = results[name]
    assert "Traceback" not in run.stdout + run.stderr, run.stderr[-3000:]
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0] == run.stderr.rstrip("\n").splitlines()[-1]  # the last word, not buried in a log
    for text in case.expect:
        assert text in lines[0], (text, lines[0])
    assert not case.any_of or any(text in lines[0] for text in case.any_of), (case.any_of, lines[0])
    if name in ("mg:missing", "score:missing_checkpoint"):
        assert "psft_meta.json" not in lines[0]  # says the path does not exist, not that a file is missing
    for path in case.absent:
        assert not path.exists(), f"{name} left {path}"
    if case.tool == "prepare_data":
        out = Path(case.args[case.args.index("--out") + 1])
        if out.parent.is_dir():
            assert not list(out.parent.glob(f".{out.name}.tmp-*")), "a temp cache folder was left"


@pytest.mark.slow
@pytest.mark.parametrize("name", USAGE)
def test_usage_errors_exit_2(name, work, results):
    run = results[name]
    assert run.returncode == 2 and "Traceback" not in run.stdout + run.stderr, run.stderr[-3000:]
    error = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert len(error) == 1 and work["cases"][name].expect[0] in error[0], run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", HELP)
def test_help_documents_exit_status_2(name, results):
    run = results[name]
    assert run.returncode == 0, run.stderr[-3000:]
    text = " ".join(run.stdout.split())
    assert re.search(r"Exit status: 0 done[^;]*; 2 ", text) and 'one "error: ..." line' in text, text


@pytest.mark.slow  # imports megatron-core (model_checkpoint builds models too)
def test_read_meta_says_what_is_wrong_with_the_path(tmp_path):
    """The library's reader of every checkpoint, and the CLIs' torch-free check in the same words."""
    from psft_megatron.checkpoint.model_checkpoint import CheckpointError, read_meta
    from psft_megatron.conversion.checks import check_checkpoint_dir

    missing, a_file, folder = tmp_path / "missing", tmp_path / "a_file", tmp_path / "folder"
    a_file.write_text("x")
    folder.mkdir()
    for path, words in ((missing, f"{missing} does not exist"), (a_file, f"{a_file} is a file, not a checkpoint")):
        with pytest.raises(CheckpointError) as slow:
            read_meta(path)
        with pytest.raises(ConversionError) as fast:
            check_checkpoint_dir(path)
        assert str(slow.value) == str(fast.value) and str(slow.value).startswith(words)
    with pytest.raises(CheckpointError, match=f"^{folder} is not a psft_megatron model checkpoint: no psft_meta.json$"):
        read_meta(folder)
    (folder / "psft_meta.json").write_text('{"format": "psft-meg')  # cut short, e.g. by a full disk
    with pytest.raises(CheckpointError, match=f"^{folder / 'psft_meta.json'} is unreadable: JSONDecodeError"):
        read_meta(folder)
    (tmp_path / "missing.partial").mkdir()
    with pytest.raises(CheckpointError, match="does not exist .only an unfinished .partial directory does"):
        read_meta(missing)


def test_free_space_check_names_the_disk(tmp_path):
    check_free_space(tmp_path / "out", 1)
    with pytest.raises(ConversionError, match=rf"not enough disk space for {tmp_path / 'out'}: .* free, the tensors"):
        check_free_space(tmp_path / "out", shutil.disk_usage(tmp_path).free + 2**30)


def test_a_failed_dist_checkpoint_write_is_one_line(tmp_path):
    """torch wraps the writer's error in a CheckpointException (a BaseException), one per rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    def failed(inner: BaseException) -> CheckpointException:
        return CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (inner, traceback.StackSummary())})

    full = OSError(28, "No space left on device", str(tmp_path / "x.distcp"))
    assert describe(failed(full)) == f"[Errno 28] No space left on device: '{tmp_path / 'x.distcp'}'"
    with pytest.raises(ConversionError, match=r"could not write .*out: \[Errno 28\] No space left on device"):
        with writing_to(tmp_path / "out", 1):
            raise failed(full)
    # torch's zip writer reports a full disk without an OS error: the disk's free space decides.
    zip_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(ConversionError, match=r"RuntimeError: \[enforce fail.*free, the tensors take .* \(disk full\?\)"):
        with writing_to(tmp_path / "out", shutil.disk_usage(tmp_path).free + 2**30):
            raise failed(zip_error)
    with pytest.raises(CheckpointException):  # room to spare: a bug, raised as it is
        with writing_to(tmp_path / "out", 1):
            raise failed(zip_error)
