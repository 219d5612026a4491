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
tensors, then each layer, then each of its experts), as plain ShardedTensors covering
that group's region of the stored global tensors (see :func:`load_groups`).

Where a tensor sits in the checkpoint: megatron stacks the layers of a model whose layers are
all alike under one key with a leading layer axis (``decoder.layers.mlp.linear_fc2.weight``
``[L, ...]``), and saves the layers of a mixed model (dense and expert layers) one key each
(``decoder.layers.3.mlp.linear_fc2.weight``); expert tensors add an expert axis after the layer
axis (``decoder.layers.mlp.experts.experts.linear_fc2.weight`` ``[L, E, ...]``). A :class:`Slot`
records these leading axes, so one canonical name (``decoder.layers.3.mlp.experts.local_experts.5.
linear_fc2.weight``) finds its tensor in either layout.
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

_LAYER_IN_KEY = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERTS = ".mlp.experts.experts."  # the checkpoint's expert tensors: mlp.experts.experts.linear_fc1...


@dataclass(frozen=True)
class Slot:
    """Where one Megatron tensor of the TP=1 model lives in the dist checkpoint."""

    name: str  # canonical name, e.g. decoder.layers.3.self_attention.linear_qkv.weight
    state_key: str  # the model's state-dict key (spec-dependent naming)
    ckpt_key: str  # the dist-checkpoint key (a stacked layer's index dropped)
    layer: int | None
    shape: tuple[int, ...]  # the full TP=1 tensor
    dtype: torch.dtype
    expert: int | None = None
    # The leading axes of the stored tensor this one is an index of, as (axis, index, size): the
    # stacked layer axis and/or the expert axis (what ShardedTensor.from_rank_offsets takes).
    axes: tuple[tuple[int, int, int], ...] = ()

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The global shape of the checkpoint key (leading axes, then the tensor)."""
        return tuple(size for _, _, size in self.axes) + self.shape


def _canonical(ckpt_key: str, layer: int | None, expert: int | None) -> str:
    """The table's name for the tensor at ``ckpt_key`` of ``layer`` (and ``expert``)."""
    name = ckpt_key
    if layer is not None and not _LAYER_IN_KEY.match(ckpt_key):
        if not ckpt_key.startswith("decoder.layers."):
            raise ValueError(f"layer tensor with unexpected checkpoint key {ckpt_key}")
        name = ckpt_key.replace("decoder.layers.", f"decoder.layers.{layer}.", 1)
    if expert is not None:
        if _EXPERTS not in name:
            raise ValueError(f"expert tensor with unexpected checkpoint key {ckpt_key}")
        name = name.replace(_EXPERTS, f".mlp.experts.local_experts.{expert}.", 1)
    return name


def _placement(sh: Any) -> tuple[int | None, int | None, tuple[tuple[int, int, int], ...]]:
    """(layer, expert, leading axes) of a ShardedTensor (or a factory's first tensor) of a TP=1 model."""
    if hasattr(sh, "build"):  # ShardedTensorFactory (SwiGLU's fc1): its tensors share the leading axes
        built = sh.build()
        sh = next(iter(built.values() if isinstance(built, dict) else built))
    p = sh.prepend_axis_num
    axes = tuple((i, sh.global_offset[i], sh.global_shape[i]) for i in range(p))
    in_key = _LAYER_IN_KEY.match(sh.key)
    stacked = sh.key.startswith("decoder.layers.") and not in_key
    layer = int(in_key.group(1)) if in_key else (axes[0][1] if stacked else None)
    expert_axes = axes[1:] if stacked else axes
    expert = expert_axes[0][1] if expert_axes and _EXPERTS in sh.key else None
    return layer, expert, axes


def slots_of(meta_model: Any) -> dict[str, Slot]:
    """Canonical name -> :class:`Slot` for every tensor (not ``_extra_state``) of a TP=1/PP=1 model."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    slots = {}
    for state_key, sh in meta_model.sharded_state_dict().items():
        if isinstance(sh, ShardedObject):
            continue
        layer, expert, axes = _placement(sh)
        name = _canonical(sh.key, layer, expert)
        if name in slots:
            raise ValueError(f"two tensors of the model map to the canonical name {name}")
        slots[name] = Slot(name, state_key, sh.key, layer, tuple(sh.data.shape), sh.data.dtype, expert, axes)
    return slots


class _LazyTensors:
    """Produces checkpoint chunks from full TP=1 tensors, keeping the last two full tensors.

    One full tensor can back several chunks (the swiglu factory saves gate and up
    as two chunks of ``linear_fc1``); the writer asks for them back to back.
    """

    def __init__(self, produce: Callable[[str], torch.Tensor], slots: dict[str, Slot]):
        self.produce = produce
        self.dtypes = {n: s.dtype for n, s in slots.items()}
        # checkpoint key -> leading-axis offsets -> canonical name
        self.names: dict[str, dict[tuple[int, ...], str]] = {}
        for s in slots.values():
            self.names.setdefault(s.ckpt_key, {})[tuple(i for _, i, _ in s.axes)] = s.name
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
        full = self.full(self.names[ckpt_key][tuple(offsets[:p])])
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
    lazy = _LazyTensors(produce, slots)
    # "model0": the same structure save_model_checkpoint uses for chunk 0.
    dist_checkpointing.save(
        {"model0": meta_model.sharded_state_dict()}, str(checkpoint_dir), sharded_strategy=streaming_save_strategy(lazy)
    )


def load_groups(meta_model: Any, checkpoint_dir: str | Path) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {canonical name: full TP=1 tensor} for the non-layer tensors, then layer by layer, each
    layer's experts one expert at a time after its other tensors.

    Each group is one ``dist_checkpointing.load`` of plain ShardedTensors covering
    that group's region of the global tensors (layer ``i`` = index ``i`` of the
    stacked layer axis, expert ``e`` = index ``e`` of the expert axis), so only that group is in
    memory. The model's own sharded state dict cannot be loaded piecewise on one rank: torch's
    ShardedTensor insists that one rank holds every shard of a stacked-layer key. Vocabulary
    tensors are read at the checkpoint's own padded size, every tensor in its stored dtype.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    try:
        stored = FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    except Exception as e:  # pickle raises many types on a damaged file
        raise ConversionError(f"{checkpoint_dir}/.metadata is unreadable (corrupt or truncated?): {describe(e)}") from None
    groups: dict[tuple[int, int], list[Slot]] = {}
    for s in slots_of(meta_model).values():
        key = (-1, -1) if s.layer is None else (s.layer, -1 if s.expert is None else s.expert)
        groups.setdefault(key, []).append(s)
    for key in sorted(groups):
        request = {}
        for s in groups[key]:
            dtype = stored[s.ckpt_key].properties.dtype  # read as stored (e.g. fp32 norms beside bf16 weights)
            if not s.axes:  # the whole stored tensor (a vocabulary tensor at its stored padded size)
                shape = tuple(stored[s.ckpt_key].size)
                request[s.name] = ShardedTensor.from_rank_offsets(s.ckpt_key, torch.empty(shape, dtype=dtype))
            else:
                data = torch.empty((1,) * len(s.axes) + s.shape, dtype=dtype)
                request[s.name] = ShardedTensor.from_rank_offsets(s.ckpt_key, data, *s.axes)
        # A region of each global tensor, not a full cover: skip the access-pattern validation.
        try:
            loaded = dist_checkpointing.load(request, str(checkpoint_dir), validate_access_integrity=False)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch's CheckpointException (a BaseException) wraps the reader's error
            raise ConversionError(
                f"cannot read the dist checkpoint {checkpoint_dir} (a file is corrupt or truncated?): {describe(e)}"
            ) from None
        by_name = {s.name: s for s in groups[key]}
        yield {n: (t.reshape(by_name[n].shape) if by_name[n].axes else t) for n, t in loaded.items()}
