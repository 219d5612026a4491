"""Context parallelism: the load-balanced THD split, its attention mask, and the model under CP.

In process (fast):
- :func:`partitioned_indices` equals a loop written from TransformerEngine's definition
  (``thd_get_partitioned_indices``: chunk r and chunk 2*CP-1-r of every sequence);
- splitting packed rows (sample lengths not multiples of 2*CP) and putting every rank's share
  back by its row map gives the rows again: tokens, labels, loss masks, positions; each real
  token is held by exactly one rank, inserted padding has no loss;
- the mask of the gathered-K/V attention equals the block-causal mask of the original rows;
- the batch cursor's mid-global-batch snapshot log-probs saved by two CP ranks restore at CP=1
  and the reverse (layout-independent checkpoints).

In real processes: :func:`_cp2_and_cp1` (the tiny Llama at CP=2 and at CP=1 on the same packed
micro-batch) runs inside ``test_context_parallel_trainer.py``'s CP=2 launch, which checks it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psft_megatron.data.batches import collate
from psft_megatron.data.context_parallel import (
    partitioned_indices,
    split_micro_batch,
    split_micro_batches,
    thd_attention_mask,
)
from psft_megatron.data.masks import block_causal_mask
from psft_megatron.data.packing import pack_row
from psft_megatron.testing.recipes import TINY_MODEL

S = 32
ROWS = ([5, 7, 3], [13, 11, 8], [32], [1, 2, 29])  # none a multiple of 4 or 6 (but the full row)


def _micro_batch(lengths_per_row=ROWS, seed=0, vocab=300):
    rng = np.random.default_rng(seed)
    rows = []
    for lens in lengths_per_row:
        samples = [(rng.integers(1, vocab, n), (rng.random(n) < 0.7).astype(np.float32)) for n in lens]
        rows.append(pack_row(samples, S, pad_id=0))
    return collate(rows)


def _reference_indices(padded_lengths: list[int], cp: int, r: int) -> list[int]:
    """TransformerEngine's split written out: per sequence, chunk r then chunk 2cp-1-r."""
    out, start = [], 0
    for n in padded_lengths:
        c = n // (2 * cp)
        out += list(range(start + r * c, start + (r + 1) * c))
        out += list(range(start + (2 * cp - 1 - r) * c, start + (2 * cp - r) * c))
        start += n
    return out


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_partitioned_indices_match_transformer_engine_definition(cp):
    lengths = [2 * cp * k for k in (1, 3, 2, 5)]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    shares = [partitioned_indices(cu, cp, r).tolist() for r in range(cp)]
    for r in range(cp):
        assert shares[r] == _reference_indices(lengths, cp, r)
    assert sorted(i for s in shares for i in s) == list(range(sum(lengths)))  # a partition
    with pytest.raises(ValueError, match="multiple of 2 x CP"):
        partitioned_indices(torch.tensor([0, 2 * cp + 1]), cp, 0)


@pytest.mark.parametrize("cp", [2, 3])
def test_split_round_trip_recovers_every_row(cp):
    mb = _micro_batch()
    shares = split_micro_batches([mb], cp_size=cp, cp_rank=0, multiple=2)[0], *(
        split_micro_batches([mb], cp_size=cp, cp_rank=r, multiple=2)[0] for r in range(1, cp))
    t = shares[0].shape[1]
    assert all(s.shape == (1, t) for s in shares)
    assert (t * cp) % (2 * cp * 2) == 0 and t * cp >= mb.shape[0] * S
    seen = torch.zeros(mb.shape, dtype=torch.int64)
    for sh in shares:
        rm = sh.row_map
        real = rm.index >= 0
        r, i = rm.row[real], rm.index[real]
        seen[r, i] += 1
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(sh, name)[0, real], getattr(mb, name)[r, i]), name
        assert (sh.loss_mask[0, ~real] == 0).all()  # inserted padding carries no loss
        assert sh.num_loss_tokens == int(sh.loss_mask.sum())
        # THD metadata: real lengths cumulated, padded lengths multiples of 2*CP, RoPE table long enough.
        padded = torch.diff(sh.cu_seqlens_padded.long())
        assert torch.equal(torch.diff(sh.cu_seqlens.long()), torch.diff(mb.cu_seqlens.long()))
        assert (padded % (2 * cp) == 0).all() and sh.max_seqlen == int(padded.max())
        assert int(sh.cu_seqlens_padded[-1]) == t * cp
    assert (seen == 1).all()  # every real token on exactly one rank
    assert sum(sh.num_loss_tokens for sh in shares) == mb.num_loss_tokens


def test_split_pads_every_micro_batch_of_a_call_to_one_length():
    a, b = _micro_batch(ROWS[:2], seed=1), _micro_batch(([31], [3, 3, 3]), seed=2)
    sa, sb = split_micro_batches([a, b], cp_size=2, cp_rank=1)
    assert sa.shape == sb.shape  # one pipeline tensor shape per schedule call
    with pytest.raises(ValueError, match="as the loader made it"):
        split_micro_batch(sa, 2, 0, 64)


@pytest.mark.parametrize("cp", [2, 3])
def test_gathered_attention_mask_is_the_rows_block_causal_mask(cp):
    mb = _micro_batch()
    shares = [split_micro_batches([mb], cp, r)[0] for r in range(cp)]
    # The keys as the all-gather orders them: rank 0's share, then rank 1's, ...
    k_row = torch.cat([s.row_map.row for s in shares])
    k_idx = torch.cat([s.row_map.index for s in shares])
    allowed = ~block_causal_mask(mb.segment_ids)[:, 0]  # [b, S, S] True = query sees key
    for r, sh in enumerate(shares):
        mask = thd_attention_mask(sh.cu_seqlens, sh.cu_seqlens_padded, cp, r)
        assert mask.shape == (sh.shape[1], sh.shape[1] * cp)
        q_row, q_idx = sh.row_map.row, sh.row_map.index
        q_real, k_real = q_idx >= 0, k_idx >= 0
        sees = ~mask[q_real][:, k_real]
        same_row = q_row[q_real][:, None] == k_row[k_real][None, :]
        expect = same_row & allowed[q_row[q_real][:, None], q_idx[q_real][:, None], k_idx[k_real][None, :]]
        assert torch.equal(sees, expect)
        # Inserted padding attends only to itself and is seen by nobody else.
        pad_q = (~q_real).nonzero().flatten()
        for q in pad_q.tolist():
            assert (~mask[q]).sum() == 1 and not mask[q, r * sh.shape[1] + q]
        assert mask[:, ~k_real].sum(0).ge(sh.shape[1] - 1).all()


def test_batch_cursor_snapshot_rows_restore_across_cp_layouts():
    """logp_old of a mini-batch still to run, saved by 2 CP ranks, restores at CP=1 and back."""
    from psft_megatron.data.batches import MiniBatch
    from psft_megatron.training.batch_cursor import BatchCursor, RowLayout

    full = [_micro_batch(ROWS[:2], seed=3), _micro_batch(ROWS[2:], seed=4)]  # 2 micro-batches of 2 rows
    truth = [torch.randn(mb.shape) for mb in full]  # a log-prob per original token, [b, S]
    layout = RowLayout(dp_rank=0, dp_size=1, mini_batch_size=4, micro_batch_size=2)
    state = {"active": True, "next_mini": 1, "start_step": 0, "loader_before": {}}

    def logp_of(mbs):  # [s, b] per micro-batch, as the snapshot would give it
        out = []
        for mb, tr in zip(mbs, truth):
            rm = mb.token_rows()
            vals = torch.where(rm.index >= 0, tr[rm.row, rm.index.clamp(min=0)], torch.tensor(7.0))
            out.append(vals.reshape(mb.shape).transpose(0, 1))
        return out

    def save(mbs_per_rank):
        shards = []
        for mbs in mbs_per_rank:
            c = BatchCursor(layout, holds_logp=True)
            minis = [MiniBatch(mbs, 0, 0)] * 2
            c.begin(minis, [None, logp_of(mbs)], 0, {})
            c.advance()  # mini-batch 0 done: mini-batch 1 still to run
            shards.append(c.shard_state_dict())
        return shards

    def restore(shards, mbs):
        c = BatchCursor(layout, holds_logp=True)
        c.load_state_dict(state)
        c.load_shards(shards)
        c.resume([MiniBatch(mbs, 0, 0)] * 2, torch.device("cpu"))
        return c.logp_old[1]

    cp2 = [split_micro_batches(full, 2, r) for r in range(2)]
    # Saved at CP=2, restored at CP=1: the whole rows.
    for got, tr in zip(restore(save(cp2), full), truth):
        assert torch.equal(got, tr.transpose(0, 1))
    # Saved at CP=1, restored on each CP=2 rank: that rank's share (inserted padding reads 0).
    shards = save([full])
    for r in range(2):
        for got, mb, tr in zip(restore(shards, cp2[r]), cp2[r], truth):
            rm = mb.token_rows()
            want = torch.where(rm.index >= 0, tr[rm.row, rm.index.clamp(min=0)], torch.tensor(0.0))
            assert torch.equal(got, want.reshape(mb.shape).transpose(0, 1))
    # The same layout round-trips bit for bit on the real tokens.
    for r in range(2):
        for got, want, mb in zip(restore(save(cp2), cp2[r]), logp_of(cp2[r]), cp2[r]):
            real = (mb.token_rows().index >= 0).reshape(mb.shape).transpose(0, 1)
            assert torch.equal(got[real], want[real])


# ---- the model at CP=2 vs CP=1, in two real processes ------------------------------------------


def _forward_backward(cp: int, seed: int) -> dict:
    """This rank's logits per original (row, position) and its parameter gradients at CP=cp."""
    from psft_megatron.model.build import build_model
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.model.forward import prepare_micro_batches
    from psft_megatron.model.init import init_layout_independent
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    init_distributed()  # applies the CPU routes (idempotent)
    parallel = ParallelConfig(context_parallel_size=cp)
    init_model_parallel(parallel)
    set_seed(seed)
    model_cfg = ModelConfig(**{**TINY_MODEL, "vocab_size": 300})
    built = build_model(model_cfg, parallel)
    init_layout_independent(built.chunks, seed)
    chunk = built.chunks[0]
    (mb,) = prepare_micro_batches([_micro_batch()], "local", torch.device("cpu"))
    logits = chunk(**mb.forward_kwargs("local"), labels=mb.labels)  # [s, b, V]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, mb.labels.transpose(0, 1).unsqueeze(-1)).squeeze(-1)
    loss = -(logp * mb.loss_mask.transpose(0, 1)).sum()
    loss.backward()
    rm = mb.token_rows()
    real = rm.index >= 0
    flat = logits.detach().transpose(0, 1).reshape(-1, logits.shape[-1])
    return {
        "row": rm.row[real], "index": rm.index[real], "logits": flat[real], "loss": float(loss),
        "grads": {n: p.grad.detach().clone() for n, p in chunk.named_parameters()},
        "attention": type(chunk.decoder.layers[0].self_attention.core_attention).__name__,
    }


def _cp2_and_cp1() -> dict:
    return {"cp2": _forward_backward(2, seed=11), "cp1": _forward_backward(1, seed=11)}
