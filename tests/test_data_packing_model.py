"""A real megatron-core GPTModel on packed rows: samples cannot see each other, on every pipeline stage.

One child process (gloo, world size 1) runs everything model-related and returns
tensors; the assertions run here, against references computed independently.
"""

import numpy as np
import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes

pytestmark = pytest.mark.slow  # every test here starts processes

S = 20
ROW_LENGTHS = [[5, 7, 3], [9, 6]]  # two rows: padding 5 in both
VOCAB = 64


def _samples(seed):
    rng = np.random.default_rng(seed)
    return [
        [(rng.integers(0, VOCAB, n).astype(np.int32), np.ones(n, np.uint8)) for n in lens] for lens in ROW_LENGTHS
    ]


def _causal(n):
    return torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]  # True = masked


def _model_checks():
    from psft_megatron.runtime import cpu_compat

    cpu_compat.apply()
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from psft_megatron.data.batches import collate
    from psft_megatron.data.masks import check_model_honours_mask
    from psft_megatron.data.packing import pack_row

    parallel_state.initialize_model_parallel(1)
    model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)

    def config(layers):
        return TransformerConfig(
            num_layers=layers,
            hidden_size=32,
            num_attention_heads=4,
            use_cpu_initialization=True,
            params_dtype=torch.float32,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )

    def gpt(layers, spec, pre=True, post=True):
        m = GPTModel(
            config=config(layers),
            transformer_layer_spec=spec,
            vocab_size=VOCAB,
            max_sequence_length=64,
            position_embedding_type="rope",
            pre_process=pre,
            post_process=post,
        )
        return m.eval()

    causal_spec = get_gpt_layer_local_spec()  # attn_mask_type=causal, the default
    arbitrary_spec = get_gpt_layer_local_spec()
    arbitrary_spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    model = gpt(2, causal_spec)
    model_arb = gpt(2, arbitrary_spec)
    model_arb.load_state_dict(model.state_dict())
    check_model_honours_mask(model)
    check_model_honours_mask(model_arb)

    def packed(samples):
        return collate([pack_row(row, S, pad_id=0) for row in samples])

    out = {}
    with torch.no_grad():
        base = _samples(0)
        mb = packed(base)
        out["packed"] = model(**mb.forward_kwargs("local"))
        out["packed_arbitrary"] = model_arb(**mb.forward_kwargs("local"))
        out["alone"] = [
            [model(torch.from_numpy(ids.astype(np.int64))[None], torch.arange(len(ids))[None], _causal(len(ids)))[0] for ids, _ in row]
            for row in base
        ]
        # Same middle sample per row, all other samples' tokens changed.
        other = _samples(1)
        changed = [[other[r][k] if k != 1 else base[r][1] for k in range(len(base[r]))] for r in range(len(base))]
        out["changed"] = model(**packed(changed).forward_kwargs("local"))
        # Negative control: one causal mask over the whole row (boundaries lost).
        kw = mb.forward_kwargs("local")
        out["no_boundaries"] = model(kw["input_ids"], kw["position_ids"], _causal(S).expand(2, 1, S, S))
        # RoPE on the local path ignores position_ids: contiguous ids give identical logits.
        out["contiguous_pos"] = model(kw["input_ids"], torch.arange(S)[None].expand(2, S), kw["attention_mask"])

        # Two pipeline stages holding layer 0 / layer 1 of `model`, each fed its own forward_kwargs.
        first, last = gpt(1, causal_spec, post=False), gpt(1, causal_spec, pre=False)
        sd = model.state_dict()
        first.load_state_dict(
            {k: v for k, v in sd.items() if k.startswith(("embedding.", "decoder.layers.0."))}
        )
        last.load_state_dict(
            {
                k.replace("decoder.layers.1.", "decoder.layers.0."): v
                for k, v in sd.items()
                if k.startswith(("decoder.layers.1.", "decoder.final_layernorm", "output_layer"))
            }
        )
        hidden = first(**mb.forward_kwargs("local"))
        last.set_input_tensor(hidden)
        out["pp"] = last(**mb.forward_kwargs("local"))
        last.set_input_tensor(hidden)
        out["pp_last_stage_lost_mask"] = last(kw["input_ids"], kw["position_ids"], _causal(S).expand(2, 1, S, S))

        # THD RoPE (the TransformerEngine path's unfused reference) with our PackedSeqParams.
        thd = mb.thd()
        p = thd.packed_seq_params()
        freqs = model.rotary_pos_emb(p.max_seqlen_q, packed_seq=True)
        t = torch.randn(2 * S, 4, 8, generator=torch.Generator().manual_seed(3))
        out["thd_in"] = t
        out["thd_rope"] = apply_rotary_pos_emb(
            t, freqs, model.config, cu_seqlens=p.cu_seqlens_q, cp_group=parallel_state.get_context_parallel_group()
        )
        out["cu_seqlens"] = p.cu_seqlens_q
        out["rotary_base"] = float(model.rotary_base)
    return out


def _rope_reference(x, positions, base):
    """Non-interleaved RoPE on x [t, h, d] with explicit per-token positions."""
    d = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = positions.float()[:, None] * inv[None]
    emb = torch.cat([ang, ang], -1)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


@pytest.fixture(scope="module")
def out():
    return run_in_processes(_model_checks, 1, timeout=120)[0]


def test_packed_samples_are_isolated_in_gpt_model(out):
    tol = dict(atol=2e-5, rtol=1e-5)
    packed = out["packed"]
    assert packed.shape == (2, S, VOCAB)
    for r, lens in enumerate(ROW_LENGTHS):
        offs = np.concatenate([[0], np.cumsum(lens)])
        for k, n in enumerate(lens):
            a, e = offs[k], offs[k + 1]
            alone = out["alone"][r][k]
            # Packed == alone, for both mask types and for the two-stage pipeline.
            torch.testing.assert_close(packed[r, a:e], alone, **tol)
            torch.testing.assert_close(out["packed_arbitrary"][r, a:e], alone, **tol)
            torch.testing.assert_close(out["pp"][r, a:e], alone, **tol)
            torch.testing.assert_close(out["contiguous_pos"][r, a:e], alone, **tol)
        # Changing every other sample in the row leaves the middle sample untouched.
        a, e = offs[1], offs[2]
        torch.testing.assert_close(out["changed"][r, a:e], packed[r, a:e], atol=1e-6, rtol=0)
        # Power of the test: without boundaries the later samples do change.
        assert (out["no_boundaries"][r, a:e] - packed[r, a:e]).abs().max() > 1e-3
        assert (out["pp_last_stage_lost_mask"][r, a:e] - packed[r, a:e]).abs().max() > 1e-3
        # The first sample of a row only ever sees itself, with or without boundaries.
        torch.testing.assert_close(out["no_boundaries"][r, : offs[1]], packed[r, : offs[1]], **tol)


def test_thd_rope_restarts_per_sample(out):
    cu = out["cu_seqlens"].tolist()
    positions = torch.cat([torch.arange(e - a) for a, e in zip(cu[:-1], cu[1:])])
    ref = _rope_reference(out["thd_in"], positions, out["rotary_base"])
    torch.testing.assert_close(out["thd_rope"], ref, atol=1e-5, rtol=1e-5)
    # and it differs from contiguous positions (so the restart is real)
    cont = _rope_reference(out["thd_in"], torch.arange(len(positions)), out["rotary_base"])
    assert (out["thd_rope"] - cont).abs().max() > 1e-2
