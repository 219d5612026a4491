"""The three passes of PSFT training over megatron's schedule: snapshot, train step, evaluation.

All three run through :func:`_run_pass`, the trainer's one forward step (the chunk on the
micro-batch, ``labels=`` so the last stage returns the ``[s, b, V/TP]`` logits, and the fused
output layer's weight when there is one) on :func:`psft_megatron.model.forward.run_pipeline`;
they differ only in what the last stage does with the output (``on_output``).

Per global batch (see :mod:`psft_megatron.training.loop`): one forward-only
*snapshot* pass records logp_old for mini-batches 2..k (the first mini-batch runs on
the snapshot weights themselves, so its own detached log-probs are logp_old), then
each mini-batch runs forward+backward as micro-batches and ends in one optimizer step.

Loss values and statistics exist only on the last pipeline stage; helpers here
return ``None`` elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from psft_megatron.data.batches import AttentionBackend, GlobalBatch, MicroBatch, MiniBatch
from psft_megatron.loss.compute import OWN_LOGP, micro_batch_loss, output_logits, snapshot_logp
from psft_megatron.loss.fused_head import OutputHead
from psft_megatron.loss.groups import resolve_dp_cp_group
from psft_megatron.loss.kl import vocab_parallel_kl
from psft_megatron.loss.normalize import megatron_loss_grad, megatron_loss_scale
from psft_megatron.loss.objectives import ObjectiveConfig
from psft_megatron.loss.stats import LossStats, reduce_stats
from psft_megatron.model.build import BuiltModel
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.forward import prepare_micro_batches, run_pipeline
from psft_megatron.model.gpt import loss_head
from psft_megatron.runtime.distributed import any_rank


@dataclass
class PassSetup:
    """What every pass needs to know about the run."""

    backend: AttentionBackend
    device: torch.device
    chunk_size: int | None = None  # token chunking of the loss (bounds fp32 working memory)
    # The true vocabulary size: the output layer's padded columns beyond it are left out of
    # the softmax (None: every column counts).
    vocab_size: int | None = None

    @classmethod
    def for_model(cls, built: BuiltModel, model_cfg: ModelConfig, device: torch.device) -> PassSetup:
        """The set-up of the passes over ``built`` (the model of ``model_cfg``) on ``device``."""
        return cls(
            backend=built.transformer_impl,
            device=device,
            vocab_size=model_cfg.vocab_size,  # the loss leaves the padded columns out
        )


@dataclass
class StepResult:
    """One optimizer step: reduced statistics (last stage only) and the optimizer's report."""

    stats: dict[str, float] | None
    grad_norm: float
    update_successful: bool
    num_loss_tokens: int
    lr: float  # the learning rate this step used
    # The loss or gradient norm was non-finite on some rank: every rank skipped the update
    # (weights, optimizer state and LR schedule untouched).
    skipped: bool = False


# on_output(index, micro-batch, output, head) -> (loss, report): what one pass does on the last
# stage with a micro-batch's output. ``head`` is the fused output layer's weight on a fused last
# stage (the output is then hidden states), else None (the output is the logits).
PassOutput = Callable[[int, MicroBatch, torch.Tensor, OutputHead | None], tuple[torch.Tensor, Any]]


def _run_pass(model: list, mbs: Sequence[MicroBatch], setup: PassSetup, on_output: PassOutput, *,
              forward_only: bool) -> list[Any]:
    """Run prepared micro-batches through the model: the one forward step of every training pass."""
    if not mbs:
        return []

    def call_model(chunk: Any, mb: MicroBatch) -> torch.Tensor:
        # labels= makes the output layer's [s, b, V/TP] logits reach the loss unchanged
        # (see psft_megatron.model.gpt); on other stages it is ignored.
        return chunk(**mb.forward_kwargs(setup.backend), labels=mb.labels)

    def with_head(index: int, mb: MicroBatch, output: torch.Tensor, chunk: Any) -> tuple[torch.Tensor, Any]:
        return on_output(index, mb, output, loss_head(chunk))

    b, s = mbs[0].shape
    # megatron divides the sequence length by CP itself (pipeline tensor shapes).
    return run_pipeline(model, mbs, call_model, with_head, seq_length=s * mbs[0].cp_size, micro_batch_size=b,
                        forward_only=forward_only)


def _seq_first(t: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [s, b], the logits' layout."""
    return t.transpose(0, 1).contiguous()


def _is_last_stage() -> bool:
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage(ignore_virtual=True)


def snapshot(model: list, micro_batches: Sequence[MicroBatch], setup: PassSetup) -> list[torch.Tensor | None]:
    """Forward-only pass: each micro-batch's per-token label log-probs ``[s, b]`` (last stage; None elsewhere)."""
    mbs = prepare_micro_batches(micro_batches, setup.backend, setup.device)
    out: list[torch.Tensor | None] = [None] * len(mbs)

    def on_output(idx: int, mb: MicroBatch, output: torch.Tensor, head: OutputHead | None) -> tuple[torch.Tensor, Any]:
        out[idx] = snapshot_logp(output, _seq_first(mb.labels), chunk_size=setup.chunk_size,
                                 vocab_size=setup.vocab_size, head=head)
        return output.new_zeros(()), {}

    _run_pass(model, mbs, setup, on_output, forward_only=True)
    return out


def train_step(
    bundle: Any,
    mini: MiniBatch,
    objective: ObjectiveConfig,
    setup: PassSetup,
    logp_old: Sequence[torch.Tensor | None] | None,
    logp_ref: Sequence[torch.Tensor | None] | None = None,
) -> StepResult:
    """Forward+backward of one mini-batch's micro-batches, then one optimizer step.

    ``logp_old``: per micro-batch snapshot log-probs, for objectives that declare they need a
    snapshot (psft); ``None`` means "this mini-batch runs on the snapshot weights", so each
    token's own detached log-prob is its logp_old (ratio 1). ``logp_ref``: per micro-batch
    log-probs of the frozen reference model, for objectives that declare they need one (sft_kl).
    """
    from megatron.core import parallel_state

    model, optimizer, scheduler = bundle.model, bundle.optimizer, bundle.scheduler
    mbs = prepare_micro_batches(mini.micro_batches, setup.backend, setup.device)
    dp = parallel_state.get_data_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    scale = megatron_loss_scale(len(mbs), dp, cp)
    # What megatron's backward sends into res.loss: the fused head forms its gradients for it in forward.
    loss_grad = megatron_loss_grad(len(mbs), dp, cp)
    # The loader counted the mini-batch's response tokens over all DP ranks: no all-reduce.
    global_count = torch.tensor(mini.num_loss_tokens, dtype=torch.int64, device=setup.device)
    stats: list[LossStats] = []

    def on_output(idx: int, mb: MicroBatch, output: torch.Tensor, head: OutputHead | None) -> tuple[torch.Tensor, Any]:
        old = OWN_LOGP if logp_old is None else logp_old[idx]
        res = micro_batch_loss(
            output,
            _seq_first(mb.labels),
            _seq_first(mb.loss_mask),
            global_count,
            objective,
            logp_old=old if objective.needs_snapshot else None,
            logp_ref=logp_ref[idx] if objective.needs_reference else None,
            chunk_size=setup.chunk_size,
            vocab_size=setup.vocab_size,
            # The logits are not used after the loss: backward writes their gradient
            # into their own storage (one logits-sized allocation less, and faster).
            inplace=True,
            head=head,
            grad_scale=loss_grad,
        )
        stats.append(res.stats)
        # megatron divides the returned product in place, not res.loss: the report stays intact.
        return res.loss * scale, {"loss": res.loss.detach()}

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    _run_pass(model, mbs, setup, on_output, forward_only=False)
    reduced = _reduce(stats, setup.device)
    # The non-finite guard: the gradient norm (megatron's, over the model-parallel group; DP
    # ranks hold the same reduced gradients) and the loss (last stage) decide, on every rank
    # alike, whether this update is applied. megatron's step recomputes the norm: one extra
    # pass over the gradients, small beside forward and backward.
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    loss_bad = reduced is not None and not math.isfinite(reduced["loss"])
    if any_rank(loss_bad or not math.isfinite(grad_norm), setup.device):
        optimizer.zero_grad()
        return StepResult(stats=reduced, grad_norm=grad_norm, update_successful=False,
                          num_loss_tokens=mini.num_loss_tokens, lr=float(optimizer.param_groups[0]["lr"]),
                          skipped=True)
    # Advance the schedule first, so optimizer step i (1-based) uses lr(i): the first
    # warm-up step is not wasted at lr 0 and the last one reaches min_lr.
    scheduler.step(increment=1)
    lr = float(optimizer.param_groups[0]["lr"])
    ok, _, _ = optimizer.step()
    return StepResult(
        stats=reduced,
        grad_norm=grad_norm,
        update_successful=bool(ok),
        num_loss_tokens=mini.num_loss_tokens,
        lr=lr,
    )


def prepare_global_batch(gb: GlobalBatch, setup: PassSetup) -> list[MiniBatch]:
    """The global batch's mini-batches with device copies of their micro-batches, made once:
    the snapshot and the train steps then share them."""
    return [
        replace(mini, micro_batches=prepare_micro_batches(mini.micro_batches, setup.backend, setup.device))
        for mini in gb.mini_batches
    ]


def snapshot_logp_old(model: list, minis: Sequence[MiniBatch], objective: ObjectiveConfig,
                      setup: PassSetup, passes: int = 1) -> list[Sequence[torch.Tensor | None] | None]:
    """logp_old for each of the ``k x passes`` optimizer steps of a global batch (see
    :func:`train_step`; step ``p*k + j`` trains mini-batch ``j`` in pass ``p``), from one
    forward-only snapshot pass in one schedule call (the pipeline fills once).

    For an objective that needs a snapshot (psft) the pass covers mini-batches 2..k: mini-batch 1
    runs on the snapshot weights and uses its own detached log-probs (None). With more than one
    pass it covers all k, as mini-batch 1's later passes no longer run on those weights.
    Other objectives: all None.
    """
    k = len(minis)
    logp_old: list[Sequence[torch.Tensor | None] | None] = [None] * k
    first = 0 if passes > 1 else 1
    if objective.needs_snapshot and k > first:
        flat = snapshot(model, [mb for mini in minis[first:] for mb in mini.micro_batches], setup)
        m = len(minis[0].micro_batches)
        for j in range(first, k):
            logp_old[j] = flat[(j - first) * m : (j - first + 1) * m]
    return logp_old * passes


def reference_logp(reference: list | None, minis: Sequence[MiniBatch], objective: ObjectiveConfig,
                   setup: PassSetup) -> list[Sequence[torch.Tensor | None] | None]:
    """Each mini-batch's log-probs under the frozen reference model (one forward-only pass over
    the whole global batch), for objectives that need them; all None otherwise."""
    if not objective.needs_reference:
        return [None] * len(minis)
    if reference is None:
        raise ValueError(f"objective {objective.name!r} needs a reference model, and the run built none")
    flat = snapshot(reference, [mb for mini in minis for mb in mini.micro_batches], setup)
    m = len(minis[0].micro_batches)
    return [flat[j * m : (j + 1) * m] for j in range(len(minis))]


def train_global_batch(
    bundle: Any, gb: GlobalBatch, objective: ObjectiveConfig, setup: PassSetup, reference: list | None = None
) -> Iterator[StepResult]:
    """All k optimizer steps of one global batch, yielded one by one (benchmarks; the loop
    drives the same pieces step by step so it can stop and save between any two)."""
    minis = prepare_global_batch(gb, setup)
    logp_old = snapshot_logp_old(bundle.model, minis, objective, setup)
    logp_ref = reference_logp(reference, minis, objective, setup)
    for j, mini in enumerate(minis):
        yield train_step(bundle, mini, objective, setup, logp_old[j], logp_ref[j])


def evaluate(model: list, micro_batches: Sequence[MicroBatch], setup: PassSetup,
             reference: list | None = None) -> dict[str, float] | None:
    """Forward-only NLL and entropy over held-out micro-batches (token means over all DP ranks).

    With ``reference`` (frozen chunks at the same layout, e.g. the starting weights) also
    ``kl``: the token mean of the full-vocabulary KL(model || reference) over the same response
    tokens. Each micro-batch then runs through the reference first and its last-stage logits are
    kept only until the model's pass over that micro-batch, so one micro-batch's reference logits
    exist at a time."""
    mbs = prepare_micro_batches(micro_batches, setup.backend, setup.device)
    sft = ObjectiveConfig(name="sft")
    count = torch.ones((), dtype=torch.int64, device=setup.device)
    stats: list[LossStats] = []
    kl_sum = torch.zeros((), dtype=torch.float64, device=setup.device)
    ref_logits: list[torch.Tensor] = []

    def on_reference(idx: int, mb: MicroBatch, output: torch.Tensor, head: OutputHead | None) -> tuple[torch.Tensor, Any]:
        ref_logits.append(output_logits(output, head))
        return output.new_zeros(()), {}

    def on_output(idx: int, mb: MicroBatch, output: torch.Tensor, head: OutputHead | None) -> tuple[torch.Tensor, Any]:
        nonlocal kl_sum
        res = micro_batch_loss(
            output,
            _seq_first(mb.labels),
            _seq_first(mb.loss_mask),
            count,
            sft,
            chunk_size=setup.chunk_size,
            vocab_size=setup.vocab_size,
            head=head,
        )
        stats.append(res.stats)
        if ref_logits:
            kl = vocab_parallel_kl(output_logits(output, head), ref_logits.pop(), vocab_size=setup.vocab_size,
                                   chunk_size=setup.chunk_size)
            kl_sum = kl_sum + (kl.double() * _seq_first(mb.loss_mask).to(kl.device)).sum()
        return res.loss.detach(), {}

    for chunk in model:
        chunk.eval()
    try:
        if reference is None:
            _run_pass(model, mbs, setup, on_output, forward_only=True)
        else:
            for mb in mbs:
                _run_pass(reference, [mb], setup, on_reference, forward_only=True)
                _run_pass(model, [mb], setup, on_output, forward_only=True)
    finally:
        for chunk in model:
            chunk.train()
    out = _reduce(stats, setup.device)
    if out is not None and reference is not None:
        # vocab_parallel_kl reduced over TP: each DP x CP rank holds its own tokens' sums.
        group = resolve_dp_cp_group(None)
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(kl_sum, group=group)
        out["kl"] = float(kl_sum) / max(out["token_count"], 1)
    return out


def _reduce(stats: list[LossStats], device: torch.device) -> dict[str, float] | None:
    if not _is_last_stage():
        return None
    total = LossStats.empty(device)
    for s in stats:
        total = total.merge(s)
    return reduce_stats(total).summary()
