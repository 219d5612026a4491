"""Per-layer expert load and the router's load-balancing loss of each optimizer step (MoE models).

**Expert load.** A forward hook on every ``TopKRouter`` counts, while the optimizer step's
forward and backward run (:func:`counting`, around ``train_step``), the tokens each expert was
sent (megatron's ``routing_map``: top-k per token). At the end of the step one all-reduce over all
ranks sums them: every token is routed on exactly one rank per layer (TP ranks route their
sequence-parallel slice, CP ranks their share, a layer lives on one pipeline stage, EP ranks are
data-parallel ranks of the router). Logged per layer: the fraction of routed tokens per expert
(``expert_load``) and its max over mean (``expert_load_max_over_mean``: 1 is perfect balance,
``num_experts`` a router that sends every token to one expert), and the worst layer's
(``expert_load_worst``). The snapshot pass, held-out evaluation and a reference model run outside
that window and are not counted. Under activation recompute the router first runs without gradients
(counted: it is the step's forward) and again inside backward with the same routing (skipped, so the
counts stay the tokens routed; the shares would not change either way).

**The auxiliary loss and the objective.** With ``model.moe_aux_loss_coeff`` > 0, megatron's
router attaches the Switch load-balancing loss to its output probabilities
(``MoEAuxLossAutoScaler``: identity in forward, the loss's gradient added in backward). So it is
*added* to the objective's gradient: ``sft``/``dft``/``sft_kl`` and ``psft`` alike minimise
``J_token + coeff * sum_layers aux_layer``. It never enters the PSFT ratio: the ratio is
``exp(logp - logp_old)`` of the model's output, which the auxiliary term does not change (tokens
the trust region clips still pass its gradient to the router). Per layer and micro-batch, megatron's
``aux = E / (k T^2) * sum_e c_e * P_e`` over the micro-batch's ``T`` routed positions (prompt,
response and padding: the router balances everything it routes; ``c_e`` tokens sent to expert
``e``, ``P_e`` the summed softmax probabilities), reduced over TP x CP. Its normalisation beside
the global token mean: the schedule scales the auxiliary gradient by ``CP / M`` and megatron's
DDP by ``1 / (DP x CP)``, so the term is the **mean over the mini-batch's micro-batches (all DP
ranks)** of each micro-batch's loss. Every micro-batch routes the same number of positions
(``micro_batch_size x seq_length``), so, like the token loss's global token mean (the response
tokens summed over micro-batches and DP ranks, divided by their count), it does not change with
the number of micro-batches, DP, EP, TP or CP; it depends only on the micro-batch size, which
sets the set of tokens each load statistic is taken over. ``moe_aux_loss`` in ``metrics.jsonl``
is that term as added (``coeff x`` the sum over layers of the mean over micro-batches); ``loss``
stays the token objective. It is read from megatron's own tracker, which the router fills only where
it computes the loss: with gradients on, so once per layer and micro-batch with or without recompute
(recompute runs the forward without gradients and the router again, with them, in backward).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.distributed as dist

from psft_megatron.model.build import unwrap_model
from psft_megatron.model.config import ModelConfig

__all__ = ["MoEMetrics", "counting"]

_AUX_TRACKER_NAME = "load_balancing_loss"  # megatron's name for the aux_loss type in its tracker


class MoEMetrics:
    """Counts routed tokens per expert in the training passes of one optimizer step; one
    collective per step turns them (and megatron's auxiliary-loss tracker) into metrics."""

    def __init__(self, chunks: list[Any], model: ModelConfig, micro_batches_per_step: int) -> None:
        """``chunks``: this rank's model chunks; ``micro_batches_per_step``: micro-batches of one
        mini-batch over all DP ranks (``mini_batch_size / micro_batch_size``)."""
        from megatron.core.transformer.moe.router import TopKRouter

        self.model = model
        self.micro_batches = micro_batches_per_step
        # Routed tokens per (layer, expert), kept where the routing map is (no host sync per micro-batch).
        self.counts: torch.Tensor | None = None
        self.active = False  # inside an optimizer step's forward and backward (see counting())
        self._handles = []
        for chunk in chunks:
            for module in unwrap_model(chunk).modules():
                if isinstance(module, TopKRouter):
                    layer = int(module.layer_number) - 1  # megatron's layer_number: global, 1-based
                    self._handles.append(module.register_forward_hook(self._hook(layer)))

    def _hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            # Outside a training step (snapshot, evaluation), or a recompute inside backward: same routing again.
            if not self.active or torch._C._current_graph_task_id() != -1:
                return
            _, routing_map = output
            if self.counts is None:
                self.counts = torch.zeros(self.model.num_layers, self.model.num_experts, dtype=torch.float64,
                                          device=routing_map.device)
            self.counts[layer] += routing_map.sum(dim=0)

        return hook

    def _aux_per_layer(self) -> torch.Tensor:
        """megatron's tracked load-balancing loss per layer, summed over this rank's micro-batches,
        and the tracker cleared."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        out = torch.zeros(self.model.num_layers, dtype=torch.float64)
        tracker = get_moe_layer_wise_logging_tracker()
        if _AUX_TRACKER_NAME in tracker:
            out = tracker[_AUX_TRACKER_NAME]["values"].detach().to("cpu", torch.float64)[: self.model.num_layers]
        clear_aux_losses_tracker()
        return out

    def step_record(self, device: torch.device) -> dict[str, Any]:
        """This step's metrics (every rank gets them; collective: call on every rank), then reset."""
        aux = self._aux_per_layer()
        layers, experts = self.model.num_layers, self.model.num_experts
        counts = self.counts if self.counts is not None else torch.zeros(layers, experts, dtype=torch.float64)
        buf = torch.cat([counts.flatten().to(device), aux.to(device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(buf)  # every token is routed on one rank per layer; see the module docstring
        buf = buf.cpu()
        counts, aux = buf[: layers * experts].view(layers, experts), buf[layers * experts :]
        if self.counts is not None:
            self.counts.zero_()
        load: dict[str, list[float]] = {}
        imbalance: dict[str, float] = {}
        for layer in self.model.moe_layers:
            total = float(counts[layer].sum())
            if total <= 0:
                continue
            fractions = counts[layer] / total
            load[str(layer)] = [round(float(f), 6) for f in fractions]
            imbalance[str(layer)] = float(fractions.max() * experts)  # max over mean (mean = 1 / E)
        record: dict[str, Any] = {}
        if load:
            record.update(expert_load=load, expert_load_max_over_mean=imbalance,
                          expert_load_worst=max(imbalance.values()))
        coeff = self.model.aux_loss_coeff
        if coeff > 0:
            value = coeff * float(aux.sum()) / self.micro_batches
            record["moe_aux_loss"] = value if math.isfinite(value) else float("nan")
        return record

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


@contextlib.contextmanager
def counting(metrics: MoEMetrics | None) -> Iterator[None]:
    """Count routed tokens in the block (one optimizer step's forward and backward); no-op for None."""
    if metrics is None:
        yield
        return
    metrics.active = True
    try:
        yield
    finally:
        metrics.active = False
