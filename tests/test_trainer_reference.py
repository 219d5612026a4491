"""The trainer against an independent float64 reference (``tests/reference_trainer.py``).

One random Llama (transformers, tied embeddings, a 300-token vocabulary that megatron
pads to 384) is converted with the project's converter and trained by the project's
trainer at TP=1 with micro-batch sizes 1, 2 and 4, and at TP=2+SP, PP=2 and DP=2. The
reference trains the same weights in float64 on the same rows (from the project's
loader): one global batch of SFT warm-up, then three of PSFT with k=2 mini-batches each,
with ``clip_grad`` small enough that clipping acts on most steps. Compared step by step:
loss, entropy, mean log-prob, clip fraction, ratio range, grad norm and lr; then every
final weight.

Tolerances come from fp32 round-off. The trainer computes in fp32 (unit round-off 6e-8);
reductions over ~10^3 tokens and a few layers make each step's metrics agree with float64
to a few 1e-7 relative (measured worst over all runs and steps: 7e-7, the ratio extrema),
and eight Adam steps turn that into final weights within 1.0e-5 (where a gradient is near
zero, Adam's update direction is sensitive to round-off). The tolerances are ten times the
measured worst: 1e-5 relative for metrics, 1e-4 absolute for weights. Every planted wiring
bug of issue #16 (tests/mutation_check.py) moves a compared value by far more.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe

pytestmark = pytest.mark.slow

VOCAB = 300  # not a multiple of 128: megatron's output layer has 84 padded columns
METRICS = ("loss", "entropy", "mean_logp", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "grad_norm", "lr")
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-7
WEIGHT_ATOL = 1e-4

TRAINING = {"seq_length": 64, "global_batch_size": 8, "mini_batch_size": 4, "train_steps": 8,
            "sft_warmup_steps": 2, "seed": 7, "eval_interval": 0}
OPTIMIZER = {"lr": 3e-3, "min_lr": 3e-4, "lr_warmup_steps": 2, "lr_schedule": "cosine", "weight_decay": 0.1,
             "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8, "clip_grad": 0.5}

RUNS = {  # name: (processes, micro_batch_size, parallel section)
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


def _hf_model(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.05,
                      attn_implementation="eager")
    LlamaForCausalLM(cfg).save_pretrained(out)


def _convert(hf_dir: str, out: str) -> None:
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out)


def _export(ckpts: dict[str, str], root: str) -> None:
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf

    for name, ckpt in ckpts.items():
        convert_megatron_to_hf(ckpt, Path(root) / name, dtype="float32")


def _train_all(recipes: dict[str, dict]) -> dict[str, Any]:
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run

    out = {}
    for name, recipe in recipes.items():
        result = run(recipe_from_dict(copy.deepcopy(recipe)))
        out[name] = {"records": result.records, "checkpoint": str(result.last_checkpoint)}
    return out


def _recipe(data: Path, tmp: Path, name: str, micro: int, parallel: dict) -> dict:
    r = tiny_recipe(data, tmp / name, training=dict(TRAINING, micro_batch_size=micro), optimizer=OPTIMIZER,
                    parallel=parallel,
                    checkpoint={"init_from": str(tmp / "init"), "allow_random_init": False, "save_at_end": True,
                                "keep_last": 1})
    r["model"] = {"hf_config": str(tmp / "hf_init"), "params_dtype": "fp32", "transformer_impl": "local"}
    r["data"]["eval"] = []
    return r


def _reference_rows(recipe: dict) -> list[list[list[dict[str, torch.Tensor]]]]:
    """The global batches as the project's loader yields them at DP=1: mini-batches of rows."""
    from psft_megatron.data.loader import LoaderConfig, PackedLoader
    from psft_megatron.data.prepare import prepare_dataset
    from psft_megatron.recipe import recipe_from_dict

    r = recipe_from_dict(copy.deepcopy(recipe))
    cached = prepare_dataset(Path(r.data.cache_dir) / "train", r.data.train, r.data.tokenizer, r.data.chat_template,
                             is_writer=True, pad=r.data.pad)
    t = r.training
    cfg = LoaderConfig(t.seq_length, t.global_batch_size, t.mini_batch_size, t.mini_batch_size, seed=t.seed,
                       pack=r.data.pack, pad_id=int(cached.manifest.identity["tokenizer"]["pad_id"]))
    loader = PackedLoader(cached, cfg, 0, 1)
    batches = []
    for _ in range(t.train_steps // t.mini_batches_per_global_batch):
        gb = next(loader)
        minis = []
        for mini in gb.mini_batches:
            (mb,) = mini.micro_batches
            minis.append([{k: getattr(mb, k)[i] for k in ("tokens", "labels", "loss_mask", "segment_ids")}
                          for i in range(mb.shape[0])])
        batches.append(minis)
    return batches


@pytest.fixture(scope="module")
def results(tiny_data, tmp_path_factory) -> dict[str, Any]:
    from transformers import LlamaForCausalLM

    from psft_megatron.data.synthetic import write_tiny_dataset

    from reference_trainer import RefConfig, train

    tmp = tmp_path_factory.mktemp("reference")
    data = write_tiny_dataset(tmp / "data", train=480, eval=8, vocab_size=VOCAB)
    _hf_model(tmp / "hf_init")
    run_in_processes(_convert, 1, kwargs={"hf_dir": str(tmp / "hf_init"), "out": str(tmp / "init")},
                     init_process_group=False)
    recipes = {name: _recipe(data, tmp, name, micro, par) for name, (_, micro, par) in RUNS.items()}
    trained: dict[str, Any] = {}
    for nprocs in sorted({n for n, _, _ in RUNS.values()}):
        group = {name: recipes[name] for name, (n, _, _) in RUNS.items() if n == nprocs}
        trained.update(run_in_processes(_train_all, nprocs, kwargs={"recipes": group}, timeout=600)[-1])
    run_in_processes(_export, 1, kwargs={"ckpts": {n: t["checkpoint"] for n, t in trained.items()},
                                         "root": str(tmp / "final")}, init_process_group=False)

    model = LlamaForCausalLM.from_pretrained(tmp / "hf_init", torch_dtype=torch.float64, attn_implementation="eager")
    o = OPTIMIZER
    cfg = RefConfig(lr=o["lr"], min_lr=o["min_lr"], warmup=o["lr_warmup_steps"], total_steps=TRAINING["train_steps"],
                    weight_decay=o["weight_decay"], betas=(o["adam_beta1"], o["adam_beta2"]), eps=o["adam_eps"],
                    clip_grad=o["clip_grad"], sft_warmup_steps=TRAINING["sft_warmup_steps"], objective="psft")
    ref_records = train(model, _reference_rows(recipes["tp1_micro1"]), VOCAB, cfg)
    final = {}
    for name in RUNS:
        final[name] = LlamaForCausalLM.from_pretrained(tmp / "final" / name, torch_dtype=torch.float64).state_dict()
    return {"ref": ref_records, "ref_weights": model.state_dict(), "trained": trained, "final": final}


def test_reference_run_exercises_what_it_should(results):
    ref = results["ref"]
    assert [r["phase"] for r in ref] == ["sft"] * 2 + ["psft"] * 6
    assert sum(r["clipped_grad"] for r in ref) >= 6, "clip_grad must act on most steps"
    assert max(r["clip_frac"] for r in ref) > 0, "some PSFT tokens must be clipped"
    # learning: the SFT objective falls over the run on the same held-out-free rows
    assert ref[-1]["mean_logp"] > ref[0]["mean_logp"]


@pytest.mark.parametrize("name", list(RUNS))
def test_trainer_matches_reference_step_by_step(results, name):
    got = results["trained"][name]["records"]
    ref = results["ref"]
    assert [g["step"] for g in got] == [r["step"] for r in ref]
    worst = {}
    for g, r in zip(got, ref):
        assert g["phase"] == r["phase"] and g["tokens"] == r["tokens"], f"step {r['step']}"
        for key in METRICS:
            err = abs(g[key] - r[key]) / max(abs(r[key]), METRIC_ATOL / METRIC_RTOL)
            worst[key] = max(worst.get(key, 0.0), err)
    bad = {k: v for k, v in worst.items() if v > METRIC_RTOL}
    assert not bad, f"{name}: relative error above {METRIC_RTOL}: {bad} (all: {worst})"


@pytest.mark.parametrize("name", list(RUNS))
def test_final_weights_match_reference(results, name):
    ref = results["ref_weights"]
    got = results["final"][name]
    assert set(got) == set(ref)
    diffs = {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= WEIGHT_ATOL, f"{name}: {worst} differs by {diffs[worst]:.2e} (> {WEIGHT_ATOL})"
