"""The loss layer: vocab-parallel token statistics, objectives, global-token normalisation, statistics."""

from psft_megatron.loss.compute import MicroBatchLoss, micro_batch_loss, output_token_stats, snapshot_logp
from psft_megatron.loss.fused_head import OutputHead, fused_token_stats
from psft_megatron.loss.fused_head_loss import fused_head_loss
from psft_megatron.loss.normalize import (
    global_token_count,
    masked_loss_sum,
    megatron_loss_grad,
    megatron_loss_scale,
    normalized_loss,
)
from psft_megatron.loss.objectives import (
    ObjectiveConfig,
    TokenLosses,
    get_objective,
    objective_names,
    register_objective,
    token_losses,
)
from psft_megatron.loss.stats import LossStats, reduce_stats
from psft_megatron.loss.token_stats import TokenStats, vocab_parallel_token_stats

__all__ = [
    "LossStats",
    "MicroBatchLoss",
    "ObjectiveConfig",
    "OutputHead",
    "TokenLosses",
    "TokenStats",
    "fused_head_loss",
    "fused_token_stats",
    "get_objective",
    "global_token_count",
    "masked_loss_sum",
    "megatron_loss_grad",
    "megatron_loss_scale",
    "micro_batch_loss",
    "normalized_loss",
    "objective_names",
    "output_token_stats",
    "reduce_stats",
    "register_objective",
    "snapshot_logp",
    "token_losses",
    "vocab_parallel_token_stats",
]
