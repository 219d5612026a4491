"""Random initial weights that do not depend on the parallel layout.

megatron-core draws initial weights from one RNG stream per rank, in the order each
rank builds its layers: a fresh model at PP=2 (or with another VP split) gets different
weights than at PP=1, so the same recipe gives different curves. A converted checkpoint
does not have this problem; a random start (tests, benchmarks, the README's toy job)
should not either. Here every weight is redrawn from a generator seeded by the run seed,
the tensor's global checkpoint key and its layer, in fixed row blocks of the *global*
tensor, so each rank draws exactly the blocks it holds and every layout sees the same
model. Distributions are megatron's: normal(0, std) for weights, std / sqrt(2 L) for the
output projections of each layer (``linear_proj``, ``linear_fc2``), ones for norm
weights, zeros for biases.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable

import torch

__all__ = ["fill_rows", "init_layout_independent"]

ROW_BLOCK = 256  # rows of the global tensor drawn per generator seed
_SCALED = ("linear_proj.weight", "linear_fc2.weight")


def _std(key: str, ndim: int, std: float, num_layers: int) -> float | None:
    """Normal std for ``key``; None for norm weights (ones) and biases (zeros)."""
    if key.endswith(".bias") or ndim < 2:
        return None
    return std / math.sqrt(2.0 * num_layers) if key.endswith(_SCALED) else std


def _seed(seed: int, key: str, layer: tuple[int, ...], block: int) -> int:
    text = f"{seed}/{key}/{layer}/{block}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def fill_rows(sh: Any, seed: int, draw: Callable[[tuple[int, ...], torch.Generator], torch.Tensor]) -> None:
    """Write this rank's part of the global tensor behind ShardedTensor ``sh`` into ``sh.data``.

    The global tensor is drawn in blocks of ``ROW_BLOCK`` rows, ``draw(block_shape, generator)`` each
    (fp32), from a generator seeded by ``seed``, the key, the layer and the block: every layout
    writes the same global values, each rank only the blocks it holds.
    """
    p = sh.prepend_axis_num
    layer = tuple(sh.global_offset[:p])
    shape = tuple(sh.global_shape[p:])
    offset = tuple(sh.global_offset[p:])
    local = sh.data
    rows = local.shape[0]
    first, last = offset[0], offset[0] + rows
    cols = slice(offset[1], offset[1] + local.shape[1])
    for block in range(first // ROW_BLOCK, (last - 1) // ROW_BLOCK + 1):
        b0 = block * ROW_BLOCK
        n = min(ROW_BLOCK, shape[0] - b0)
        g = torch.Generator().manual_seed(_seed(seed, sh.key, layer, block))
        values = draw((n,) + shape[1:], g)
        lo, hi = max(first, b0), min(last, b0 + n)
        local[lo - first : hi - first].copy_(values[lo - b0 : hi - b0, cols].to(local.dtype))


@torch.no_grad()
def _fill(sh: Any, seed: int, std: float, num_layers: int) -> None:
    """Write this rank's part of the global tensor behind ShardedTensor ``sh`` into ``sh.data``."""
    shape = tuple(sh.global_shape[sh.prepend_axis_num:])
    key_std = _std(sh.key, len(shape), std, num_layers)
    if key_std is None:
        sh.data.fill_(0.0 if sh.key.endswith(".bias") else 1.0)
        return
    fill_rows(sh, seed, lambda s, g: torch.randn(s, generator=g, dtype=torch.float32) * key_std)


def init_layout_independent(chunks: list[Any], seed: int, std: float = 0.02) -> None:
    """Re-initialise every weight of this rank's model chunks independently of the layout."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    for chunk in chunks:
        num_layers = chunk.config.num_layers
        sharded = chunk.sharded_state_dict()
        apply_factories(sharded)  # e.g. SwiGLU's fc1: gate and up halves as two global tensors
        seen: set[int] = set()
        for sh in nested_values(sharded):
            if not isinstance(sh, ShardedTensor) or sh.key.endswith("_extra_state") or sh.data is None:
                continue
            if sh.flattened_range is not None:
                raise NotImplementedError("layout-independent init of flattened (distributed optimizer) tensors")
            if id(sh.data) in seen:
                continue
            seen.add(id(sh.data))
            _fill(sh, seed, std, num_layers)
