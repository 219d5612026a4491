"""psft-megatron: Proximal Supervised Fine-Tuning on Megatron-Core.

Layers, lowest first (imports only flow down; ``tests/test_layering.py`` enforces it):
``errors`` -> ``config`` -> ``runtime`` | ``loss`` | ``data`` -> ``model`` -> ``checkpoint`` ->
``conversion`` -> ``evaluation`` -> ``training`` -> ``recipe`` -> ``preflight`` | ``plan`` ->
``run`` -> ``cli`` (the ``psft-*`` commands) -> ``train``; ``testing`` sits beside the top for
tests and benchmarks. Library entry points: :func:`psft_megatron.run.run` and
:func:`psft_megatron.recipe.load_recipe`.
"""

from psft_megatron.runtime.megatron_import import install as _install_megatron_import_hook

# Before any module of ours imports megatron-core: without CUDA, skip compiling its GPU fusion
# kernels at import (about 3 CPU-seconds per process; see runtime/megatron_import.py).
_install_megatron_import_hook()
