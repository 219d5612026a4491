"""An independent PSFT/SFT/DFT trainer in plain PyTorch float64, for checking the real one.

Written from the method's definition, not from the project's trainer: a transformers
``LlamaForCausalLM`` (or ``Qwen3MoeForCausalLM``) in float64, each packed sample run on its
own (so packing isolation is not assumed but reproduced), per-token log-probs and entropies
from a float64 ``log_softmax``, the objectives' formulas written out, one token mean per
mini-batch, a snapshot of log-probs per global batch, ``torch.optim.AdamW`` with megatron's
decay exclusions (1-D tensors and biases), clipping by the global gradient norm, and the
warm-up + cosine learning rate from its formula. Nothing here imports megatron or the
project's loss, optimizer or training code; only the rows come from the project's loader
(the tests' common input).

LoRA (:func:`add_lora`): each targeted ``nn.Linear`` of the HF model computes
``W x + scale * B (A x)`` with the base frozen, written from the definition; the trainer then
trains A and B alone.

A mixture-of-experts model adds the Switch load-balancing loss, from its definition: per layer
and micro-batch of ``micro_batch_size`` rows, ``E / (k T^2) * sum_e c_e * P_e`` over the
micro-batch's ``T`` positions (every sample of every row, padding included: what the router
routes), ``c_e`` the positions whose top-k (of the router's softmax) holds expert ``e``, ``P_e``
the summed probabilities of ``e``; the objective adds ``aux_coeff`` times its sum over layers,
averaged over the mini-batch's micro-batches. The router logits come from transformers'
``output_router_logits``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RefConfig:
    lr: float
    min_lr: float
    warmup: int
    total_steps: int
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    clip_grad: float
    sft_warmup_steps: int
    objective: str  # psft | psft_unweighted | sft | dft | sft_kl
    eps_low: float = 0.2
    eps_high: float = 0.28
    log_ratio_clamp: float = 20.0
    kl_beta: float = 0.1
    passes: int = 1  # passes over each global batch's mini-batches per snapshot
    aux_coeff: float = 0.0  # load-balancing loss coefficient (mixture-of-experts models)
    micro_batch_size: int = 1  # rows per micro-batch: the load-balancing loss is taken per micro-batch


def lr_at(step: int, cfg: RefConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warm-up from 0, then cosine to min_lr."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / (cfg.total_steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def segments(row: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) of each sample in a packed row (consecutive equal segment ids)."""
    seg = row["segment_ids"].tolist()
    out, start = [], 0
    for i in range(1, len(seg) + 1):
        if i == len(seg) or seg[i] != seg[start]:
            out.append((start, i))
            start = i
    return out


def _is_moe(model: Any) -> bool:
    return bool(getattr(model.config, "num_experts", 0))


def token_terms(model: Any, rows: list[dict[str, torch.Tensor]], vocab: int,
                router: list[list[torch.Tensor]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of every response token of ``rows``, in row order, float64, differentiable.

    Each sample is run alone, positions from 0: the packed row's other samples cannot leak in.
    ``router``: a list to which each row's router logits are appended (one ``[S, E]`` tensor per
    expert layer, every sample of the row, padding included), for the load-balancing loss.
    """
    lps, ents = [], []
    for row in rows:
        row_logits: list[list[torch.Tensor]] = []
        for a, b in segments(row):
            mask = row["loss_mask"][a:b] > 0
            if not mask.any() and router is None:
                continue
            out = model(input_ids=row["tokens"][a:b].unsqueeze(0), output_router_logits=router is not None)
            if router is not None:
                row_logits.append([lg.reshape(b - a, -1) for lg in out.router_logits])
            if not mask.any():
                continue
            logq = torch.log_softmax(out.logits[0, :, :vocab].double(), dim=-1)
            labels = row["labels"][a:b]
            lp = logq.gather(-1, labels.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
            ent = -(logq.exp() * logq).sum(-1)
            lps.append(lp[mask])
            ents.append(ent[mask])
        if router is not None:
            router.append([torch.cat(per_layer) for per_layer in zip(*row_logits)])
    return torch.cat(lps), torch.cat(ents)


def load_balancing(router: list[list[torch.Tensor]], topk: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over layers of the Switch loss, averaged over micro-batches of ``micro`` rows; tokens
    routed to each expert per layer ``[layers, E]``) from each row's router logits."""
    losses, counts = [], 0
    for m in range(0, len(router), micro):
        per_layer = [torch.cat(layer) for layer in zip(*router[m:m + micro])]  # the micro-batch's positions
        total = 0
        for logits in per_layer:
            probs = torch.softmax(logits.double(), dim=-1)
            t, e = probs.shape
            chosen = torch.zeros_like(probs).scatter(1, probs.topk(topk, dim=-1).indices, 1.0)
            total = total + e / (topk * t * t) * (chosen.sum(0) * probs.sum(0)).sum()
        losses.append(total)
        counts = counts + torch.stack([torch.zeros(lg.shape[-1], dtype=torch.float64).scatter_add(
            0, torch.softmax(lg.double(), -1).topk(topk, dim=-1).indices.flatten(),
            torch.ones(lg.shape[0] * topk, dtype=torch.float64)) for lg in per_layer])
    return torch.stack(losses).mean(), counts


def objective_terms(name: str, lp: torch.Tensor, lp_old: torch.Tensor | None, cfg: RefConfig):
    """(per-token loss, ratio, clipped) from the formulas."""
    if name == "sft":
        return -lp, torch.ones_like(lp), torch.zeros_like(lp, dtype=torch.bool)
    if name == "dft":
        return -lp.detach().exp() * lp, torch.ones_like(lp), torch.zeros_like(lp, dtype=torch.bool)
    if name == "sft_kl":  # lp_old is the frozen reference's log-prob; k3 = exp(d) - d - 1, d = ref - lp
        d = lp_old - lp
        kl = torch.clamp(torch.exp(d) - d - 1, -10.0, 10.0)
        return -lp + cfg.kl_beta * kl, torch.ones_like(lp), torch.zeros_like(lp, dtype=torch.bool)
    assert name in ("psft", "psft_unweighted") and lp_old is not None
    r = torch.exp(torch.clamp(lp - lp_old, -cfg.log_ratio_clamp, cfg.log_ratio_clamp))
    # Advantage +1: only ratios above 1 + eps_high have their gradient cut.
    cut = r.detach() > 1 + cfg.eps_high
    if name == "psft_unweighted":  # the clip's mask on SFT's loss, no ratio weight
        return torch.where(cut, torch.zeros_like(lp), -lp), r.detach(), cut
    loss = -torch.minimum(r, torch.clamp(r, 1 - cfg.eps_low, 1 + cfg.eps_high))
    return loss, r.detach(), cut


class LoRALinear(torch.nn.Module):
    """``base(x) + scale * (x A^T) B^T``, the base frozen (float64, from LoRA's definition)."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = torch.nn.Parameter(a.to(base.weight.dtype).clone())
        self.lora_B = torch.nn.Parameter(b.to(base.weight.dtype).clone())
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_A.T) @ self.lora_B.T

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * self.lora_B @ self.lora_A


def add_lora(model: torch.nn.Module, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
    """Freeze ``model`` and wrap each module named in ``adapters`` (``model.layers.0.self_attn.q_proj``:
    its starting ``(A, B)``) in :class:`LoRALinear`."""
    model.requires_grad_(False)
    for name, (a, b) in adapters.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), a, b, scale))


def make_optimizer(model: torch.nn.Module, cfg: RefConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
    )


def train(model: Any, global_batches: list[list[list[dict[str, torch.Tensor]]]], vocab: int,
          cfg: RefConfig) -> list[dict[str, float]]:
    """Train ``model`` (float64) on global batches of mini-batches of rows; one record per optimizer step."""
    opt = make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapters alone
    # sft_kl's reference: a frozen copy of the starting weights.
    frozen = copy.deepcopy(model).requires_grad_(False) if cfg.objective == "sft_kl" else None
    if frozen is not None:  # under LoRA the reference is the base: the adapters' B = 0 at the start
        assert all(float(m.lora_B.abs().max()) == 0 for m in frozen.modules() if isinstance(m, LoRALinear))
    records, step = [], 0
    for minis in global_batches:
        phase = "sft" if step < cfg.sft_warmup_steps else cfg.objective
        old = None
        if phase not in ("sft", "dft"):  # the snapshot (current weights) or the reference (frozen copy)
            with torch.no_grad():
                old = [token_terms(frozen if phase == "sft_kl" else model, rows, vocab)[0] for rows in minis]
        for j, rows in [(j, rows) for _ in range(cfg.passes) for j, rows in enumerate(minis)]:
            step += 1
            router: list[list[torch.Tensor]] | None = [] if _is_moe(model) else None
            lp, ent = token_terms(model, rows, vocab, router)
            loss_t, ratio, clipped = objective_terms(phase, lp, old[j] if old else None, cfg)
            loss = loss_t.sum() / lp.numel()  # one token mean over the whole mini-batch
            aux, load = torch.zeros((), dtype=torch.float64), None
            if router is not None:
                aux, load = load_balancing(router, model.config.num_experts_per_tok, cfg.micro_batch_size)
                aux = cfg.aux_coeff * aux
            opt.zero_grad()
            (loss + aux).backward()  # the load-balancing term is added to the objective, outside the ratio
            norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
            coeff = cfg.clip_grad / (float(norm) + 1e-6)
            if cfg.clip_grad > 0 and coeff < 1.0:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coeff)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            records.append({
                "step": step, "phase": phase, "loss": float(loss.detach()), "entropy": float(ent.detach().mean()),
                "mean_logp": float(lp.detach().mean()), "clip_frac": float(clipped.double().mean()),
                "ratio_mean": float(ratio.mean()), "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
                "grad_norm": float(norm), "lr": lr, "tokens": int(lp.numel()), "clipped_grad": coeff < 1.0,
            })
            if load is not None:
                records[-1].update(moe_aux_loss=float(aux.detach()), expert_counts=load)
    return records
