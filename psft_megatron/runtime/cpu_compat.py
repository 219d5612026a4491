"""Route megatron-core's CUDA assumptions to the CPU, so every parallel feature runs on gloo.

megatron-core 0.16.x is written for GPUs. On a CPU-only torch it builds models,
process groups and dist checkpoints fine, but a handful of places hard-code CUDA:

* ``torch.cuda.current_device()`` as a ``device=`` argument (~175 call sites, e.g.
  ``RotaryEmbedding.get_emb``, ``GlobalMemoryBuffer.get_tensor``, p2p communication);
* ``device="cuda"`` literals in the pipeline schedules, the optimizer, grad-norm
  clipping and the DDP grad buffers;
* the RNG tracker (``CudaRNGStatesTracker``, ``model_parallel_cuda_manual_seed``),
  which saves and restores CUDA generator states;
* ``clip_grad_by_total_norm_fp32`` asserting ``grad.type() == 'torch.cuda.FloatTensor'``;
* ``LanguageModule.setup_embeddings_and_output_layer`` moving the tied embedding to
  the GPU (``weight.data.cuda()``) before syncing it across the pipeline ends;
* ``WrappedTorchNorm`` (the norm used when neither TransformerEngine nor apex is
  installed) refusing sequence parallelism outright;
* the distributed optimizer sorting parameters by ``param.type()`` ('torch.cuda.FloatTensor',
  a TypeError for anything else) and, when a checkpoint gathers its state shards, copying
  them to CUDA (``send_tensor.cuda()``) before the all-gather over DP;
* the MoE router's gating linear reading ``te_general_gemm``, a name ``moe_utils`` defines only
  when TransformerEngine imports (a NameError at the first routed token without TE, on any
  device: :func:`apply_moe_without_te`, which build_model also applies for MoE models on a GPU
  without TE).

:func:`apply` patches exactly these, and only when CUDA is absent, so GPU runs use
megatron-core untouched. Every patch is listed in :data:`PATCH_TARGETS` with a
fragment of the source it works around; ``tests/test_cpu_compat_targets.py``
fails loudly when a megatron-core upgrade moves or changes a target.

Nothing here changes numerics: the CPU generator stands in for the CUDA one, and
tensors created on "cuda" are created on the CPU instead.

The distributed optimizer's bucket collectives need no route: gloo (torch 2.13) runs
``reduce_scatter_tensor`` and ``all_gather_into_tensor``, inside megatron's
``_coalescing_manager`` too (tests/test_distributed_optimizer.py). Nor does expert parallelism
with the ``allgather`` token dispatcher: it gathers tokens and reduce-scatters expert outputs
over the TP x EP group with those same collectives. (The ``alltoall`` dispatcher is not routed:
its constructor creates a ``torch.cuda.Stream`` and it syncs split sizes through CUDA events;
the recipe check refuses it without CUDA.)
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = ["PATCH_TARGETS", "PatchTarget", "apply", "apply_moe_without_te", "is_applied", "needed"]


@dataclass(frozen=True)
class PatchTarget:
    """One place in megatron-core that assumes CUDA, and the source fragment that proves it."""

    module: str
    attribute: str  # "" when the patch is the module-level ``torch`` name itself
    fragment: str  # text expected in the target's source; gone means megatron changed here
    why: str


# Modules whose code creates tensors with device="cuda" or calls torch.cuda.* helpers
# (synchronize, RNG, streams). Their module-global ``torch`` is swapped for a proxy
# that maps those to the CPU; every other attribute is the real torch.
_TORCH_PROXY_MODULES: tuple[tuple[str, str], ...] = (
    ("megatron.core.pipeline_parallel.schedules", 'device="cuda"'),
    ("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.current_device()"),
    ("megatron.core.optimizer.optimizer", "device='cuda'"),
    ("megatron.core.optimizer.clip_grads", "device='cuda'"),
    ("megatron.core.distributed.param_and_grad_buffer", 'device="cuda"'),
    ("megatron.core.tensor_parallel.random", "torch.cuda.get_rng_state()"),
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", "torch.cuda.synchronize()"),
    ("megatron.core.dist_checkpointing.strategies.async_utils", "torch.cuda.synchronize()"),
    ("megatron.core.dist_checkpointing.exchange_utils", 'device="cuda"'),
    ("megatron.core.transformer.utils", 'device="cuda"'),  # the default causal mask
    ("megatron.core.tensor_parallel.data", "device='cuda'"),  # broadcast_data over TP
    ("megatron.core.utils", 'l2_cuda = torch.tensor([float(l2_reduced)], dtype=torch.float, device="cuda")'),
)

PATCH_TARGETS: tuple[PatchTarget, ...] = tuple(
    PatchTarget(m, "", frag, "creates tensors on 'cuda' or calls torch.cuda helpers")
    for m, frag in _TORCH_PROXY_MODULES
) + (
    PatchTarget(
        "megatron.core.tensor_parallel.random",
        "_get_cuda_rng_state",
        "torch.cuda.default_generators",
        "RNG tracker reads the CUDA generator state",
    ),
    PatchTarget(
        "megatron.core.tensor_parallel.random",
        "_set_cuda_rng_state",
        "torch.cuda.default_generators",
        "RNG tracker writes the CUDA generator state",
    ),
    PatchTarget(
        "megatron.core.optimizer.clip_grads",
        "clip_grad_by_total_norm_fp32",
        "torch.cuda.FloatTensor",
        "asserts CUDA float grads before clipping",
    ),
    PatchTarget(
        "megatron.core.optimizer.optimizer",
        "clip_grad_by_total_norm_fp32",
        "from .clip_grads import clip_grad_by_total_norm_fp32",
        "the optimizer imported the clipping function by name",
    ),
    PatchTarget(
        "megatron.core.transformer.torch_norm",
        "WrappedTorchNorm",
        "sequence parallel not supported by torch LayerNorm",
        "the torch-norm fallback refuses sequence parallelism",
    ),
    PatchTarget(
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule",
        "weight.data = weight.data.cuda()",
        "tied embeddings at PP > 1 are moved to CUDA before the first/last-stage all-reduce",
    ),
    PatchTarget(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        "elif model_param.type() == 'torch.cuda.FloatTensor':",
        "sorts parameters by their CUDA type name and raises TypeError for a CPU tensor",
    ),
    PatchTarget(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        ") = self._build_model_and_main_param_groups(",
        "that sorting runs from __init__, which the route wraps",
    ),
    PatchTarget(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer",
        "send_tensor = send_tensor.cuda()",
        "a checkpoint save gathers the state shards through CUDA copies (get_parameter_state_dp_zero)",
    ),
    PatchTarget(
        "megatron.core.utils",
        "GlobalMemoryBuffer",
        "torch.cuda.current_device()",
        "one of many torch.cuda.current_device() call sites (patched once, in torch.cuda)",
    ),
    PatchTarget(
        "megatron.core.transformer.moe.moe_utils",
        "RouterGatingLinearFunction",
        "if te_general_gemm is not None and router_dtype != torch.float64:",
        "the MoE router's gating linear reads te_general_gemm, defined only when TransformerEngine imports",
    ),
    PatchTarget(
        "megatron.core.transformer.moe.router",
        "Router",
        "self.weight.data = self.weight.data.to(device=torch.cuda.current_device())",
        "the router moves its weight to torch.cuda.current_device() on every forward (the CPU under the route)",
    ),
)

_applied = False
_CPU = torch.device("cpu")


def needed() -> bool:
    """True when CUDA is absent and megatron-core needs the CPU routes."""
    return not torch.cuda.is_available()


def is_applied() -> bool:
    return _applied


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, an index, a cuda torch.device) to the CPU."""
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _route_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "factory")
    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside patched modules: RNG and syncs go to the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def get_rng_state(device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = "cuda") -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)


class _CpuTorch(types.ModuleType):
    """A view of ``torch`` whose tensor factories put "cuda" tensors on the CPU."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like")

    def __init__(self) -> None:
        super().__init__("torch")
        for name in self._FACTORIES:
            setattr(self, name, _route_device(getattr(torch, name)))
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    # The CPU generator plays the role of the CUDA one: dropout and init draw from it on CPU.
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _clip_grad_by_total_norm_fp32(
    parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
) -> None:
    """megatron's clipping minus its CUDA-type assertion (same coefficient, same in-place scaling)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        if g.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"clip_grad_by_total_norm_fp32 expects fp32/bf16 grads, got {g.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_torch_norm(torch_norm: types.ModuleType) -> None:
    """Let the torch-norm fallback run under sequence parallelism.

    With SP each TP rank normalises its own slice of the sequence with a full copy
    of the norm weights, so the weights' grads must be summed over TP. megatron's
    ``finalize_model_grads`` already does that for params marked ``sequence_parallel``:
    build the norm without the flag and mark its params.
    """
    cls = torch_norm.WrappedTorchNorm
    original_new = cls.__new__

    def __new__(wrapped_cls: type, config: Any, hidden_size: int, eps: float = 1e-5, *args: Any, **kwargs: Any) -> Any:
        if not getattr(config, "sequence_parallel", False):
            return original_new(wrapped_cls, config, hidden_size, eps, *args, **kwargs)
        # A shallow copy: re-running TransformerConfig's validation is not needed to flip one flag.
        plain = copy.copy(config)
        object.__setattr__(plain, "sequence_parallel", False)
        module = original_new(wrapped_cls, plain, hidden_size, eps, *args, **kwargs)
        for p in module.parameters():
            p.sequence_parallel = True
        return module

    cls.__new__ = staticmethod(__new__)  # type: ignore[assignment]
    cls._psft_original_new = original_new  # type: ignore[attr-defined]


def _patch_tied_embedding_setup(language_module: types.ModuleType) -> None:
    """Run ``setup_embeddings_and_output_layer`` with ``Tensor.cuda`` as the identity.

    Its only CUDA assumption is ``weight.data = weight.data.cuda()`` before the all-reduce
    that gives the first and last pipeline stages the same tied embedding; on a CPU-only
    torch ``.cuda()`` can only raise, so for the duration of this call it keeps the tensor.
    """
    cls = language_module.LanguageModule
    original = cls.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self: Any) -> None:
        with _cuda_keeps_tensors():
            original(self)

    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


@contextlib.contextmanager
def _cuda_keeps_tensors() -> Iterator[None]:
    """Within the block, ``tensor.cuda()`` returns the tensor itself (on a CPU-only torch it can only raise)."""
    real_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda t, *a, **k: t  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = real_cuda  # type: ignore[method-assign]


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    """Within the block, ``tensor.type()`` (no arguments) names a CPU tensor as its CUDA twin.

    megatron's optimizers sort parameters by ``param.type()`` string ('torch.cuda.FloatTensor',
    'torch.cuda.BFloat16Tensor', ...) and raise on anything else. A CPU tensor of the same dtype
    belongs in the same group; every other use of ``Tensor.type`` (casts) is untouched.
    """
    real_type = torch.Tensor.type

    def type_(t: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or t.device.type != "cpu":
            return real_type(t, *args, **kwargs)
        return real_type(t).replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.Tensor.type = real_type  # type: ignore[method-assign]


def _patch_distributed_optimizer(distrib_optimizer: types.ModuleType) -> None:
    """Build ``DistributedOptimizer`` with CPU params sorted as the CUDA params of the same dtype.

    Its ``__init__`` (through ``_build_model_and_main_param_groups``) raises TypeError unless
    ``param.type()`` is a 'torch.cuda.*Tensor' string; the shards it builds are views of the
    same buffers whatever the device. Saving gathers state shards through ``.cuda()`` copies.
    """
    cls = distrib_optimizer.DistributedOptimizer
    original_init = cls.__init__
    original_gather = cls.get_parameter_state_dp_zero

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with _cuda_type_names():
            original_init(self, *args, **kwargs)

    # The checkpoint's fully reshardable format gathers every DP rank's state shards with
    # ``send_tensor.cuda()`` then ``all_gather`` over the DP group (gloo on CPU): keep them on the CPU.
    def get_parameter_state_dp_zero(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _cuda_keeps_tensors():
            return original_gather(self, *args, **kwargs)

    cls.__init__ = __init__
    cls.get_parameter_state_dp_zero = get_parameter_state_dp_zero


def apply_moe_without_te() -> None:
    """Give megatron's ``moe_utils`` the ``te_general_gemm = None`` it means to have without
    TransformerEngine, so the router's gating linear takes its torch ``mm`` branch (megatron's own
    fallback, same numerics). Idempotent; a no-op where TransformerEngine defined the name."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply(force: bool = False) -> bool:
    """Apply the CPU routes once, if CUDA is absent (or ``force``). Returns whether they are active."""
    global _applied
    if _applied:
        return True
    if not (force or needed()):
        return False

    # One global patch instead of ~175 call sites: on a CPU-only torch this function
    # can only raise, so answering "cpu" cannot change any working code path.
    torch.cuda.current_device = lambda: _CPU  # type: ignore[assignment]

    proxy = _CpuTorch()
    for module_name, _ in _TORCH_PROXY_MODULES:
        importlib.import_module(module_name).torch = proxy

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _get_rng_state
    random._set_cuda_rng_state = _set_rng_state

    for module_name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        importlib.import_module(module_name).clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

    _patch_torch_norm(importlib.import_module("megatron.core.transformer.torch_norm"))
    _patch_tied_embedding_setup(importlib.import_module("megatron.core.models.common.language_module.language_module"))
    _patch_distributed_optimizer(importlib.import_module("megatron.core.optimizer.distrib_optimizer"))
    apply_moe_without_te()
    _applied = True
    return True
