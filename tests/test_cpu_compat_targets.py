"""Fails loudly when a megatron-core upgrade moves or changes a place the CPU routes patch.

Each entry of ``cpu_compat.PATCH_TARGETS`` names a module, an attribute and a fragment of
megatron-core source showing the CUDA assumption. If the attribute is gone or the fragment
no longer stands in it, the patch is stale: re-check that place on CPU (see
../shared/notes/megatron-core-on-cpu.md) and update cpu_compat.py. The same holds for
``training.optimizer.TORCH_ADAM_TARGETS``: where the distributed optimizer goes wrong over
torch's AdamW on any device (fixed in psft_megatron/training/optimizer.py).
"""

from __future__ import annotations

import ast
import importlib
import inspect
from importlib.metadata import version

import pytest
from packaging.version import Version

from psft_megatron.runtime import cpu_compat
from psft_megatron.training.optimizer import TORCH_ADAM_TARGETS


def _definition_source(module, name: str) -> str | None:
    source = inspect.getsource(module)
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(source, node)
    return None


def test_megatron_core_version_is_the_patched_line():
    v = Version(version("megatron-core"))
    assert Version("0.16.1") <= v < Version("0.17"), (
        f"megatron-core {v} is outside the range cpu_compat was written for (>=0.16.1,<0.17): "
        "re-validate every PATCH_TARGET and the multi-process tests, then move the pin in pyproject.toml"
    )


@pytest.mark.parametrize(
    "target",
    cpu_compat.PATCH_TARGETS + TORCH_ADAM_TARGETS,
    ids=lambda t: f"{t.module}:{t.attribute or 'torch'}:{t.fragment[:40]}",
)
def test_patch_target_still_in_place(target):
    module = importlib.import_module(target.module)
    source = inspect.getsource(module)
    if not target.attribute:
        assert "import torch" in source, f"{target.module} no longer imports torch: the torch proxy is stale"
        assert target.fragment in source, (
            f"{target.module} no longer contains {target.fragment!r} ({target.why}): "
            "the CUDA assumption moved; re-check this module on CPU and update cpu_compat"
        )
        return
    assert hasattr(module, target.attribute), f"{target.module}.{target.attribute} is gone: update cpu_compat"
    own = _definition_source(module, target.attribute)
    where = own if own is not None else source
    assert target.fragment in where, (
        f"{target.module}.{target.attribute} no longer contains {target.fragment!r} ({target.why}): "
        "the patch may be stale or wrong; re-check on CPU and update cpu_compat"
    )


def test_apply_routes_cuda_to_cpu_only_when_absent():
    import torch

    if torch.cuda.is_available():
        assert cpu_compat.needed() is False
        pytest.skip("CUDA present: the routes must stay off")
    assert cpu_compat.apply() is True
    assert cpu_compat.apply() is True  # idempotent
    schedules = importlib.import_module("megatron.core.pipeline_parallel.schedules")
    made = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert made.device.type == "cpu"
    assert schedules.torch.Tensor is torch.Tensor  # everything else is the real torch
    assert torch.cuda.current_device() == torch.device("cpu")


def test_megatron_jit_fuser_is_still_torch_compile():
    """runtime/megatron_import.py relies on megatron wrapping its fusions in torch.compile at import."""
    import megatron.core.jit as jit

    source = inspect.getsource(jit)
    assert "jit_fuser = torch.compile" in source, (
        "megatron.core.jit no longer binds jit_fuser to torch.compile: re-check runtime/megatron_import.py"
    )


def test_eager_torch_compile_covers_both_call_forms():
    import torch

    from psft_megatron.runtime.megatron_import import eager_torch_compile

    def f(x):
        return x + 1

    real = torch.compile
    with eager_torch_compile():
        assert torch.compile(f) is f
        assert torch.compile(mode="max-autotune")(f) is f
    assert torch.compile is real


_IMPORT_PROBE = """
import sys, torch, psft_megatron, megatron.core, megatron.core.models.gpt, megatron.core.optimizer
import megatron.core.jit as jit
print(int('torch._dynamo' in sys.modules), int(torch.compile.__module__ == 'torch'), jit.jit_fuser.__name__)
"""


@pytest.mark.slow  # starts Python
def test_megatron_imports_without_dynamo_on_cpu():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("with CUDA megatron's fusions are compiled as usual")
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True)
    dynamo, restored, fuser = out.stdout.split()
    assert (dynamo, restored, fuser) == ("0", "1", "_identity_compile"), out.stdout


def test_cuda_type_names_only_renames_cpu_type_queries():
    """The distributed optimizer's route: ``.type()`` names CPU tensors as CUDA ones, casts still cast."""
    import torch

    t32, t16 = torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)
    with cpu_compat._cuda_type_names():
        assert t32.type() == "torch.cuda.FloatTensor" and t16.type() == "torch.cuda.BFloat16Tensor"
        assert torch.nn.Parameter(t32).type() == "torch.cuda.FloatTensor"
        cast = t32.type(torch.float64)
        assert cast.dtype == torch.float64 and cast.device.type == "cpu"
    assert t32.type() == "torch.FloatTensor"  # restored on exit
