"""Write and read Megatron dist checkpoints one tensor group at a time.

The keys, global shapes and shardings come from megatron itself: a TP=1/PP=1
``GPTModel`` built on the ``meta`` device (no memory) supplies its
``sharded_state_dict()``, exactly what a real model would save.

Saving: ``dist_checkpointing.save`` with :func:`streaming_save_strategy`, a
``torch_dist`` strategy whose planner produces each tensor only when the writer
asks for it. megatron's own writer (``FileSystemWriterAsync``) resolves every
tensor of the rank before writing anything, i.e. the whole model in memory;
torch's ``FileSystemWriter`` resolves them one by one. The files are the
standard ``torch_dist`` format, loadable by ``dist_checkpointing.load`` at any
TP/PP. (torch's writer keeps the last written chunk of each checkpoint key
alive until the file is closed, so the peak is about one layer plus the
embedding and output matrices, not the model.)

Loading: ``dist_checkpointing.load`` of one group at a time (the non-layer
tensors, then each layer), as plain ShardedTensors covering that group's region
of the stored global tensors (see :func:`load_groups`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from psft_megatron.conversion.errors import ConversionError, describe

__all__ = ["Slot", "load_groups", "slots_of", "stream_save", "streaming_save_strategy"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Slot:
    """Where one Megatron tensor of the TP=1 model lives in the dist checkpoint."""

    name: str  # canonical name, e.g. decoder.layers.3.self_attention.linear_qkv.weight
    state_key: str  # the model's state-dict key (spec-dependent naming)
    ckpt_key: str  # the dist-checkpoint key (layer index dropped)
    layer: int | None
    shape: tuple[int, ...]  # the full TP=1 tensor
    dtype: torch.dtype


def _canonical(ckpt_key: str, layer: int | None) -> str:
    if layer is None:
        return ckpt_key
    if not ckpt_key.startswith("decoder.layers."):
        raise ValueError(f"layer tensor with unexpected checkpoint key {ckpt_key}")
    return ckpt_key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)


def slots_of(meta_model: Any) -> dict[str, Slot]:
    """Canonical name -> :class:`Slot` for every tensor (not ``_extra_state``) of a TP=1/PP=1 model."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    slots = {}
    for state_key, sh in meta_model.sharded_state_dict().items():
        if isinstance(sh, ShardedObject):
            continue
        m = _LAYER.match(state_key)
        layer = int(m.group(1)) if m else None
        name = _canonical(sh.key, layer)
        slots[name] = Slot(name, state_key, sh.key, layer, tuple(sh.data.shape), sh.data.dtype)
    return slots


class _LazyTensors:
    """Produces checkpoint chunks from full TP=1 tensors, keeping the last two full tensors.

    One full tensor can back several chunks (the swiglu factory saves gate and up
    as two chunks of ``linear_fc1``); the writer asks for them back to back.
    """

    def __init__(self, produce: Callable[[str], torch.Tensor], dtypes: dict[str, torch.dtype]):
        self.produce = produce
        self.dtypes = dtypes
        self.prepend: dict[str, int] = {}
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def full(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            t = self.produce(name).to(self.dtypes[name]).contiguous()
            self._cache[name] = t
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[name]

    def chunk(self, ckpt_key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        p = self.prepend[ckpt_key]
        layer = offsets[0] if p else None
        full = self.full(_canonical(ckpt_key, layer))
        index = tuple(slice(o, o + s) for o, s in zip(offsets[p:], sizes[p:]))
        # A view: the writer copies partial chunks itself (it clones views of larger storage),
        # and a chunk that is the whole tensor needs no copy at all.
        return full[index].reshape(sizes)


def streaming_save_strategy(lazy: _LazyTensors) -> Any:
    """A ``torch_dist`` (version 1) save strategy that pulls tensor data from ``lazy`` while writing.

    It is megatron's ``TorchDistSaveShardedStrategy`` translation (the same module-level
    helpers its ``async_save`` uses; megatron-core is pinned to 0.16.x) with torch's
    synchronous ``FileSystemWriter`` and a planner whose ``resolve_data`` produces the
    chunk on demand. Defined inside a function so importing this module does not import megatron.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.planner import WriteItemType

    class _Planner(MCoreSavePlanner):
        def resolve_data(self, write_item: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            chunk = write_item.tensor_data.chunk
            return lazy.chunk(write_item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes))

    class _Strategy(TorchDistSaveShardedStrategy):
        def __init__(self) -> None:
            super().__init__("torch_dist", 1, thread_count=1)

        def save(self, sharded_state_dict: Any, checkpoint_dir: Path) -> None:
            by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            for key, shards in by_key.items():
                if hasattr(shards[0], "prepend_axis_num"):
                    lazy.prepend[key] = shards[0].prepend_axis_num
            pyt_state_dict = mcore_to_pyt_state_dict(by_key, False)
            writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=True, thread_count=1, sync_files=True)
            dcp_save(pyt_state_dict, storage_writer=writer,
                     planner=_Planner(dedup_replicated_tensors=False, flatten_state_dict=False))

    return _Strategy()


def stream_save(meta_model: Any, checkpoint_dir: str | Path, produce: Callable[[str], torch.Tensor]) -> None:
    """Save a dist checkpoint of ``meta_model``'s layout whose tensor ``name`` is ``produce(name)``.

    ``produce`` gets canonical names (see :func:`slots_of`) and returns the full TP=1
    tensor; it is called about once per tensor, in the writer's order.
    """
    from megatron.core import dist_checkpointing

    slots = slots_of(meta_model)
    lazy = _LazyTensors(produce, {n: s.dtype for n, s in slots.items()})
    # "model0": the same structure save_model_checkpoint uses for chunk 0.
    dist_checkpointing.save(
        {"model0": meta_model.sharded_state_dict()}, str(checkpoint_dir), sharded_strategy=streaming_save_strategy(lazy)
    )


def load_groups(meta_model: Any, checkpoint_dir: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {canonical name: full TP=1 tensor} for the non-layer tensors, then layer by layer.

    Each group is one ``dist_checkpointing.load`` of plain ShardedTensors covering
    that group's region of the global tensors (layer ``i`` = index ``i`` of the
    stacked layer axis), so only that group is in memory. The model's own sharded
    state dict cannot be loaded piecewise on one rank: torch's ShardedTensor
    insists that one rank holds every shard of a stacked-layer key. Vocabulary
    tensors are read at the checkpoint's own padded size, every tensor in its stored dtype.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    try:
        stored = FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    except Exception as e:  # pickle raises many types on a damaged file
        raise ConversionError(f"{checkpoint_dir}/.metadata is unreadable (corrupt or truncated?): {describe(e)}") from None
    slots = slots_of(meta_model)
    num_layers = 1 + max((s.layer for s in slots.values() if s.layer is not None), default=-1)
    groups: dict[int | None, list[Slot]] = {}
    for s in slots.values():
        groups.setdefault(s.layer, []).append(s)
    for layer in [None] + list(range(num_layers)):
        request = {}
        for s in groups.get(layer, []):
            dtype = stored[s.ckpt_key].properties.dtype  # read as stored (e.g. fp32 norms beside bf16 weights)
            if s.layer is None:
                shape = tuple(stored[s.ckpt_key].size)
                request[s.name] = ShardedTensor.from_rank_offsets(s.ckpt_key, torch.empty(shape, dtype=dtype))
            else:
                data = torch.empty((1, *s.shape), dtype=dtype)
                request[s.name] = ShardedTensor.from_rank_offsets(s.ckpt_key, data, (0, s.layer, num_layers))
        # A region of each global tensor, not a full cover: skip the access-pattern validation.
        try:
            loaded = dist_checkpointing.load(request, str(checkpoint_dir), validate_access_integrity=False)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch's CheckpointException (a BaseException) wraps the reader's error
            raise ConversionError(
                f"cannot read the dist checkpoint {checkpoint_dir} (a file is corrupt or truncated?): {describe(e)}"
            ) from None
        yield {name: (t if slots[name].layer is None else t[0]) for name, t in loaded.items()}
