"""LoRA (``model.lora``): the adapters' math and sharding, checkpoints, exports and scoring.

Unit tests (no processes): the section's checks, target names, the adapter count against PEFT's
own count on a transformers model, the MoE refusal.

In real gloo processes (slow), for every dense family (Llama with tied embeddings and every
projection adapted; Qwen2 with QKV bias and a partial choice inside the fused linears; Mistral
with Megatron's module names), each converted from a random transformers model:

- B = 0 at the start is the base model exactly (bit for bit), at TP=1 and TP=2+SP;
- the first adapters are the same global tensors at every layout;
- with non-zero B, TP=2 and TP=2+SP give TP=1's logits and every adapter's gradient (global);
- the checkpoint (saved at TP=2+SP: the adapters alone, pointing at the base) loads at TP=1 and
  TP=2 and gives the same logits; psft-evaluate's scorer reads it at TP=2;
- exported as a PEFT folder, ``peft.PeftModel.from_pretrained`` on the transformers base gives
  the Megatron LoRA model's logits within 1e-4 (fp32); exported merged, transformers alone does;
  the merged export, converted back, scores as the LoRA checkpoint does.

Training with LoRA against the float64 reference trainer: ``tests/test_trainer_reference.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes

VOCAB = 300
SEQ = 24
FAMILIES = {  # family: (transformers config class, extra config fields, LoRA target_modules)
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": False}, ["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False}, ["linear_qkv", "linear_proj", "linear_fc1",
                                                                  "linear_fc2"]),
}
LORA = {"rank": 4, "alpha": 8.0}
LAYOUTS = {"tp1": {}, "tp2": {"tensor_model_parallel_size": 2},
           "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True}}


# ----------------------------------------------------------------------------- units (no processes)


def test_targets_take_hf_and_megatron_names():
    from psft_megatron.model.lora.targets import linear_targets, resolve_targets

    t = linear_targets("llama")
    assert t["linear_qkv"].units == ("q_proj", "k_proj", "v_proj") and t["linear_qkv"].kind == "column"
    assert t["linear_fc2"].units == ("down_proj",) and t["linear_fc2"].kind == "row"
    assert t["linear_fc1"].hf_modules == ("model.layers.{layer}.mlp.gate_proj", "model.layers.{layer}.mlp.up_proj")
    assert resolve_targets("qwen2", ["v_proj", "q_proj", "linear_fc2"]) == {"linear_qkv": ("q_proj", "v_proj"),
                                                                           "linear_fc2": ("down_proj",)}
    assert resolve_targets("mistral", ["linear_fc1", "up_proj"]) == {"linear_fc1": ("gate_proj", "up_proj")}


@pytest.mark.parametrize("field,value,words", [
    ("rank", 0, "model.lora.rank must be a positive integer"),
    ("alpha", 0.0, "model.lora.alpha must be > 0"),
    ("dropout", 1.0, "model.lora.dropout must be in [0, 1)"),
    ("target_modules", [], "model.lora.target_modules is empty"),
    ("target_modules", ["qkv_proj"], "unknown LoRA target 'qkv_proj' for the llama family; known: ['down_proj'"),
])
def test_lora_section_errors_name_the_field(field, value, words):
    from psft_megatron.config.load import FieldError
    from psft_megatron.model.lora import LoRAConfig

    with pytest.raises(FieldError) as e:
        LoRAConfig(**{field: value}).validate("llama")
    assert words in str(e.value)


def test_recipe_with_lora_needs_a_base_and_takes_command_line_overrides(tiny, tmp_path):
    import yaml

    from psft_megatron.config.load import ConfigError
    from psft_megatron.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny()))
    with pytest.raises(ConfigError, match=r"model\.lora needs checkpoint\.init_from"):
        load_recipe(path, ["model.lora.rank=8"])
    base = tmp_path / "base"
    r = load_recipe(path, ["model.lora.rank=8", "model.lora.target_modules=[q_proj,v_proj]",
                           f"checkpoint.init_from={base}"])
    assert (r.model.lora.rank, r.model.lora.alpha, r.model.lora.target_modules) == (8, 32.0, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="command-line override: .*unknown LoRA target 'query'"):
        load_recipe(path, ["model.lora.target_modules=[query]", f"checkpoint.init_from={base}"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapter_count_matches_peft(family):
    """PEFT's trainable parameters on the transformers model = the plan's adapter count."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from psft_megatron.model.config import ModelConfig
    from psft_megatron.model.lora import LoRAConfig
    from psft_megatron.model.lora.count import adapter_parameters_per_model, unit_shapes

    cls, extra, targets = FAMILIES[family]
    hf_cfg = _hf_config(cls, extra)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    cfg.lora = LoRAConfig(rank=8, target_modules=targets)
    units = sorted(unit_shapes(cfg))
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(hf_cfg),
                           LoraConfig(r=8, lora_alpha=16, target_modules=units))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_parameters_per_model(cfg) == trainable


def test_moe_mlp_takes_no_adapters():
    from megatron.core.transformer.spec_utils import ModuleSpec

    from psft_megatron.model.build import layer_spec
    from psft_megatron.model.lora import LoRAConfig
    from psft_megatron.model.lora.spec import lora_layer_spec

    class ExpertsStandIn(torch.nn.Module):  # a spec whose MLP is not megatron's dense MLP
        pass

    spec = layer_spec("local")
    spec.submodules.mlp = ModuleSpec(module=ExpertsStandIn)
    with pytest.raises(ValueError, match="mixture-of-experts linears take no LoRA adapters"):
        lora_layer_spec(spec, "llama", LoRAConfig(target_modules=["q_proj", "down_proj"]))
    attention_only = lora_layer_spec(spec, "llama", LoRAConfig(target_modules=["q_proj", "o_proj"]))
    assert attention_only.submodules.mlp.module is ExpertsStandIn


# ----------------------------------------------------------------------------- in processes


def _hf_config(cls: str, extra: dict) -> Any:
    import transformers

    return getattr(transformers, cls)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.05, **extra)


def _prepare(root: str) -> None:
    """Every family's random transformers model, converted; the tokenizer and prompts for scoring."""
    import transformers

    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron
    from psft_megatron.data.synthetic import write_tiny_dataset

    for family, (cls, extra, _) in FAMILIES.items():
        torch.manual_seed(len(family))
        cfg = _hf_config(cls, extra)
        if family == "qwen2":
            cfg.use_sliding_window = False
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        if family == "qwen2":  # non-zero QKV biases, so a wrongly placed bias would show
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.05)
        model.save_pretrained(f"{root}/{family}/hf")
        convert_hf_to_megatron(f"{root}/{family}/hf", f"{root}/{family}/base")
    data = write_tiny_dataset(Path(root) / "data", train=64, eval=8, vocab_size=VOCAB)
    with open(data / "eval.jsonl") as src, open(f"{root}/score.jsonl", "w") as dst:
        dst.write(src.read())


def _randomize_b(chunks: list, seed: int) -> None:
    """Non-zero B (normal, std 0.05), the same global values at every layout."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from psft_megatron.model.init import fill_rows

    for chunk in chunks:
        for sh in nested_values(chunk.sharded_state_dict()):
            if isinstance(sh, ShardedTensor) and ".lora_B." in sh.key:
                fill_rows(sh, seed, lambda s, g: torch.randn(s, generator=g) * 0.05)


def _global(param: torch.Tensor, tensor: torch.Tensor, sequence_parallel_grad: bool = False) -> torch.Tensor:
    """``tensor`` (the parameter's data or gradient on this rank) as the global TP=1 tensor."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return tensor.detach().clone()
    if getattr(param, "tensor_model_parallel", False):
        parts = [torch.empty_like(tensor) for _ in range(tp)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=param.partition_dim)
    out = tensor.detach().clone()
    if sequence_parallel_grad and getattr(param, "sequence_parallel", False):  # what finalize_model_grads sums
        dist.all_reduce(out, group=group)
    return out


def _logits(chunks: list, ids: torch.Tensor, grad_weights: torch.Tensor | None = None) -> torch.Tensor:
    from psft_megatron.model.forward import gather_logits

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits = gather_logits(chunks[0](ids, pos, None), VOCAB)
    if grad_weights is not None:
        (logits * grad_weights).sum().backward()
    return logits.detach()


def _layouts_worker(root: str) -> dict[str, Any]:
    """Every family at TP=1, TP=2 and TP=2+SP on two ranks (TP=1: both ranks alike)."""
    import dataclasses

    import torch.distributed as dist

    from psft_megatron.checkpoint.model_checkpoint import (
        load_model_checkpoint,
        model_config_of,
        read_meta,
        save_model_checkpoint,
    )
    from psft_megatron.evaluation.response_nll import score_file
    from psft_megatron.evaluation.session import load_scoring_model
    from psft_megatron.model.build import build_model
    from psft_megatron.model.lora import LoRAConfig
    from psft_megatron.model.lora.state import adapter_parameters, init_adapters
    from psft_megatron.runtime import cpu_compat
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_model_parallel, set_seed

    cpu_compat.apply()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    weights = torch.randn(2, SEQ, VOCAB, generator=g)
    out: dict[str, Any] = {"ids": ids}
    for family, (_, _, targets) in FAMILIES.items():
        base = f"{root}/{family}/base"
        cfg = dataclasses.replace(model_config_of(read_meta(base)), params_dtype="fp32", transformer_impl="local",
                                  lora=LoRAConfig(target_modules=targets, **LORA))
        for name, par in LAYOUTS.items():
            parallel = ParallelConfig(**par)
            init_model_parallel(parallel)
            set_seed(0)
            plain = build_model(dataclasses.replace(cfg, lora=None), parallel)
            load_model_checkpoint(plain.chunks, base)
            built = build_model(cfg, parallel)
            load_model_checkpoint(built.chunks, base)
            init_adapters(built.chunks, seed=11)
            adapters = adapter_parameters(built.chunks)
            rec = {"initial": {n: _global(p, p.data) for n, p in adapters},
                   "base_logits": _logits(plain.chunks, ids), "b0_logits": _logits(built.chunks, ids),
                   "frozen": [n for n, p in built.chunks[0].named_parameters() if not p.requires_grad]}
            _randomize_b(built.chunks, seed=12)
            rec["logits"] = _logits(built.chunks, ids, weights)
            rec["grads"] = {n: _global(p, p.grad, sequence_parallel_grad=True) for n, p in adapters}
            if name == "tp2_sp":  # the adapters alone, pointing at the base
                save_model_checkpoint(built.chunks, f"{root}/{family}/lora", {"model": cfg, "lora_base": base})
            out[f"{family}/{name}"] = rec
        for name in ("tp1", "tp2"):  # the saved checkpoint read back as psft-evaluate reads it
            init_model_parallel(ParallelConfig(**LAYOUTS[name]))
            scoring = load_scoring_model(f"{root}/{family}/lora", ParallelConfig(**LAYOUTS[name]))
            out[f"{family}/loaded_{name}"] = _logits(scoring.chunks, ids)
    score_file(f"{root}/llama/lora", f"{root}/score.jsonl", f"{root}/scores_lora_tp2.jsonl",
               parallel=ParallelConfig(tensor_model_parallel_size=2), tokenizer_path=f"{root}/data/tokenizer")
    dist.barrier()
    return out


def _export(root: str) -> dict[str, Any]:
    """Each family's LoRA checkpoint exported merged and as PEFT; Llama's merged export converted
    back and scored (one process)."""
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron
    from psft_megatron.conversion.lora_export import export_peft_adapter
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf
    from psft_megatron.evaluation.response_nll import score_file
    from psft_megatron.runtime.distributed import init_distributed, teardown

    reports = {}
    for family in FAMILIES:
        ckpt = f"{root}/{family}/lora"
        reports[f"{family}/merged"] = convert_megatron_to_hf(ckpt, f"{root}/{family}/merged", dtype="float32")
        reports[f"{family}/peft"] = export_peft_adapter(ckpt, f"{root}/{family}/peft",
                                                        base_model=f"{root}/{family}/hf")
    convert_hf_to_megatron(f"{root}/llama/merged", f"{root}/llama/merged_mg")
    init_distributed(backend="gloo")
    try:
        score_file(f"{root}/llama/merged_mg", f"{root}/score.jsonl", f"{root}/scores_merged_tp1.jsonl",
                   tokenizer_path=f"{root}/data/tokenizer")
    finally:
        teardown()
    return reports


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora")
    run_in_processes(_prepare, 1, kwargs={"root": str(root)}, init_process_group=False, timeout=300)
    out = run_in_processes(_layouts_worker, 2, kwargs={"root": str(root)}, timeout=500)[0]
    out["exports"] = run_in_processes(_export, 1, kwargs={"root": str(root)}, init_process_group=False,
                                      timeout=300)[0]
    out["root"] = root
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("layout", ["tp1", "tp2_sp"])
def test_b_zero_is_the_base_model_exactly(lora_models, family, layout):
    rec = lora_models[f"{family}/{layout}"]
    assert torch.equal(rec["b0_logits"], rec["base_logits"])
    assert all(float(t.abs().max()) == 0 for n, t in rec["initial"].items() if ".lora_B." in n)
    assert all(float(t.abs().max()) > 0 for n, t in rec["initial"].items() if ".lora_A." in n)
    assert rec["frozen"] and all("lora_" not in n for n in rec["frozen"])  # every base weight, no adapter


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_tensor_parallel_lora_equals_tp1(lora_models, family, layout):
    ref, got = lora_models[f"{family}/tp1"], lora_models[f"{family}/{layout}"]
    assert set(got["initial"]) == set(ref["initial"])
    for n, t in ref["initial"].items():  # the first adapters do not depend on the layout
        assert torch.equal(got["initial"][n], t), n
    assert float((ref["logits"] - ref["base_logits"]).abs().max()) > 1e-2, "the adapters must change the model"
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    for n, g in ref["grads"].items():
        scale = float(g.abs().max())
        assert scale > 0, n
        # fp32 sums in another order (split over TP): round-off relative to the gradient's size.
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_checkpoint_holds_the_adapters_and_loads_at_any_layout(lora_models, family):
    from torch.distributed.checkpoint import FileSystemReader

    root = lora_models["root"]
    meta = json.loads((root / family / "lora" / "psft_meta.json").read_text())
    assert meta["lora_base"] == f"{root}/{family}/base" and meta["model"]["lora"]["rank"] == LORA["rank"]
    keys = [k for k in FileSystemReader(str(root / family / "lora" / "model")).read_metadata().state_dict_metadata
            if not k.endswith("_extra_state")]
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    saved = lora_models[f"{family}/tp2_sp"]["logits"]
    for name in ("tp1", "tp2"):
        torch.testing.assert_close(lora_models[f"{family}/loaded_{name}"], saved, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_peft_and_merged_exports_match_transformers(lora_models, family):
    """The PEFT folder on the transformers base (peft.PeftModel) and the merged folder give the Megatron
    LoRA model's logits within 1e-4 (fp32)."""
    import transformers
    from peft import PeftModel

    root = lora_models["root"]
    config = json.loads((root / family / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == LORA["rank"] and config["lora_alpha"] == LORA["alpha"]
    ids = lora_models["ids"]
    want = lora_models[f"{family}/tp1"]["logits"]
    base = transformers.AutoModelForCausalLM.from_pretrained(root / family / "hf", dtype=torch.float32,
                                                             attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, root / family / "peft").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / family / "merged", dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        got_peft = peft_model(input_ids=ids).logits
        got_merged = merged(input_ids=ids).logits
    assert float((got_peft - want).abs().max()) <= 1e-4
    assert float((got_merged - want).abs().max()) <= 1e-4
    n_adapted = sum(1 for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A)
    assert n_adapted == 2 * len({u for u in config["target_modules"]})  # two layers


@pytest.mark.slow
def test_scorer_reads_a_lora_checkpoint_as_its_merged_export(lora_models):
    """psft-evaluate --mode nll's scorer at TP=2 on the LoRA checkpoint = at TP=1 on its merged export."""
    root = lora_models["root"]
    lora = [json.loads(x) for x in (root / "scores_lora_tp2.jsonl").read_text().splitlines()]
    merged = [json.loads(x) for x in (root / "scores_merged_tp1.jsonl").read_text().splitlines()]
    assert len(lora) == len(merged) == 8
    for a, b in zip(lora, merged):
        assert a["num_tokens"] == b["num_tokens"] > 0
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5)
