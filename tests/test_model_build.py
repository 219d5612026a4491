"""build_model in real processes: TP=1 (DP=2), TP=2, PP=2 and PP=2 x VP=2 in one 2-process launch."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes

pytestmark = pytest.mark.slow  # every test here starts processes


def _cfg(**kw: Any):
    from psft_megatron.model.config import ModelConfig, RopeScaling

    base = dict(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                num_query_groups=2, vocab_size=1000, params_dtype="fp32", transformer_impl="auto",
                rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), rope_theta=500000.0)
    base.update(kw)
    return ModelConfig(**base)


def _describe(built: Any) -> dict[str, Any]:
    chunks = []
    for c in built.chunks:
        params = {n: (tuple(p.shape), p.dtype) for n, p in c.named_parameters()}
        chunks.append({"pre": c.pre_process, "post": c.post_process, "params": params,
                       "inv_freq": c.rotary_pos_emb.inv_freq.clone()})
    return {"impl": built.transformer_impl, "vocab": built.padded_vocab_size, "layers": built.layers_per_chunk,
            "description": built.description, "chunks": chunks, "num_parameters": built.num_parameters}


def build_layouts_worker() -> dict[str, Any]:
    from psft_megatron.model.build import build_model
    from psft_megatron.runtime import cpu_compat
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_model_parallel, set_seed

    cpu_compat.apply()
    out = {}
    layouts = {
        "tp1": ParallelConfig(),
        "tp2": ParallelConfig(tensor_model_parallel_size=2),
        "pp2": ParallelConfig(pipeline_model_parallel_size=2),
        "pp2vp2": ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    }
    for name, parallel in layouts.items():
        init_model_parallel(parallel)
        set_seed(0)
        out[f"llama_{name}"] = _describe(build_model(_cfg(), parallel))
        # Tied embeddings at PP=2 need cpu_compat's route for LanguageModule's .cuda() call.
        qwen = _cfg(family="qwen2", qkv_bias=True, tie_word_embeddings=True, params_dtype="bf16",
                    rope_scaling=None, vocab_size=1100)
        out[f"qwen2_{name}"] = _describe(build_model(qwen, parallel))
    return out


@pytest.fixture(scope="module")
def built() -> list[dict[str, Any]]:
    return run_in_processes(build_layouts_worker, 2, timeout=240)


QKV = "decoder.layers.0.self_attention.linear_qkv"


def test_tp1_is_the_whole_model(built):
    for rank in built:
        llama = rank["llama_tp1"]
        assert llama["impl"] == "local" and llama["vocab"] == 1024 and llama["layers"] == [[0, 1, 2, 3]]
        (chunk,) = llama["chunks"]
        assert chunk["pre"] and chunk["post"]
        p = chunk["params"]
        assert p[f"{QKV}.weight"][0] == (128, 64)  # 2 groups x (2 q heads + k + v) x 16
        assert f"{QKV}.bias" not in p and "output_layer.weight" in p
        assert p["decoder.layers.0.mlp.linear_fc1.weight"][0] == (192, 64)
        assert p["embedding.word_embeddings.weight"][0] == (1024, 64)
        # HF Llama parameter count plus the 24 padded rows of embedding and output layer.
        hf = 1000 * 64 * 2 + 64 + 4 * (2 * 64 + 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)
        assert llama["num_parameters"] == hf + 2 * 24 * 64


def test_tp2_splits_query_groups_vocab_and_ffn(built):
    for rank in built:
        p = rank["llama_tp2"]["chunks"][0]["params"]
        assert p[f"{QKV}.weight"][0] == (64, 64)  # one query group: 2 q heads + k + v, 16 wide
        assert p["decoder.layers.0.mlp.linear_fc1.weight"][0] == (96, 64)
        assert p["decoder.layers.0.self_attention.linear_proj.weight"][0] == (64, 32)
        assert p["embedding.word_embeddings.weight"][0] == (512, 64)
        q = rank["qwen2_tp2"]
        qp = q["chunks"][0]["params"]
        assert q["vocab"] == 1152  # 1100 rounded up to a multiple of 128, the same at every TP
        assert qp["embedding.word_embeddings.weight"][0] == (576, 64)
        assert qp[f"{QKV}.bias"] == ((64,), torch.bfloat16) and qp[f"{QKV}.weight"][1] == torch.bfloat16
        assert "decoder.layers.0.self_attention.linear_proj.bias" not in qp
        assert "output_layer.weight" not in qp  # tied to the embedding on a single stage


def test_pp2_gives_each_stage_half_the_layers(built):
    first, last = (r["llama_pp2"] for r in built)
    assert first["layers"] == [[0, 1]] and last["layers"] == [[2, 3]]
    assert first["chunks"][0]["pre"] and not first["chunks"][0]["post"]
    assert last["chunks"][0]["post"] and not last["chunks"][0]["pre"]
    assert "embedding.word_embeddings.weight" not in last["chunks"][0]["params"]
    # Tied embeddings: the last stage keeps its own copy of the word embeddings as output layer.
    assert "output_layer.weight" in built[1]["qwen2_pp2"]["chunks"][0]["params"]
    assert "chunk 0: embedding+layers 0-1" in first["description"]


def test_virtual_pipeline_interleaves_layers(built):
    first, last = (r["llama_pp2vp2"] for r in built)
    assert first["layers"] == [[0], [2]] and last["layers"] == [[1], [3]]
    assert [c["pre"] for c in first["chunks"]] == [True, False]
    assert [c["post"] for c in last["chunks"]] == [False, True]
    assert not any(c["post"] for c in first["chunks"]) and not any(c["pre"] for c in last["chunks"])


def test_llama3_rope_scaling_matches_transformers(built):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = built[0]["llama_tp2"]["chunks"][0]["inv_freq"]
    assert torch.equal(got, expected.float())
