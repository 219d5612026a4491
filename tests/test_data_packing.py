"""Packing: plans cover every sample once, labels/masks never cross a boundary, masks are block-causal."""

import numpy as np
import pytest
import torch

from psft_megatron.data.batches import collate
from psft_megatron.data.masks import block_causal_mask, check_model_honours_mask, packed_seq_params
from psft_megatron.data.packing import pack_row, plan_packs


def _samples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(1, 1000, n).astype(np.int32), (rng.random(n) < 0.6).astype(np.uint8)) for n in lengths
    ]


@pytest.mark.parametrize("strategy", ["best_fit", "sequential"])
def test_plan_covers_each_sample_once_within_capacity(strategy):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 65, 500)
    order = rng.permutation(500)
    rows = plan_packs(lengths, 64, order=order, strategy=strategy)
    flat = [i for r in rows for i in r]
    assert sorted(flat) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert rows == plan_packs(lengths, 64, order=order, strategy=strategy)  # deterministic
    if strategy == "sequential":
        assert flat == order.tolist()
    else:
        # best fit packs at least as tightly as sequential filling
        assert len(rows) <= len(plan_packs(lengths, 64, order=order, strategy="sequential"))


def test_plan_rejects_too_long_and_empty():
    with pytest.raises(ValueError, match="more than seq_length=8"):
        plan_packs([3, 9, 2], 8)
    with pytest.raises(ValueError, match="empty"):
        plan_packs([3, 0], 8)


def test_pack_row_matches_reference():
    lengths = [5, 1, 7, 3]
    samples = _samples(lengths)
    S, pad = 20, 7
    row = pack_row(samples, S, pad_id=pad, sample_ids=[10, 11, 12, 13])

    # Independent reference built position by position.
    ref_tok, ref_lab, ref_mask, ref_pos, ref_seg = [], [], [], [], []
    for k, (ids, m) in enumerate(samples):
        for j in range(len(ids)):
            ref_tok.append(int(ids[j]))
            last = j == len(ids) - 1
            ref_lab.append(pad if last else int(ids[j + 1]))
            ref_mask.append(0.0 if last else float(m[j + 1]))
            ref_pos.append(j)
            ref_seg.append(k)
    n_pad = S - len(ref_tok)
    ref_tok += [pad] * n_pad
    ref_lab += [pad] * n_pad
    ref_mask += [0.0] * n_pad
    ref_pos += list(range(n_pad))
    ref_seg += [len(samples)] * n_pad

    assert row.tokens.tolist() == ref_tok
    assert row.labels.tolist() == ref_lab
    assert row.loss_mask.tolist() == ref_mask
    assert row.position_ids.tolist() == ref_pos
    assert row.segment_ids.tolist() == ref_seg
    assert row.cu_seqlens.tolist() == [0, 5, 6, 13, 16, 20]
    assert row.sample_ids == (10, 11, 12, 13)
    assert row.num_loss_tokens == sum(int(m[1:].sum()) for _, m in samples)


def test_pack_row_full_row_has_no_padding_segment_and_rejects_overflow():
    samples = _samples([4, 4])
    row = pack_row(samples, 8, pad_id=0)
    assert row.cu_seqlens.tolist() == [0, 4, 8]
    assert row.loss_mask[3] == 0 and row.loss_mask[7] == 0
    with pytest.raises(ValueError, match="more than seq_length"):
        pack_row(samples, 7, pad_id=0)


def test_block_causal_mask_and_cu_seqlens_consistent():
    rows = [pack_row(_samples([3, 4], seed=s), 10, 0) for s in range(2)] + [pack_row(_samples([10]), 10, 0)]
    mb = collate(rows)
    mask = mb.attention_mask()
    assert mask.shape == (3, 1, 10, 10) and mask.dtype == torch.bool
    for b in range(3):
        seg = mb.segment_ids[b].tolist()
        for i in range(10):
            for j in range(10):
                allowed = j <= i and seg[i] == seg[j]
                assert bool(mask[b, 0, i, j]) == (not allowed)
    # Flattened cu_seqlens: row boundaries are segment boundaries, ends at b*S.
    assert mb.cu_seqlens.tolist() == [0, 3, 7, 10, 13, 17, 20, 30]
    assert mb.max_seqlen == 10
    assert mb.cu_seqlens.dtype == torch.int32
    thd = mb.thd()
    assert thd.tokens.shape == (1, 30)
    seg = thd.segment_ids[0]
    # Every cu_seqlens interval is exactly one THD segment.
    for a, e in zip(mb.cu_seqlens[:-1].tolist(), mb.cu_seqlens[1:].tolist()):
        assert len(set(seg[a:e].tolist())) == 1
        assert thd.position_ids[0, a:e].tolist() == list(range(e - a))
    assert len(set(seg.tolist())) == len(mb.cu_seqlens) - 1
    p = thd.packed_seq_params()
    assert p.qkv_format == "thd" and p.max_seqlen_q == p.max_seqlen_kv == 10
    assert torch.equal(p.cu_seqlens_q, mb.cu_seqlens) and torch.equal(p.cu_seqlens_kv, mb.cu_seqlens)
    kw = thd.forward_kwargs("transformer_engine")
    assert kw["attention_mask"] is None and kw["packed_seq_params"].qkv_format == "thd"
    with pytest.raises(ValueError, match="thd"):
        mb.forward_kwargs("transformer_engine")


def test_labels_never_cross_boundaries_in_batches():
    rng = np.random.default_rng(3)
    rows = []
    for _ in range(6):
        lens = rng.integers(1, 9, 4)
        rows.append(pack_row(_samples(lens, seed=int(rng.integers(1 << 30))), 40, 0))
    mb = collate(rows)
    seg, lm = mb.segment_ids, mb.loss_mask
    crosses = torch.zeros_like(lm, dtype=torch.bool)
    crosses[:, :-1] = seg[:, 1:] != seg[:, :-1]
    crosses[:, -1] = True
    assert (lm[crosses] == 0).all()
    assert mb.num_loss_tokens == int(lm.sum())


def test_mask_guard_flags_fused_causal_softmax():
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    def softmax(mask_type, fusion, bf16=True, window=None):
        return torch.nn.ModuleDict(
            {
                "attn": FusedScaleMaskSoftmax(
                    input_in_fp16=False,
                    input_in_bf16=bf16,
                    attn_mask_type=mask_type,
                    scaled_masked_softmax_fusion=fusion,
                    mask_func=attention_mask_func,
                    softmax_in_fp32=True,
                    scale=None,
                    window_size=window,
                )
            }
        )

    with pytest.raises(ValueError, match="ignores the packed-sequence mask"):
        check_model_honours_mask(softmax(AttnMaskType.causal, True))
    with pytest.raises(ValueError, match="window_size"):
        check_model_honours_mask(softmax(AttnMaskType.arbitrary, False, window=(4, 0)))
    check_model_honours_mask(softmax(AttnMaskType.arbitrary, True))
    check_model_honours_mask(softmax(AttnMaskType.causal, False))
    check_model_honours_mask(softmax(AttnMaskType.causal, True, bf16=False))


def test_block_causal_mask_1d_and_packed_seq_params_dtype():
    m = block_causal_mask(torch.tensor([0, 0, 1]))
    assert m.shape == (1, 1, 3, 3)
    assert m[0, 0].tolist() == [[False, True, True], [False, False, True], [True, True, False]]
    p = packed_seq_params(torch.tensor([0, 2, 3], dtype=torch.int64), 2)
    assert p.cu_seqlens_q.dtype == torch.int32
