"""The memory and time plan (``psft_megatron.plan``, ``launch/pretrain_psft.py RECIPE --plan``).

Against published formulas and independent code (all in this process, no launches):

- activations per layer: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", Table 2): ``s*b*h*(34 + 5*a*s/h)`` bytes without parallelism, ``/t`` with
  TP + SP, ``34*s*b*h/t`` with selective recompute, when the plan's item list is given GPT-3's
  kernels (LayerNorm, GELU MLP, dropout, 16-bit softmax);
- bytes per parameter: Megatron-Bridge's ``estimate_training_memory`` (bf16 + fp32 grads + Adam:
  18, or ``6 + 12/DP`` with the distributed optimizer) on the real recipes' per-rank parameters;
- parameters: transformers' own Llama/Qwen2 models built on the meta device from the recipes'
  config.json files equal the plan's per-stage counts summed over the pipeline;
- micro-batches in flight: megatron's ``get_pp_rank_microbatches`` (warm-up forwards + 1);
- FLOPs: Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters"),
  ``96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h))`` per iteration with full recompute, the attention
  term halved for causal masking (the plan counts causal attention), on a model with their shapes;
- mixture of experts (Qwen3-30B-A3B): transformers' model on the meta device gives the parameters
  (all, per pipeline stage, and each expert layer's experts, which EP divides), and the
  parameters a token passes through (its top-k experts and the router) give the forward FLOPs;
  the experts' optimizer state is sharded over the expert-data-parallel ranks, the rest over DP x CP.

The recipes (item 5 of issue #12, and issue #23's Qwen3 ones): the math recipes take their
architecture from ``model.hf_config``, run at 32k tokens, and ``--plan`` shows them fitting on
80 GB H100s; with recompute removed the 70B one is refused with one line naming the biggest term
and the fix, and so is the Qwen3-30B-A3B one on one 8-GPU node.

Measured memory: ``tests/test_recompute.py`` (activations, CPU, against the profiler),
``tests/test_distributed_optimizer.py`` (weights, gradients and optimizer state, to the byte) and
``tests/test_moe.py`` (an MoE model's, at EP=2, and its activations against the profiler).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from psft_megatron.model.config import ModelConfig
from psft_megatron.plan import (
    GPUS,
    Kernels,
    Shape,
    format_plan,
    forward_flops_per_token,
    in_flight_chunks,
    layer_saved,
    plan_recipe,
    stage_parameter_split,
    stage_parameters,
    step_flops,
)
from psft_megatron.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"8b_math": 8, "qwen2.5_7b_math": 8, "70b_math": 64, "qwen3_8b_math": 8,
           "qwen3_30b_a3b_math": 16}  # recipe: the job's GPUs
GPT3 = Kernels(norm_tensors=1, norm_stats=False, mlp="gelu", attention="unfused", score_bytes=5, dropout_masks=True,
               selective_keeps_qkv=False)


def _gpt(h: int = 1024, a: int = 16, layers: int = 4, vocab: int = 51200) -> ModelConfig:
    return ModelConfig(family="llama", num_layers=layers, hidden_size=h, ffn_hidden_size=4 * h, num_attention_heads=a,
                       vocab_size=vocab, max_position_embeddings=4096, params_dtype="bf16")


@pytest.mark.parametrize("s, b, t, sp", [(2048, 1, 1, False), (4096, 2, 8, True), (1024, 4, 4, True)])
def test_activations_per_layer_match_korthikanti(s, b, t, sp):
    m = _gpt()
    h, a = m.hidden_size, m.num_attention_heads
    sh = Shape(seq=s, micro=b, tp=t, sp=sp, act_bytes=2)
    total = sum(x.bytes for x in layer_saved(m, GPT3, sh))
    assert total == pytest.approx(s * b * h * (34 + 5 * a * s / h) / t)
    selective = sum(x.bytes for x in layer_saved(m, GPT3, sh, "selective"))
    assert selective == pytest.approx(34 * s * b * h / t)


def test_tensor_parallel_without_sp_keeps_the_replicated_part():
    """Korthikanti eq. 2 (TP without SP): ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``."""
    m, s, b, t = _gpt(), 2048, 1, 8
    total = sum(x.bytes for x in layer_saved(m, GPT3, Shape(seq=s, micro=b, tp=t, sp=False, act_bytes=2)))
    h, a = m.hidden_size, m.num_attention_heads
    assert total == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))


@pytest.fixture(autouse=True)
def _in_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes name recipes/hf_configs/... relative to the repository


def _recipe(name: str, *overrides: str):
    r = load_recipe(ROOT / "recipes" / f"{name}.yaml", list(overrides))
    r.validate(RECIPES[name])
    return r


@pytest.mark.parametrize("name", list(RECIPES))
def test_parameters_match_transformers_models(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    r = _recipe(name)
    m = r.model.resolve()
    cfg = AutoConfig.from_pretrained(ROOT / r.model.hf_config)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg)
    want = sum(p.numel() for p in hf.parameters())
    pp = 4
    assert sum(stage_parameters(m, 1, pp, rank) for rank in range(pp)) == want
    assert stage_parameters(m, 1, 1, 0) == want


@pytest.mark.parametrize("world", [8, 16, 64])
def test_bytes_per_parameter_match_megatron_bridge(world):
    """bf16 weights, fp32 grads, Adam: 18 bytes per parameter; 6 + 12/d distributed (d = DP x CP)."""
    for distributed in (False, True):
        r = _recipe("8b_math", f"optimizer.use_distributed_optimizer={str(distributed).lower()}")
        plan = plan_recipe(r, world, GPUS["h100-80gb"])
        stage = plan.stages[0]
        d = plan.dp * plan.cp
        assert d == world // 4  # TP=4
        per_param = sum(t.bytes for t in stage.static) / stage.params
        assert per_param == pytest.approx(6 + 12 / d if distributed else 18)
        assert stage.optimizer_alternative.bytes / stage.params == pytest.approx(12 if distributed else 12 / d)


@pytest.mark.parametrize("pp, vp, micro", [(4, None, 8), (4, None, 2), (4, 5, 4), (4, 5, 16), (2, 2, 4)])
def test_in_flight_micro_batches_match_megatron_schedule(pp, vp, micro):
    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    for rank in range(pp):
        comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r),
                               virtual_pipeline_model_parallel_size=vp)
        total, all_warmup, warmup, _ = get_pp_rank_microbatches(micro, vp or 1, pp, p2p_communicator=comm)
        want = total if all_warmup else warmup + 1
        assert in_flight_chunks(pp, vp, rank, micro) == want, (rank, want)


def test_training_flops_match_narayanan():
    h, layers, vocab, s, k = 3072, 8, 51200, 2048, 8
    m = ModelConfig(family="llama", num_layers=layers, hidden_size=h, ffn_hidden_size=8 * h // 3,
                    num_attention_heads=24, vocab_size=vocab, max_position_embeddings=s, params_dtype="bf16")
    r = _recipe("qwen2.5_7b_math", f"training.seq_length={s}", f"data.train[0].max_length={s}",
                f"data.eval[0].max_length={s}", "model.recompute_granularity=full", "model.recompute_method=uniform",
                "model.recompute_num_layers=1")
    fl = step_flops(r, m)
    batch = r.training.mini_batch_size
    # SwiGLU's three h x 8h/3 matrices are GPT's two h x 4h ones; causal attention is half of s x s
    # (s/(12h) for their s/(6h)). Their eq. 3 is with full recompute (a 4th forward of the layers,
    # not of the logit layer): 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)).
    assert fl["hardware_per_step"] - fl["snapshot_per_step"] == pytest.approx(
        96 * batch * s * layers * h**2 * (1 + s / (12 * h) + vocab / (16 * layers * h)), rel=1e-9)
    # Model FLOPs (no recompute): 3 x forward, the same terms.
    assert fl["train_per_step"] == pytest.approx(
        72 * batch * s * layers * h**2 * (1 + s / (12 * h) + vocab / (12 * layers * h)), rel=1e-9)
    assert fl["snapshot_per_step"] == pytest.approx(fl["train_per_step"] / 3 * (k - 1) / k)
    assert fl["model_per_step"] == pytest.approx(fl["train_per_step"] + fl["snapshot_per_step"])


@pytest.mark.parametrize("name", list(RECIPES))
def test_math_recipes_fit_h100_at_long_context(name):
    r = _recipe(name)
    assert r.model.hf_config and r.model.num_layers is ModelConfig().num_layers  # architecture not typed out
    assert r.training.seq_length >= 16384 and r.parallel.context_parallel_size > 1
    plan = plan_recipe(r, RECIPES[name], GPUS["h100-80gb"])
    assert plan.fits, format_plan(plan)
    assert "fits" in format_plan(plan)


def _launcher():
    spec = importlib.util.spec_from_file_location("pretrain_psft", ROOT / "launch" / "pretrain_psft.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plan_cli_prints_and_refuses(capsys):
    main = _launcher().main
    assert main(["recipes/70b_math.yaml", "--plan", "--world-size", "64", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    for line in ("weights (bf16)", "gradients (fp32 main_grad)", "optimizer state, distributed over DP x CP = 2",
                 "activations kept, in flight", "output layer + loss", "model FLOPs", "fits: first stage"):
        assert line in out, line
    no_recompute = ["model.recompute_granularity=null", "model.recompute_method=null", "model.recompute_num_layers=null"]
    assert main(["recipes/70b_math.yaml", "--plan", "--world-size", "64", "--gpu", "h100-80gb", *no_recompute]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: bad recipe:"), err
    assert "does not fit on H100 80GB" in err[0] and "the biggest term is activations kept for backward" in err[0]
    assert "set model.recompute_granularity: full" in err[0] and "then it fits" in err[0]
    assert main(["recipes/8b_math.yaml", "--plan", "--gpu", "b300"]) == 2
    assert "--gpu b300: unknown GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------- LoRA
# recipes/70b_math_lora.yaml on one 8-GPU node and recipes/qwen2.5_7b_math_lora.yaml on one GPU; the
# adapters against PEFT's own modules on the transformers model; the activations LoRA keeps are
# measured against torch's profiler in tests/test_recompute.py.

LORA_RECIPES = {"70b_math_lora": 8, "qwen2.5_7b_math_lora": 1}


@pytest.mark.parametrize("name", list(LORA_RECIPES))
def test_lora_recipes_fit_where_full_fine_tuning_cannot(name):
    from psft_megatron.config.load import ConfigError
    from psft_megatron.plan import check_fits

    r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    r.validate(LORA_RECIPES[name])
    plan = plan_recipe(r, LORA_RECIPES[name], GPUS["h100-80gb"])
    assert plan.fits and r.model.lora is not None, format_plan(plan)
    assert "LoRA: rank 16" in format_plan(plan)
    full = load_recipe(ROOT / "recipes" / f"{name}.yaml", ["model.lora=null", "checkpoint.init_from=x"])
    with pytest.raises(ConfigError, match="does not fit on H100 80GB"):  # the same layout, every weight trained
        check_fits(plan_recipe(full, LORA_RECIPES[name], GPUS["h100-80gb"]), full)


def test_lora_weights_gradients_and_optimizer_state_per_rank():
    """The 70B LoRA recipe at TP=8: PEFT's adapters on the transformers model (meta device), split as
    megatron splits them (A whole and B / TP on q, k, v, gate, up; A / TP and B whole on o, down), give
    the plan's trained parameters; frozen base weights get no gradient and no optimizer state."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from psft_megatron.plan import stage_adapter_parameters

    r = load_recipe(ROOT / "recipes" / "70b_math_lora.yaml")
    m, tp = r.model.resolve(), r.parallel.tensor_model_parallel_size
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ROOT / r.model.hf_config))
        peft = get_peft_model(hf, LoraConfig(r=m.lora.rank, lora_alpha=m.lora.alpha,
                                             target_modules=list(m.lora.target_modules)))
    per_rank = 0.0
    for name, mod in peft.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            a, b = mod.lora_A["default"].weight.numel(), mod.lora_B["default"].weight.numel()
            per_rank += a / tp + b if name.endswith(("o_proj", "down_proj")) else a + b / tp
    assert stage_adapter_parameters(m, tp, 1) == per_rank
    plan = plan_recipe(r, 8, GPUS["h100-80gb"])
    static = {t.name.split(" (")[0].split(",")[0]: t.bytes for t in plan.stages[0].static}
    base = stage_parameters(m, tp, 1, 0)
    assert static["weights"] == (base + per_rank) * 2  # bf16, base and adapters
    assert static["gradients"] == per_rank * 4  # the adapters' fp32 main_grad alone
    assert static["optimizer state"] == per_rank * 12  # Adam moments + fp32 main copy, adapters alone (DP=1)


def test_lora_flops_are_forward_and_input_gradients_of_the_base():
    """A frozen base forms no weight gradients: 2 x its forward FLOPs per token; the adapters 3 x theirs."""
    from psft_megatron.model.lora.count import adapter_parameters_per_model

    r = load_recipe(ROOT / "recipes" / "70b_math_lora.yaml")
    m = r.model.resolve()
    base_cfg = ModelConfig(**{**m.to_dict(), "lora": None})
    base = step_flops(r, base_cfg)
    lora = step_flops(r, m)
    tokens = lora["tokens_per_step"]
    adapters = adapter_parameters_per_model(m)
    assert lora["train_per_step"] == pytest.approx(2 * base["forward_per_token"] * tokens + 6 * adapters * tokens)
    assert base["train_per_step"] == pytest.approx(3 * base["forward_per_token"] * tokens)


# ----------------------------------------------------------------------------- mixture of experts


def _meta_hf(r):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ROOT / r.model.hf_config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def test_moe_experts_are_split_over_ep_as_transformers_counts_them():
    r = _recipe("qwen3_30b_a3b_math")
    m = r.resolved_model
    hf = _meta_hf(r)
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".mlp.experts." in n)
    everything = sum(p.numel() for p in hf.parameters())
    for ep, etp in ((1, 1), (8, 1), (4, 2)):
        dense, expert = stage_parameter_split(m, 1, 1, 0, ep=ep, etp=etp)
        assert expert == experts // (ep * etp) and dense == everything - experts
    # Pipeline stages split the layers: the expert parameters of all stages add up.
    assert sum(stage_parameter_split(m, 1, 4, rank, ep=8)[1] for rank in range(4)) == experts // 8


def test_moe_optimizer_state_sharded_over_expert_data_parallel():
    """bf16 + distributed optimizer: 6 + 12/(DP x CP) bytes per dense parameter, 6 + 12/(expert DP)
    per expert parameter (expert DP = world / (expert TP x EP x PP))."""
    r = _recipe("qwen3_30b_a3b_math")
    for world in (16, 32):
        plan = plan_recipe(r, world, GPUS["h100-80gb"])
        stage = plan.stages[0]
        dense, expert = stage_parameter_split(r.resolved_model, 1, 1, 0, ep=8, etp=1)
        assert plan.edp == world // 8 and plan.dp * plan.cp == world
        want = dense * (6 + 12 / world) + expert * (6 + 12 / plan.edp)
        assert sum(t.bytes for t in stage.static) == pytest.approx(want)


def test_moe_forward_flops_count_the_routed_experts():
    """2 x the matmul parameters one token passes through (attention, the router, k of the E experts
    of an expert layer, from transformers' model) plus causal attention and the head."""
    r = _recipe("qwen3_30b_a3b_math")
    m, hf = r.resolved_model, _meta_hf(r)
    cfg = hf.config
    layer = hf.model.layers[0]
    attention = sum(p.numel() for n, p in layer.self_attn.named_parameters() if n.endswith("proj.weight"))
    expert_params = sum(p.numel() for p in layer.mlp.experts.parameters())
    active = attention + layer.mlp.gate.weight.numel() + expert_params * cfg.num_experts_per_tok // cfg.num_experts
    s = r.training.seq_length
    want = cfg.num_hidden_layers * (2 * active + 2 * cfg.num_attention_heads * cfg.head_dim * s)
    f = forward_flops_per_token(m, s)
    assert f["layers"] == pytest.approx(want, rel=1e-12)
    assert f["head"] == 2 * cfg.hidden_size * m.padded_vocab_size


def test_moe_recipe_does_not_fit_one_node():
    """One 8-GPU node cannot hold Qwen3-30B-A3B's weights, gradients and Adam state (18 bytes per
    parameter): the plan refuses it naming the biggest term."""
    from psft_megatron.config.load import ConfigError
    from psft_megatron.plan import check_fits

    r = load_recipe(ROOT / "recipes" / "qwen3_30b_a3b_math.yaml", ["parallel.context_parallel_size=2"], world_size=8)
    plan = plan_recipe(r, 8, GPUS["h100-80gb"])
    assert not plan.fits
    assert sum(t.bytes for t in plan.stages[0].static) > 0.9 * plan.usable_bytes
    with pytest.raises(ConfigError, match="does not fit on H100 80GB"):
        check_fits(plan, r)
