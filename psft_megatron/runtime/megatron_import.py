"""Import megatron-core without ``torch.compile``-ing its GPU fusion kernels when CUDA is absent.

megatron-core wraps its fused kernels (bias + GeLU/SwiGLU, bias-dropout-add, ...) in
``torch.compile`` when their modules are imported (``megatron.core.jit.jit_fuser``), and
``megatron.core``'s ``__init__`` imports them all. Each call imports TorchDynamo and Inductor:
about 3 CPU-seconds per process, some 40% of importing megatron-core, paid by every rank,
tool and test process. Without CUDA these kernels never run (``model/build.py`` turns every
fusion off unless TransformerEngine is in use), and megatron's own switch,
``jit.disable_jit_fuser()``, only acts after the decorators have run. So while
``megatron.core`` is first imported, ``torch.compile`` is the identity, then it is restored.
``megatron.core.jit.jit_fuser`` keeps the identity, so megatron modules imported later stay
eager too: on CPU megatron-core runs as plain PyTorch. With CUDA nothing changes at all.

:func:`install` adds the import hook; ``psft_megatron/__init__.py`` calls it, so it is in place
before any of our modules imports megatron. Importing this module costs nothing (no torch).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterator, Sequence

__all__ = ["eager_torch_compile", "install"]

_TARGET = "megatron.core"


def _identity_compile(model: Any = None, **_: Any) -> Any:
    """``torch.compile``'s two call forms, ``compile(fn)`` and ``compile(**options)(fn)``, doing nothing."""
    return model if model is not None else (lambda fn: fn)


@contextmanager
def eager_torch_compile() -> Iterator[None]:
    """``torch.compile`` returns its argument unchanged inside the block."""
    import torch

    real = torch.compile
    torch.compile = _identity_compile  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = real


class _EagerLoader(importlib.abc.Loader):
    """megatron.core's own loader, run with :func:`eager_torch_compile` when there is no CUDA."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        import torch

        if torch.cuda.is_available():
            self.inner.exec_module(module)
            return
        with eager_torch_compile():
            self.inner.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...: the real loader's
        return getattr(self.inner, name)


class _MegatronFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _EagerLoader(spec.loader)
        return spec


def install() -> None:
    """Put the hook in front of the import system (idempotent; too late once megatron.core is imported)."""
    if _TARGET in sys.modules or any(isinstance(f, _MegatronFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MegatronFinder())
