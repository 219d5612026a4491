"""GPU models the plan knows (memory and dense bf16 peak), and what a job loses besides its tensors."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPUS", "GpuSpec", "detect_gpu", "DEFAULT_MFU", "FRAMEWORK_RESERVE", "USABLE_FRACTION", "GiB", "MiB"]

GiB = float(1 << 30)
MiB = 1 << 20

# What a job holds besides its tensors: the CUDA context, cuBLAS/TransformerEngine workspaces
# and NCCL's buffers for each communicator (about 1-3 GiB in total on 8-GPU nodes).
FRAMEWORK_RESERVE = int(2.5 * GiB)
# Share of the GPU the caching allocator can actually fill: long-sequence training fragments
# it (blocks of many sizes come and go every micro-batch).
USABLE_FRACTION = 0.92
DEFAULT_MFU = 0.40


@dataclass(frozen=True)
class GpuSpec:
    """A GPU model: the memory it reports and its dense bf16 peak."""

    name: str
    memory_bytes: int
    peak_flops: float | None  # dense bf16 FLOP/s; None: unknown (no time estimate)


# Memory as nvidia-smi reports it (MiB); peaks are NVIDIA's dense bf16 figures (SXM parts).
GPUS: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec("A100 40GB", 40960 * MiB, 312e12),
    "a100-80gb": GpuSpec("A100 80GB", 81920 * MiB, 312e12),
    "h100-80gb": GpuSpec("H100 80GB", 81559 * MiB, 989e12),
    "h200-141gb": GpuSpec("H200 141GB", 143771 * MiB, 989e12),
}


def detect_gpu() -> GpuSpec | None:
    """This machine's first CUDA device (None without one); its peak from :data:`GPUS` by name."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    peak = None
    for key, spec in GPUS.items():
        if key.split("-")[0] in props.name.lower() and abs(spec.memory_bytes - props.total_memory) < 0.05 * spec.memory_bytes:
            peak = spec.peak_flops
    return GpuSpec(props.name, int(props.total_memory), peak)
