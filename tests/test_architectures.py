"""The model families (``psft_megatron.model.architectures``): the registry is the one list of them.

Against transformers' own config classes and models (no processes, no megatron):

- every registered family maps a random small config, made by transformers' own config class,
  to a ``ModelConfig`` whose parameter count is the transformers model's, and back to a config.json
  that transformers reads as the same model (same parameters; the same logits with the same weights);
- every family's weight table names exactly the tensors transformers saves (its checkpoint format:
  a mixture-of-experts model saves one tensor per expert, whatever it fuses in memory);
- the choices of ``model.family`` and the unsupported-model-type error (through ``ModelConfig.from_hf``,
  the converter's check and a recipe) name exactly the registered families;
- every table row resolves: its transform exists (the family's own never shadows a generic one) and
  takes as many HF tensors as the row names; its condition is a ``ModelConfig`` attribute.

The conversions themselves (tensors, at TP/PP) are checked against transformers in test_conversion.py.
A new family is covered here by being registered; its own features get their own test here too.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import pkgutil
import random
from typing import Any, get_args, get_type_hints

import pytest
import torch
import yaml

from psft_megatron.config.load import ConfigError
from psft_megatron.conversion.checks import hf_model_config
from psft_megatron.conversion.errors import ConversionError
from psft_megatron.conversion.registry import expand, transform_of
from psft_megatron.conversion.transforms import TRANSFORMS
from psft_megatron.model import architectures
from psft_megatron.model.architectures import ARCHITECTURES, FAMILIES, FAMILY_MODULES, architecture_of_hf
from psft_megatron.model.architectures.base import PLACEHOLDERS, Architecture, WeightMapping, placeholders_of
from psft_megatron.model.config import ModelConfig
from psft_megatron.model.hf_config import hf_config_from_model_config
from psft_megatron.recipe import load_recipe

SEEDS = range(4)
MODEL_TYPES = sorted(t for a in ARCHITECTURES.values() for t in a.model_types)


def _random_hf_config(arch: Architecture, seed: int) -> Any:
    """A small random config of ``arch``'s model type, made by transformers' own config class."""
    from transformers import AutoConfig

    rng = random.Random(seed)
    heads = rng.choice([2, 4, 8])
    kv = rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0])
    kw: dict[str, Any] = dict(
        vocab_size=rng.randrange(50, 300), hidden_size=heads * rng.choice([8, 16]),
        intermediate_size=rng.randrange(16, 96), num_hidden_layers=rng.randrange(1, 4), num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=rng.choice([64, 128, 512]),
        rms_norm_eps=rng.choice([1e-5, 1e-6, 3e-6]), tie_word_embeddings=rng.random() < 0.5,
        rope_theta=rng.choice([10000.0, 500000.0, 1e6]),
    )
    if seed % 2:  # Llama-3.1 frequency scaling
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": rng.choice([2.0, 8.0]), "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    config_class = type(AutoConfig.for_model(arch.model_types[0]))
    if "head_dim" in inspect.signature(config_class.__init__).parameters and seed % 2 == 0:
        kw["head_dim"] = rng.choice([8, 24])  # not hidden / heads: an explicit head size
    if "sliding_window" in inspect.signature(config_class.__init__).parameters:
        kw["sliding_window"] = None  # not reproduced (logged): left out of the exact comparison
    if "moe_intermediate_size" in inspect.signature(config_class.__init__).parameters:  # mixture of experts
        layers = kw["num_hidden_layers"] = rng.randrange(2, 5)
        experts = rng.choice([2, 4, 8])
        kw.update(num_experts=experts, num_experts_per_tok=rng.randrange(1, experts + 1),
                  moe_intermediate_size=rng.randrange(8, 48), norm_topk_prob=rng.random() < 0.5,
                  router_aux_loss_coef=rng.choice([0.0, 1e-3, 0.01]), decoder_sparse_step=rng.choice([1, 2]),
                  mlp_only_layers=sorted(rng.sample(range(layers), rng.randrange(0, 2))))
        if kw["num_experts_per_tok"] == 1:
            kw["norm_topk_prob"] = False  # megatron's router cannot give top-1 weight 1 (refused)
        if kw["decoder_sparse_step"] == 2 and set(kw["mlp_only_layers"]) >= set(range(1, layers, 2)):
            kw["mlp_only_layers"] = []  # keep at least one expert layer
    return AutoConfig.for_model(arch.model_types[0], **kw)


def _model(hf_config: Any, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf_config._attn_implementation = "eager"
    # transformers' plain per-expert loop (its grouped-GEMM path wants 16-byte aligned sizes).
    hf_config._experts_implementation = "eager"
    return AutoModelForCausalLM.from_config(hf_config).eval()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_config_round_trips_through_transformers(family, seed, tmp_path):
    from transformers import AutoConfig

    arch = ARCHITECTURES[family]
    original = _random_hf_config(arch, seed)
    cfg = ModelConfig.from_hf(original.to_dict())  # a config.json as transformers writes it
    assert cfg.family == family and architecture_of_hf(original.to_dict()) is arch
    hf = _model(original)
    assert type(hf).__name__ == arch.hf_class
    # The ModelConfig describes transformers' model: its parameter count, vocabulary unpadded.
    unpadded = dataclasses.replace(cfg, make_vocab_size_divisible_by=1)
    assert unpadded.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert (cfg.rope_theta, cfg.norm_epsilon, cfg.kv_channels) == (
        original.rope_parameters["rope_theta"] if hasattr(original, "rope_parameters") else original.rope_theta,
        original.rms_norm_eps, getattr(original, "head_dim", None) or original.hidden_size // original.num_attention_heads)

    # ModelConfig -> config.json -> ModelConfig is the identity; transformers reads the file as the same model.
    back = hf_config_from_model_config(cfg)
    assert ModelConfig.from_hf(back) == cfg
    (tmp_path / "config.json").write_text(json.dumps(back))
    again = _model(AutoConfig.from_pretrained(tmp_path), seed=1)
    assert type(again).__name__ == arch.hf_class
    assert again.config.tie_word_embeddings == original.tie_word_embeddings
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(again) == shapes(hf)
    again.load_state_dict(hf.state_dict())
    ids = torch.randint(0, original.vocab_size, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # RoPE (theta, scaling), norm epsilon, biases: the same function
        assert torch.equal(again(ids).logits, hf(ids).logits)


def _saved_tensors(model: Any, folder: Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor ``save_pretrained`` writes (the checkpoint the converter reads)."""
    from safetensors import safe_open

    model.save_pretrained(folder)
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_table_names_every_transformers_parameter(family, seed, tmp_path):
    original = _random_hf_config(ARCHITECTURES[family], seed)
    cfg = ModelConfig.from_hf(original.to_dict())
    hf_names = [h for _, names, _ in expand(cfg) for h in names]
    assert len(hf_names) == len(set(hf_names))
    # Tied: transformers saves the embedding once (no lm_head.weight). transformers 5 holds a MoE
    # layer's experts as fused 3-D parameters but saves one tensor per expert, as the hub's files do.
    model = _model(original)
    saved = _saved_tensors(model, tmp_path)
    assert set(hf_names) == set(saved)
    if not cfg.is_moe:
        assert set(saved) == {n for n, _ in model.named_parameters()}


def test_family_choices_are_the_registry():
    assert FAMILIES == tuple(ARCHITECTURES) == tuple(m.ARCHITECTURE.family for m in FAMILY_MODULES)
    assert get_args(get_type_hints(ModelConfig)["family"]) == FAMILIES
    with pytest.raises(ValueError, match="family must be one of") as e:
        ModelConfig(family="gpt2")
    assert ast.literal_eval(str(e.value).split("must be one of ")[1].split(", got")[0]) == list(FAMILIES)


def test_every_family_module_is_registered():
    """A module of the package that defines ARCHITECTURE is a family and is in the registry."""
    for info in pkgutil.iter_modules(architectures.__path__):
        module = importlib.import_module(f"{architectures.__name__}.{info.name}")
        if hasattr(module, "ARCHITECTURE"):
            assert module in FAMILY_MODULES, f"{info.name} defines ARCHITECTURE but is not in FAMILY_MODULES"
            assert ARCHITECTURES[module.ARCHITECTURE.family] is module.ARCHITECTURE


def test_two_families_may_not_claim_one_model_type():
    llama = ARCHITECTURES["llama"]
    clash = dataclasses.replace(llama, family="llama_copy")
    with pytest.raises(RuntimeError, match="HF model_type 'llama' is claimed by both llama and llama_copy"):
        architectures._index([("llama", llama), ("llama", clash)], "HF model_type")


def _listed_model_types(message: str) -> list[str]:
    assert "\n" not in message.strip(), message  # one line
    return ast.literal_eval(message.split("supported model types: ")[1].strip().rstrip(")"))


def test_unsupported_model_type_names_exactly_the_registered_families(tmp_path, tiny):
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64}
    with pytest.raises(ValueError, match=r"unsupported architecture: model_type='gpt2'") as e:
        ModelConfig.from_hf(gpt2)
    assert _listed_model_types(str(e.value)) == MODEL_TYPES

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(ConversionError) as e:  # the converter's up-front check
        hf_model_config(folder)
    assert str(folder / "config.json") in str(e.value) and _listed_model_types(str(e.value)) == MODEL_TYPES

    recipe = tmp_path / "recipe.yaml"
    text = yaml.safe_dump(tiny(model={"hf_config": str(folder)}), sort_keys=False)
    recipe.write_text(text)
    line = text.splitlines().index(f"  hf_config: {folder}") + 1
    with pytest.raises(ConfigError) as e:  # a recipe: the file and line of model.hf_config
        load_recipe(recipe)
    assert str(e.value).startswith(f"{recipe}:{line}: model.hf_config: {folder}: unsupported architecture")
    assert _listed_model_types(str(e.value)) == MODEL_TYPES


@pytest.mark.parametrize("family", FAMILIES)
def test_every_row_resolves(family):
    arch = ARCHITECTURES[family]
    assert not set(arch.transforms) & set(TRANSFORMS), "a family's own transform may not shadow a generic one"
    model = ModelConfig()
    for row in arch.weights:
        fn = transform_of(arch, row)
        assert fn.num_hf == len(row.hf), row
        assert set(placeholders_of("".join(row.hf))) <= set(row.placeholders) <= set(PLACEHOLDERS), row
        if row.when:
            assert hasattr(model, row.when.removeprefix("not ")), row
    megatron = [row.megatron for row in arch.weights]
    assert len(megatron) == len(set(megatron))


def test_conditions_select_rows():
    base = dict(family="llama", num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                vocab_size=100)
    names = lambda cfg: {m for m, _, _ in expand(cfg)}  # noqa: E731
    plain, biased = names(ModelConfig(**base)), names(ModelConfig(**base, qkv_bias=True))
    tied = names(ModelConfig(**base, tie_word_embeddings=True))
    assert biased - plain == {f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in range(2)}
    assert plain - tied == {"output_layer.weight"} and not tied - plain


def test_a_row_expands_over_every_placeholder_it_names(monkeypatch):
    """Mixture-of-experts tables: per-expert HF tensors <-> megatron's per-expert (or grouped GEMM)
    tensors expand once per layer and expert, once ``{expert}`` has a size."""
    monkeypatch.setitem(PLACEHOLDERS, "expert", lambda cfg: 3)
    moe = Architecture(
        family="moe_test", model_types=("moe_test",), hf_class="MoeTestForCausalLM",
        fields_from_hf=lambda cfg: {}, to_hf_config=lambda model, dtype: {},
        weights=(
            WeightMapping("decoder.layers.{layer}.mlp.router.weight", ("model.layers.{layer}.mlp.gate.weight",)),
            WeightMapping("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
                          ("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
                           "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"), "gate_up"),
            WeightMapping("decoder.layers.{layer}.mlp.experts.linear_fc2.weight{expert}",
                          ("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",)),
        ),
    )
    rows = expand(ModelConfig(num_layers=2), moe)
    assert len(rows) == 2 + 2 * 3 + 2 * 3
    pairs = {m: hf for m, hf, _ in rows}
    assert pairs["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"] == (
        "model.layers.1.mlp.experts.2.gate_proj.weight", "model.layers.1.mlp.experts.2.up_proj.weight")
    assert pairs["decoder.layers.0.mlp.experts.linear_fc2.weight1"] == ("model.layers.0.mlp.experts.1.down_proj.weight",)
    monkeypatch.delitem(PLACEHOLDERS, "expert")
    with pytest.raises(KeyError, match=r"unknown placeholder\(s\) \['expert'\]"):
        expand(ModelConfig(num_layers=2), moe)


# ----------------------------------------------------------------------------- Qwen3 and Qwen3-MoE


def test_qwen3_head_dim_and_query_key_norms_follow_transformers():
    """A Qwen3 config.json without head_dim means 128 to transformers (not hidden / heads); the
    per-head q/k norms are megatron's qk_layernorm."""
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2).to_dict()
    cfg.pop("head_dim")
    model = _model(Qwen3Config(**cfg))
    ours = ModelConfig.from_hf(cfg)
    assert ours.kv_channels == model.config.head_dim == 128 != 64 // 4
    assert ours.qk_layernorm and not ours.qkv_bias
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (ours.kv_channels,)
    with pytest.raises(ValueError, match="attention_bias=true"):
        ModelConfig.from_hf(dict(cfg, attention_bias=True))


@pytest.mark.parametrize("step, only", [(1, []), (1, [0, 3]), (2, []), (2, [1]), (3, [0])])
def test_qwen3_moe_expert_layers_are_transformers(step, only):
    """mlp_only_layers and decoder_sparse_step pick the same expert layers as transformers' decoder."""
    from transformers import Qwen3MoeConfig

    hf = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                        num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                        num_experts_per_tok=2, decoder_sparse_step=step, mlp_only_layers=only)
    model = _model(hf)
    want = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    ours = ModelConfig.from_hf(hf.to_dict())
    assert ours.moe_layers == want and ours.dense_layers == sorted(set(range(6)) - set(want))
    # Written back as mlp_only_layers with step 1: transformers builds the same layers.
    again = _model(Qwen3MoeConfig(**{k: v for k, v in hf_config_from_model_config(ours).items()
                                     if k not in ("architectures", "model_type", "torch_dtype")}))
    assert [i for i, layer in enumerate(again.model.layers) if hasattr(layer.mlp, "experts")] == want


def test_qwen3_moe_router_fields():
    from transformers import Qwen3MoeConfig

    hf = Qwen3MoeConfig(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=12, norm_topk_prob=True,
                        router_aux_loss_coef=0.02, num_hidden_layers=2).to_dict()
    ours = ModelConfig.from_hf(hf)
    assert (ours.num_experts, ours.moe_router_topk, ours.moe_ffn_hidden_size) == (16, 4, 12)
    assert ours.moe_norm_topk_prob and ours.aux_loss_coeff == 0.02
    # A config.json as the hub ships it names num_experts (transformers 5 writes num_local_experts).
    hub = {k: v for k, v in hf.items() if k != "num_local_experts"} | {"num_experts": 16}
    assert ModelConfig.from_hf(hub) == ours
    with pytest.raises(ValueError, match="num_experts=0"):
        ModelConfig.from_hf(dict(hub, num_experts=0))
