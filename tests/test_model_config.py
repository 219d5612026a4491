"""ModelConfig validation and HF config parsing (no processes, no weights)."""

from __future__ import annotations

import json

import pytest

from psft_megatron.model.config import ModelConfig, RopeScaling
from psft_megatron.model.hf_config import hf_config_from_model_config
from psft_megatron.runtime.config import ParallelConfig


def tiny(**kw) -> ModelConfig:
    base = dict(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, vocab_size=1000, params_dtype="fp32")
    base.update(kw)
    return ModelConfig(**base)


def par(tp=1, pp=1, vp=None, cp=1, cp_comm_type="p2p") -> ParallelConfig:
    return ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                          virtual_pipeline_model_parallel_size=vp, context_parallel_size=cp,
                          cp_comm_type=cp_comm_type)


@pytest.mark.parametrize(
    "cfg, parallel, field",
    [
        (tiny(num_query_groups=2), par(tp=4), "model.num_query_groups"),
        (tiny(num_attention_heads=6, num_query_groups=6, hidden_size=66), par(tp=4), "model.num_attention_heads"),
        (tiny(num_query_groups=3), par(), "model.num_query_groups"),
        (tiny(hidden_size=66), par(), "model.hidden_size"),
        (tiny(num_layers=6), par(pp=2, vp=2), "model.num_layers"),
        (tiny(ffn_hidden_size=129), par(tp=2), "model.ffn_hidden_size"),
        (tiny(num_layers=0), par(), "model.num_layers"),
        (tiny(vocab_size=0), par(), "model.vocab_size"),
        (tiny(rope_scaling=RopeScaling(low_freq_factor=4, high_freq_factor=1)), par(), "model.rope_scaling"),
        (tiny(), par(tp=2, cp=2, cp_comm_type="a2a"), "parallel.cp_comm_type"),
        (tiny(recompute_method="uniform"), par(), "model.recompute_method"),
        (tiny(recompute_granularity="full"), par(), "model.recompute_method"),
        (tiny(recompute_granularity="full", recompute_method="block", recompute_num_layers=3), par(pp=2),
         "model.recompute_num_layers"),
        (tiny(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3), par(),
         "model.recompute_num_layers"),
        (tiny(num_attention_heads=6, num_query_groups=3, hidden_size=96, ffn_hidden_size=96), par(tp=3),
         "model.make_vocab_size_divisible_by"),
    ],
)
def test_validate_names_the_field(cfg, parallel, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        cfg.validate(parallel)


@pytest.mark.parametrize("field, value", [("family", "gpt2"), ("params_dtype", "fp16"), ("transformer_impl", "apex")])
def test_choice_fields_are_checked_when_built(field, value):
    with pytest.raises(ValueError, match=f"{field} must be one of .*got '{value}'"):
        tiny(**{field: value})
    with pytest.raises(ValueError, match=rf"model\.{field} must be one of"):
        ModelConfig.from_dict({field: value})


def test_validate_accepts_good_layouts():
    tiny().validate(par(tp=2, pp=2))
    tiny().validate(par(pp=2, vp=2))
    tiny(head_dim=32, hidden_size=66).validate(par())  # explicit head_dim: hidden need not divide


def test_padded_vocab_size_is_the_same_at_every_tp():
    assert tiny(vocab_size=1000).padded_vocab_size == 1024
    assert tiny(vocab_size=1100).padded_vocab_size == 1152
    assert tiny(vocab_size=32000).padded_vocab_size == 32000
    assert tiny(vocab_size=1000, make_vocab_size_divisible_by=64).padded_vocab_size == 1024
    big = tiny(vocab_size=49152, num_attention_heads=6, num_query_groups=3, hidden_size=96, ffn_hidden_size=96)
    big.validate(par(tp=1))
    with pytest.raises(ValueError, match=r"model\.make_vocab_size_divisible_by \(128\).*use 384"):
        big.validate(par(tp=3))


def _write(tmp_path, cfg: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_llama31_rope_scaling_from_v4_and_v5_files(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    common = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5,
                  max_position_embeddings=131072, torch_dtype="bfloat16")
    v4 = ModelConfig.from_hf(dict(common, rope_theta=500000.0, rope_scaling=scaling))
    v5 = ModelConfig.from_hf(dict(common, rope_parameters=dict(scaling, rope_theta=500000.0)))
    assert v4 == v5
    assert v4.rope_theta == 500000.0 and v4.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert (v4.num_query_groups, v4.ffn_hidden_size, v4.params_dtype, v4.qkv_bias) == (8, 14336, "bf16", False)
    v4.validate(par(tp=8, pp=4))


def test_qwen2_has_qkv_bias_and_tied_embeddings():
    cfg = ModelConfig.from_hf(dict(model_type="qwen2", hidden_size=896, intermediate_size=4864,
                                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                          vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0))
    assert cfg.family == "qwen2" and cfg.qkv_bias and cfg.tie_word_embeddings
    with pytest.raises(ValueError, match="num_query_groups"):
        cfg.validate(par(tp=7))  # 14 heads split 7 ways, but 2 key/value heads cannot be


def test_mistral_and_round_trip_through_hf_config():
    cfg = ModelConfig.from_hf(dict(architectures=["MistralForCausalLM"], hidden_size=4096,
                                          intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                          num_key_value_heads=8, vocab_size=32768, head_dim=128))
    assert cfg.family == "mistral" and not cfg.tie_word_embeddings and cfg.head_dim is None
    assert ModelConfig.from_hf(hf_config_from_model_config(cfg)) == cfg


def test_unknown_or_inexact_architectures_are_refused():
    with pytest.raises(ValueError, match="unsupported architecture.*gpt2"):
        ModelConfig.from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    base = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        ModelConfig.from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(dict(base, hidden_act="gelu"))
    with pytest.raises(ValueError, match="attention_bias"):
        ModelConfig.from_hf(dict(base, attention_bias=True))


def test_resolve_takes_fields_from_hf_config_and_keeps_recipe_overrides(tmp_path):
    path = _write(tmp_path, dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                 torch_dtype="float32"))
    cfg = ModelConfig(hf_config=path, num_layers=1).resolve()
    # Architecture from the file unless the recipe set it; params_dtype is the recipe's (default bf16).
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_query_groups, cfg.params_dtype) == (1, 64, 2, "bf16")
    assert cfg.hf_config == path
    with pytest.raises(ValueError, match="unknown key model.num_layer"):
        ModelConfig.from_dict({"num_layer": 2})
