"""The ``parallel`` and ``distributed`` sections of a recipe: how the job is laid out over ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psft_megatron.config.load import FieldError, check_choices


@dataclass
class ParallelConfig:
    """How the model and data are split across ranks.

    The data-parallel size is not set: it is ``world_size / (tp * pp * cp)``.
    """

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Interleaved pipeline schedule: model chunks per pipeline rank (None = not interleaved).
    virtual_pipeline_model_parallel_size: int | None = None
    # Context parallelism: every packed row is split over this many ranks (TransformerEngine's
    # load-balanced THD layout, see psft_megatron.data.context_parallel); long samples then fit.
    context_parallel_size: int = 1
    # How TransformerEngine's CP attention exchanges K/V: p2p (ring, overlapped with compute),
    # all_gather, or a2a (heads / TP must divide by CP). The local (CPU) spec always all-gathers.
    cp_comm_type: Literal["p2p", "all_gather", "a2a"] = "p2p"
    sequence_parallel: bool = False
    # Expert parallelism (mixture-of-experts models): each MoE layer's experts are split over EP
    # ranks, carved out of the data-parallel ranks (EP x expert TP must divide TP x CP x DP).
    expert_model_parallel_size: int = 1
    # Tensor parallelism inside each expert; null = tensor_model_parallel_size (megatron's default).
    expert_tensor_parallel_size: int | None = None
    # How routed tokens reach their experts' ranks. allgather: every rank of the TP x EP group
    # gathers all their tokens and keeps those of its experts (all-gather + reduce-scatter, the
    # collectives sequence parallelism already runs; gloo runs them, so it is the CPU choice).
    # alltoall: sends each token only where its experts are (less traffic at large EP; GPU only:
    # megatron's version syncs its split sizes through CUDA streams and events).
    moe_token_dispatcher: Literal["allgather", "alltoall"] = "allgather"

    def __post_init__(self) -> None:
        # One virtual stage is no interleaving; megatron would still pick the interleaved schedule.
        if self.virtual_pipeline_model_parallel_size == 1:
            self.virtual_pipeline_model_parallel_size = None
        check_choices(self)

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    @property
    def expert_tp_size(self) -> int:
        """Tensor parallelism inside each expert (``expert_tensor_parallel_size``, default TP)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def expert_data_parallel_size(self, world_size: int) -> int:
        """Replicas of each expert: ``world_size / (expert TP x EP x PP)`` (the group the experts'
        gradients are averaged and their distributed-optimizer state is sharded over)."""
        return world_size // (self.expert_tp_size * self.expert_model_parallel_size * self.pipeline_model_parallel_size)

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for ``world_size`` ranks; raises :class:`FieldError` if the layout does not divide the world."""
        mp = self.model_parallel_size
        if world_size % mp != 0:
            raise FieldError(
                "parallel",
                f"layout does not fit the job: world size {world_size} is not divisible by TP x PP x CP = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size} x "
                f"{self.context_parallel_size} = {mp}: launch a multiple of {mp} processes "
                f"or change parallel.tensor_model_parallel_size / pipeline_model_parallel_size / context_parallel_size",
            )
        dp = world_size // mp
        # megatron carves the expert layout out of the same ranks per pipeline stage: the TP x CP x DP
        # ranks of a stage are also its expert TP x EP x expert-DP ranks.
        ep, etp = self.expert_model_parallel_size, self.expert_tp_size
        dense = self.tensor_model_parallel_size * self.context_parallel_size * dp
        if dense % (ep * etp):
            raise FieldError(
                "parallel.expert_model_parallel_size",
                f"({ep}) x expert_tensor_parallel_size ({etp}) must divide the {dense} ranks of a pipeline stage "
                f"(TP x CP x DP = {self.tensor_model_parallel_size} x {self.context_parallel_size} x {dp} at world "
                f"size {world_size}): experts are split over ranks that also hold the dense layers; pick an EP that "
                f"divides {dense // etp if dense % etp == 0 else dense} or launch more processes",
            )
        return dp

    def validate(self) -> None:
        """Checks that need no world size; raises :class:`FieldError` naming the field to change."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise FieldError(f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        vp = self.virtual_pipeline_model_parallel_size
        if vp is not None:
            if vp < 1:
                raise FieldError("parallel.virtual_pipeline_model_parallel_size", f"must be >= 1 or null, got {vp}")
            if vp > 1 and self.pipeline_model_parallel_size < 2:
                raise FieldError(
                    "parallel.virtual_pipeline_model_parallel_size",
                    "> 1 needs pipeline_model_parallel_size >= 2; set it to null or raise the pipeline size",
                )
        for name in ("expert_model_parallel_size", "expert_tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FieldError(f"parallel.{name}", f"must be >= 1{' or null' if name.endswith('tensor_parallel_size') else ''}, got {value}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise FieldError(
                "parallel.sequence_parallel",
                "needs tensor_model_parallel_size > 1 (it shards activations over TP); "
                "set sequence_parallel: false or raise the tensor size",
            )


@dataclass
class DistributedConfig:
    """torch.distributed settings."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    timeout_minutes: float = 30.0

    def __post_init__(self) -> None:
        check_choices(self)
