"""The project's trainer on one tiny converted Llama (and one tiny Qwen3-MoE), for the
float64-reference tests.

``test_trainer_reference.py`` checks the trainer (PSFT at seven layouts, sft_kl at TP=1 and
TP=2+SP, LoRA at five layouts, resumed, and under sft_kl; the MoE model at EP=1, EP=2 and
TP=2+SP x EP=2, and with two passes per snapshot at EP=2) on one model, data and schedule against
``reference_trainer.py``. Its runs are trained here together, in one launch per process count
(plus one to convert the models and one to export every result), because starting processes and
importing megatron-core costs more than the runs themselves.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe

VOCAB = 300  # not a multiple of 128: megatron's output layer has 84 padded columns
TRAINING = {"seq_length": 64, "global_batch_size": 8, "mini_batch_size": 4, "train_steps": 8,
            "sft_warmup_steps": 2, "seed": 7, "eval_interval": 0}
OPTIMIZER = {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_steps": 2, "lr_schedule": "cosine", "weight_decay": 0.1,
             "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 0.5}
KL_BETA = 0.5

PSFT_RUNS = {  # name: (processes, micro_batch_size, parallel section)
    "tp1_micro1": (1, 1, {}),
    "tp1_micro2": (1, 2, {}),
    "tp1_micro4": (1, 4, {}),
    "tp2_sp": (2, 2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
    "pp2": (2, 2, {"pipeline_model_parallel_size": 2}),
    "dp2": (2, 1, {}),
    # Context parallelism: each packed row split over 2 ranks (TE's load-balanced THD layout,
    # samples padded to multiples of 4), K/V all-gathered by the local spec's CP attention.
    "cp2": (2, 2, {"context_parallel_size": 2}),
}
SFT_KL_RUNS = {
    "tp1": (1, 2, {}),
    "tp2_sp": (2, 2, {"tensor_model_parallel_size": 2, "sequence_parallel": True}),
}
# Two passes over each global batch per snapshot (k=2, so 4 optimizer steps per global batch:
# one of SFT warm-up, two of PSFT), and the diagnostic objective psft_unweighted.
PASSES2 = {"passes_per_snapshot": 2, "sft_warmup_steps": 4, "train_steps": 12}
# The held-out rows scored at steps 0 and 8 with their KL to the start model (training.eval_kl_to_start).
EVAL_KL = {"eval_interval": 8, "eval_at_start": True, "eval_kl_to_start": True, "eval_rows": 4}
VARIANT_RUNS = {  # name: (objective or loss section, processes, micro_batch_size, parallel section, training overrides)
    "passes2_tp1": ("psft", 1, 2, {}, PASSES2),
    "passes2_pp2": ("psft", 2, 1, {"pipeline_model_parallel_size": 2}, PASSES2),
    "unweighted_tp1": ("psft_unweighted", 1, 2, {}, {}),
    "evalkl_tp1": ("psft", 1, 2, {}, EVAL_KL),
    "evalkl_tp2_sp_fused": ({"name": "psft", "fused_output_layer": True}, 2, 2,
                            {"tensor_model_parallel_size": 2, "sequence_parallel": True}, EVAL_KL),
    "evalkl_dp2": ("psft", 2, 1, {}, EVAL_KL),  # each DP rank scores half the rows: the KL sums meet
}
# LoRA on every projection (rank 4, scale 2), the base frozen; a higher learning rate, as LoRA runs use.
LORA = {"rank": 4, "alpha": 8.0}
LORA_OPTIMIZER = {"lr": 2e-2, "min_lr": 2e-3}
LORA_RUNS = {  # name: (objective, processes, micro_batch_size, parallel section, extra sections)
    "tp1": ("psft", 1, 2, {}, {}),
    # stopped after step 4 (checkpoint: adapters + their optimizer state), relaunched: bit-exact with tp1
    "tp1_resume": ("psft", 1, 2, {}, {}),
    # init_from tp1's final (LoRA) checkpoint: its base and adapters, a fresh optimizer, 8 more steps
    "tp1_continue": ("psft", 1, 2, {}, {}),
    # also the evaluator's KL to the start, which for LoRA is the base (the adapters switched off), and
    # the HF copy at save (checkpoint.save_hf), which for LoRA is the base with the adapters merged
    "tp2_sp": ("psft", 2, 2, {"tensor_model_parallel_size": 2, "sequence_parallel": True},
               {"training": EVAL_KL, "checkpoint": {"save_hf": 1, "save_hf_dtype": "float32"}}),
    "pp2_vp2": ("psft", 2, 2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}, {}),
    "cp2": ("psft", 2, 2, {"context_parallel_size": 2}, {}),
    # DP=2: megatron's distributed optimizer over the adapters, and the fused output layer (frozen weight)
    "dp2_distopt_fused": ("psft", 2, 1, {}, {"optimizer": {"use_distributed_optimizer": True},
                                              "loss": {"fused_output_layer": True}}),
    # sft_kl: the reference is the base (the adapters switched off); only q, v and down adapted
    "sft_kl_qv": ("sft_kl", 1, 2, {}, {"lora": {"target_modules": ["q_proj", "v_proj", "down_proj"]}}),
}
# The tiny Qwen3-MoE (4 experts, top 2, one dense layer, load-balancing loss 0.01): PSFT at EP=1 and
# EP=2 (2 processes: DP=2 for the dense layers, each rank holding 2 experts), at TP=2+SP with the
# experts split over the two TP ranks (expert TP 1, EP 2), and with two passes per snapshot at EP=2
# (the snapshot then scores mini-batch 1 too: the first step's ratio must be exactly 1). One row per
# micro-batch, so every layout takes the load-balancing statistics over the same rows.
MOE_AUX_COEFF = 0.01
MOE_RUNS = {  # name: (processes, micro_batch_size, parallel section, training overrides)
    "ep1": (1, 1, {}, {}),
    "ep2": (2, 1, {"expert_model_parallel_size": 2}, {}),
    "tp2_sp_ep2": (2, 1, {"tensor_model_parallel_size": 2, "sequence_parallel": True,
                          "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1}, {}),
    "passes2_ep2": (2, 1, {"expert_model_parallel_size": 2}, PASSES2),
}


def variant_objective(name: str) -> str:
    """The objective a variant run trains with."""
    spec = VARIANT_RUNS[name][0]
    return spec["name"] if isinstance(spec, dict) else spec


def hf_model(out: Path) -> None:
    """The random starting model: a 4-layer Llama with tied embeddings (transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.05,
                      attn_implementation="eager")
    LlamaForCausalLM(cfg).save_pretrained(out)


def hf_moe_model(out: Path) -> None:
    """The random starting MoE model: a 4-layer Qwen3-MoE, layer 1 dense, 4 experts, top 2 renormalised."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(1)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                         router_aux_loss_coef=MOE_AUX_COEFF, max_position_embeddings=128, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, initializer_range=0.05, attn_implementation="eager")
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # a router with some preference, so routing is not a coin toss
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
    model.save_pretrained(out)


def _convert(models: dict[str, str]) -> None:
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron

    for hf_dir, out in models.items():
        convert_hf_to_megatron(hf_dir, out)


def _export(ckpts: dict[str, str], root: str) -> None:
    from psft_megatron.checkpoint.lora import is_lora_meta
    from psft_megatron.checkpoint.model_checkpoint import read_meta
    from psft_megatron.conversion.lora_export import export_peft_adapter
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf

    for name, ckpt in ckpts.items():
        convert_megatron_to_hf(ckpt, Path(root) / name, dtype="float32")  # a LoRA checkpoint: merged
        if is_lora_meta(read_meta(ckpt)):
            export_peft_adapter(ckpt, Path(root) / f"{name}_peft", dtype="float32")


def _train_all(recipes: dict[str, dict]) -> dict[str, Any]:
    """Train each recipe in this job (one rank of it); for objectives with a frozen reference
    model, also record whether it changed, sits in the optimizer or wants gradients."""
    from psft_megatron.model.lora.state import adapter_parameters
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import build_trainer
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed, teardown
    from psft_megatron.training.loop import train

    out = {}
    for name, recipe_dict in recipes.items():
        env = init_distributed()
        if name.endswith("_resume"):  # a first launch that stops after 4 steps, saving its checkpoint
            stopped = copy.deepcopy(recipe_dict)
            stopped["training"]["exit_after_steps"] = 4
            first = _train_all({name.removesuffix("_resume") + "_stopped": stopped})
            env = init_distributed()
        if name.endswith("_continue"):  # init_from the checkpoint its namesake (trained before it) ended with
            recipe_dict = copy.deepcopy(recipe_dict)
            recipe_dict["checkpoint"]["init_from"] = out[name.removesuffix("_continue")]["checkpoint"]
        recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
        init_model_parallel(recipe.parallel)
        set_seed(recipe.training.seed)
        trainer = build_trainer(recipe, env)
        lora = recipe.model.lora is not None
        # The adapters' first values (global tensors at TP=PP=1) for the float64 reference.
        initial = {n: p.detach().clone() for n, p in adapter_parameters(trainer.bundle.model)} \
            if lora and env.world_size == 1 else None
        reference = trainer.reference or []
        ref_before = [p.detach().clone() for c in reference for p in c.parameters()]
        opt_params = {id(p) for g in trainer.bundle.optimizer.param_groups for p in g["params"]}
        result = train(trainer)
        trainer.checkpointer.finish(wait=True)  # as a launch ends (run.py): the HF copy in flight completes
        out[name] = {"records": result.records, "eval": result.eval_records,
                     "checkpoint": str(result.last_checkpoint), "init_from": recipe.checkpoint.init_from}
        if name.endswith("_resume"):
            out[name]["records"] = next(iter(first.values()))["records"] + result.records
        if lora:
            frozen = [p for c in trainer.bundle.model for n, p in c.named_parameters() if "lora_" not in n]
            out[name].update(
                initial_adapters=initial,
                base_requires_grad=any(p.requires_grad for p in frozen),
                base_in_optimizer=any(id(p) in opt_params for p in frozen),
                optimizer_params=sum(p.numel() for g in trainer.bundle.optimizer.param_groups for p in g["params"]),
            )
        elif reference:
            ref_after = [p.detach().clone() for c in reference for p in c.parameters()]
            policy = [p.detach() for c in trainer.bundle.model for p in c.parameters()]
            out[name].update(
                reference_unchanged=all(torch.equal(a, b) for a, b in zip(ref_before, ref_after)),
                reference_in_optimizer=any(id(p) in opt_params for c in reference for p in c.parameters()),
                reference_requires_grad=any(p.requires_grad for c in reference for p in c.parameters()),
                policy_moved=not all(torch.equal(a, b) for a, b in zip(ref_before, policy)),
            )
        teardown(destroy_process_group=False)
    return out


def recipe(data: Path, tmp: Path, name: str, micro: int, parallel: dict, loss: dict | None = None,
           training: dict | None = None, lora: dict | None = None, optimizer: dict | None = None,
           model: str = "", checkpoint: dict | None = None) -> dict:
    """The tiny recipe of one run, starting from the converted model at ``tmp/{model}init``
    (``model``: "" the Llama, "moe_" the Qwen3-MoE)."""
    r = tiny_recipe(data, tmp / name, training=dict(TRAINING, micro_batch_size=micro, **(training or {})),
                    optimizer=dict(OPTIMIZER, **(optimizer or {})),
                    parallel=parallel,
                    checkpoint={"init_from": str(tmp / f"{model}init"), "allow_random_init": False,
                                "save_at_end": True, "keep_last": 1, **(checkpoint or {})})
    r["model"] = {"hf_config": str(tmp / f"{model}hf_init"), "params_dtype": "fp32", "transformer_impl": "local"}
    if lora is not None:
        r["model"]["lora"] = lora
    if not r["training"].get("eval_interval"):
        r["data"]["eval"] = []
    if loss:
        r["loss"] = dict(r["loss"], **loss)
    return r


def reference_rows(recipe_dict: dict) -> list[list[list[dict[str, torch.Tensor]]]]:
    """The global batches as the project's loader yields them at DP=1: mini-batches of rows."""
    from psft_megatron.data.loader import LoaderConfig, PackedLoader
    from psft_megatron.data.prepare import prepare_dataset
    from psft_megatron.recipe import recipe_from_dict

    r = recipe_from_dict(copy.deepcopy(recipe_dict))
    cached = prepare_dataset(Path(r.data.cache_dir) / "train", r.data.train, r.data.tokenizer, r.data.chat_template,
                             is_writer=True, pad=r.data.pad)
    t = r.training
    cfg = LoaderConfig(t.seq_length, t.global_batch_size, t.mini_batch_size, t.mini_batch_size, seed=t.seed,
                       pack=r.data.pack, pad_id=int(cached.manifest.identity["tokenizer"]["pad_id"]))
    loader = PackedLoader(cached, cfg, 0, 1)
    batches = []
    for _ in range(t.train_steps // t.steps_per_global_batch):
        gb = next(loader)
        minis = []
        for mini in gb.mini_batches:
            (mb,) = mini.micro_batches
            minis.append([{k: getattr(mb, k)[i] for k in ("tokens", "labels", "loss_mask", "segment_ids")}
                          for i in range(mb.shape[0])])
        batches.append(minis)
    return batches


def eval_rows(recipe_dict: dict) -> list[dict[str, torch.Tensor]]:
    """The held-out rows the trainer's evaluator scores (``training.eval_rows`` of the eval split, in
    its fixed order, whatever the seed), as the project's loader packs them."""
    from psft_megatron.data.loader import LoaderConfig, PackedLoader
    from psft_megatron.data.prepare import prepare_dataset
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.training.data_setup import HELD_OUT_SEED

    r = recipe_from_dict(copy.deepcopy(recipe_dict))
    cached = prepare_dataset(Path(r.data.cache_dir) / "eval", r.data.eval, r.data.tokenizer, r.data.chat_template,
                             is_writer=True, pad=r.data.pad)
    t = r.training
    cfg = LoaderConfig(t.seq_length, 1, 1, 1, seed=HELD_OUT_SEED, pack=r.data.pack,
                       pad_id=int(cached.manifest.identity["tokenizer"]["pad_id"]))
    loader = PackedLoader(cached, cfg)
    mb = loader.build_micro_batch(loader.epoch_order(0)[: t.eval_rows])
    return [{k: getattr(mb, k)[i] for k in ("tokens", "labels", "loss_mask", "segment_ids")}
            for i in range(mb.shape[0])]


def train_all(tmp: Path) -> dict[str, Any]:
    """Convert the starting models, train every PSFT, sft_kl and MoE run, export each final model.

    Returns ``{"psft": {name: ...}, "sft_kl": {name: ...}, "variant": {name: ...}, "lora": {name: ...},
    "moe": {name: ...}, "recipes": ..., "final": ..., "peft": ..., "hf_init": path, "moe_hf_init": path}``:
    each run's records (and reference-model checks), its recipe, its final weights in float64
    (transformers state dict; LoRA runs merged) and for LoRA runs the exported PEFT adapter's tensors."""
    from transformers import AutoModelForCausalLM

    from psft_megatron.data.synthetic import write_tiny_dataset

    data = write_tiny_dataset(tmp / "data", train=480, eval=8, vocab_size=VOCAB)
    hf_model(tmp / "hf_init")
    hf_moe_model(tmp / "moe_hf_init")
    run_in_processes(_convert, 1, kwargs={"models": {str(tmp / "hf_init"): str(tmp / "init"),
                                                     str(tmp / "moe_hf_init"): str(tmp / "moe_init")}},
                     init_process_group=False)
    specs = {("psft", n): spec + ({},) for n, spec in PSFT_RUNS.items()}
    specs.update({("sft_kl", n): spec + ({},) for n, spec in SFT_KL_RUNS.items()})
    specs.update({("variant", n): spec[1:] for n, spec in VARIANT_RUNS.items()})
    specs.update({("lora", n): (procs, micro, par, {}) for n, (_, procs, micro, par, _) in LORA_RUNS.items()})
    specs.update({("moe", n): spec for n, spec in MOE_RUNS.items()})
    recipes = {}
    for (group, name), (_, micro, par, training) in specs.items():
        if group == "lora":
            objective = LORA_RUNS[name][0]
            extra = LORA_RUNS[name][4]
            loss = dict({"name": objective, "kl_beta": KL_BETA} if objective != "psft" else {}, **extra.get("loss", {}))
            recipes[f"{group}/{name}"] = recipe(
                data, tmp, f"{group}_{name}", micro, par, loss or None, dict(training, **extra.get("training", {})),
                lora=dict(LORA, **extra.get("lora", {})), optimizer=dict(LORA_OPTIMIZER, **extra.get("optimizer", {})),
                checkpoint=extra.get("checkpoint"))
            continue
        objective = VARIANT_RUNS[name][0] if group == "variant" else "psft" if group == "moe" else group
        if isinstance(objective, dict):
            loss = objective
        else:
            loss = {"name": objective, "kl_beta": KL_BETA} if objective != "psft" else None
        recipes[f"{group}/{name}"] = recipe(data, tmp, f"{group}_{name}", micro, par, loss, training,
                                            model="moe_" if group == "moe" else "")
    trained: dict[str, Any] = {}
    for nprocs in sorted({spec[0] for spec in specs.values()}):
        group = {f"{o}/{name}": recipes[f"{o}/{name}"] for (o, name), spec in specs.items() if spec[0] == nprocs}
        trained.update(run_in_processes(_train_all, nprocs, kwargs={"recipes": group}, timeout=600)[-1])
    run_in_processes(_export, 1, kwargs={"ckpts": {k: t["checkpoint"] for k, t in trained.items()},
                                         "root": str(tmp / "final")}, init_process_group=False)
    out: dict[str, Any] = {"psft": {}, "sft_kl": {}, "variant": {}, "lora": {}, "moe": {}, "recipes": recipes,
                           "final": {}, "peft": {}, "hf_init": tmp / "hf_init", "moe_hf_init": tmp / "moe_hf_init"}
    for key, t in trained.items():
        objective, name = key.split("/")
        out[objective][name] = t
        out["final"][key] = AutoModelForCausalLM.from_pretrained(
            tmp / "final" / key, dtype=torch.float64, experts_implementation="eager").state_dict()
        if objective == "lora":
            from safetensors.torch import load_file

            out["peft"][key] = load_file(tmp / "final" / f"{key}_peft" / "adapter_model.safetensors")
    return out
