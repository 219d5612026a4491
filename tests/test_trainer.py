"""The trainer end to end, in real processes on gloo.

- The same tiny run gives the same metrics at TP=1, TP=2 (+SP), PP=2, PP=2 x VP=2,
  DP=2 and TP=2 x PP=2 (+SP), every layout starting from one saved initial model.
- PSFT with one mini-batch per global batch is SFT, step by step.
- A run stopped (exit_after_steps) and resumed equals an uninterrupted run; the
  checkpoint resumed at TP=2 gives the same next steps.
- Every field of metrics.jsonl is there; the snapshot pass makes ratios move off 1.

Three launches (1, 2 and 4 processes); every train() call inside re-creates megatron's
parallel state for its own layout.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from psft_megatron.data.synthetic import write_tiny_dataset
from psft_megatron.testing.multiproc import run_in_processes

ROOT = Path(__file__).resolve().parents[1]

# Compared metrics: everything a layout change must not change (fp32 tolerances).
COMPARED = ("loss", "entropy", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "mean_logp", "grad_norm", "lr", "tokens")


def _recipe(data: Path, run_dir: Path, **sections) -> dict:
    base = {
        "model": {
            "family": "llama", "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 160,
            "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 384,
            "max_position_embeddings": 128, "params_dtype": "fp32", "transformer_impl": "local",
        },
        "parallel": {},
        "training": {
            "seq_length": 64, "global_batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 2,
            "train_steps": 8, "sft_warmup_steps": 2, "seed": 7, "eval_interval": 4, "eval_rows": 6,
        },
        "optimizer": {"lr": 2e-3, "min_lr": 2e-4, "lr_warmup_steps": 2, "clip_grad": 1.0, "weight_decay": 0.1},
        "loss": {"name": "psft", "eps_low": 0.2, "eps_high": 0.28},
        "data": {
            "train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": 64}],
            "eval": [{"path": str(data / "eval.jsonl"), "adapter": "generic", "max_length": 64}],
            "tokenizer": str(data / "tokenizer"),
            "chat_template": "plain",
            "cache_dir": str(data / "cache"),
        },
        "checkpoint": {"allow_random_init": True, "save_at_end": False},
        "logging": {"run_dir": str(run_dir), "tensorboard": False},
    }
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return base


def _train(recipe_dict: dict) -> dict:
    """One train() call on this process group; returns records on the logging rank."""
    from psft_megatron.config.recipe import recipe_from_dict
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from psft_megatron.training.loop import train

    env = init_distributed()
    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    init_model_parallel(recipe.parallel)
    set_seed(recipe.training.seed)
    result = train(recipe, env)
    return {"records": result.records, "eval": result.eval_records, "step": result.step}


def _save_initial_model(recipe_dict: dict, out: str) -> None:
    """The common starting point of every layout: a random model saved at TP=1."""
    from psft_megatron.checkpoint.model_checkpoint import save_model_checkpoint
    from psft_megatron.config.recipe import recipe_from_dict
    from psft_megatron.model.build import build_model
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    init_distributed()
    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    init_model_parallel(recipe.parallel)
    set_seed(123)
    built = build_model(recipe.model, recipe.parallel)
    save_model_checkpoint(built.chunks, out, {"model": recipe.model.resolve(), "step": 0})


def single_process(base: dict, tmp: str) -> dict:
    tmp_path = Path(tmp)
    init = str(tmp_path / "init")
    _save_initial_model(base, init)
    ckpt = {"init_from": init, "allow_random_init": False, "save_at_end": False}
    out = {}
    out["tp1"] = _train(_recipe_like(base, tmp_path / "tp1", checkpoint=ckpt))
    # One mini-batch per global batch: PSFT must equal SFT.
    one = {"global_batch_size": 4, "mini_batch_size": 4, "train_steps": 6, "sft_warmup_steps": 0}
    out["psft_k1"] = _train(_recipe_like(base, tmp_path / "psft_k1", checkpoint=ckpt, training=one))
    out["sft_k1"] = _train(_recipe_like(base, tmp_path / "sft_k1", checkpoint=ckpt, training=one, loss={"name": "sft"}))
    out["dft"] = _train(_recipe_like(base, tmp_path / "dft", checkpoint=ckpt, loss={"name": "dft"},
                                     training={"train_steps": 4, "sft_warmup_steps": 0}))
    # Stopped after 4 steps (checkpoint), then resumed to 8: must equal tp1.
    stop = dict(ckpt, save_dir=str(tmp_path / "resume_ckpt"))
    out["stopped"] = _train(_recipe_like(base, tmp_path / "resume", checkpoint=stop, training={"exit_after_steps": 4}))
    out["resumed"] = _train(_recipe_like(base, tmp_path / "resume", checkpoint=stop))
    return out


def two_processes(base: dict, tmp: str) -> dict:
    tmp_path = Path(tmp)
    ckpt = {"init_from": str(tmp_path / "init"), "allow_random_init": False, "save_at_end": False}
    layouts = {
        "tp2_sp": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
        "pp2": {"pipeline_model_parallel_size": 2},
        "pp2_vp2": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2},
        "dp2": {},
    }
    out = {}
    for name, parallel in layouts.items():
        out[name] = _train(_recipe_like(base, tmp_path / name, checkpoint=ckpt, parallel=parallel))
    # The single-process run's step-4 checkpoint, resumed at TP=2: same steps 5..8.
    other = dict(ckpt, save_dir=str(tmp_path / "resume_ckpt_tp2"))
    _copy_checkpoint(tmp_path / "resume_ckpt", tmp_path / "resume_ckpt_tp2")
    out["resumed_tp2"] = _train(
        _recipe_like(base, tmp_path / "resume_tp2", checkpoint=other, parallel=layouts["tp2_sp"])
    )
    return out


def four_processes(base: dict, tmp: str) -> dict:
    tmp_path = Path(tmp)
    ckpt = {"init_from": str(tmp_path / "init"), "allow_random_init": False, "save_at_end": False}
    parallel = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "sequence_parallel": True}
    return {
        "tp2pp2_sp": _train(_recipe_like(base, tmp_path / "tp2pp2", checkpoint=ckpt, parallel=parallel)),
        # More than 2 stages: the middle stages must keep the packed rows' attention boundaries.
        "pp4": _train(_recipe_like(base, tmp_path / "pp4", checkpoint=ckpt, parallel={"pipeline_model_parallel_size": 4})),
    }


def _recipe_like(base: dict, run_dir: Path, **sections) -> dict:
    r = copy.deepcopy(base)
    r["logging"]["run_dir"] = str(run_dir)
    for section, values in sections.items():
        r[section] = {**r.get(section, {}), **values}
    return r


def _copy_checkpoint(src: Path, dst: Path) -> None:
    import shutil
    import torch.distributed as dist

    if dist.get_rank() == 0 and not dst.exists():
        # Only the step-4 checkpoint: resuming from it must redo steps 5..8.
        dst.mkdir(parents=True)
        shutil.copytree(src / "step_000004", dst / "step_000004")
        (dst / "latest").write_text("step_000004")
    dist.barrier()


def _logged(results: list[dict], name: str) -> dict:
    """The logging rank's (last rank's) result of run ``name``."""
    return results[-1][name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    data = tmp / "data"
    write_tiny_dataset(data, train=480, eval=96)
    base = _recipe(data, tmp / "unused")
    one = run_in_processes(single_process, 1, kwargs={"base": base, "tmp": str(tmp)}, timeout=400)
    two = run_in_processes(two_processes, 2, kwargs={"base": base, "tmp": str(tmp)}, timeout=500)
    four = run_in_processes(four_processes, 4, kwargs={"base": base, "tmp": str(tmp)}, timeout=400)
    return {"one": one, "two": two, "four": four, "tmp": tmp}


def _assert_same_curve(got: list[dict], ref: list[dict], what: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref], what
    for g, r in zip(got, ref):
        assert g["phase"] == r["phase"], f"{what} step {r['step']}"
        for key in COMPARED:
            assert g[key] == pytest.approx(r[key], rel=2e-4, abs=2e-5), f"{what} step {r['step']} {key}: {g[key]} vs {r[key]}"


def test_tp1_run_learns_and_switches_phase(runs):
    recs = _logged(runs["one"], "tp1")["records"]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["phase"] for r in recs] == ["sft"] * 2 + ["psft"] * 6
    assert recs[-1]["loss"] < recs[0]["loss"]
    # The first mini-batch after a snapshot runs on the snapshot weights: ratio exactly 1.
    for r in recs[2::2]:
        assert r["ratio_min"] == pytest.approx(1.0, abs=1e-6) and r["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    # The second one ran after an optimizer step: the ratio has moved.
    assert any(abs(r["ratio_max"] - 1) > 1e-4 or abs(r["ratio_min"] - 1) > 1e-4 for r in recs[3::2])


@pytest.mark.parametrize("layout", ["tp2_sp", "pp2", "pp2_vp2", "dp2"])
def test_two_process_layouts_match_tp1(runs, layout):
    _assert_same_curve(_logged(runs["two"], layout)["records"], _logged(runs["one"], "tp1")["records"], layout)
    ref_eval = _logged(runs["one"], "tp1")["eval"]
    got_eval = _logged(runs["two"], layout)["eval"]
    assert [e["step"] for e in got_eval] == [e["step"] for e in ref_eval] == [4, 8]
    for g, r in zip(got_eval, ref_eval):
        assert g["loss"] == pytest.approx(r["loss"], rel=2e-4)


@pytest.mark.parametrize("layout", ["tp2pp2_sp", "pp4"])
def test_four_process_layouts_match_tp1(runs, layout):
    _assert_same_curve(_logged(runs["four"], layout)["records"], _logged(runs["one"], "tp1")["records"], layout)


def test_psft_with_one_mini_batch_is_sft(runs):
    psft = _logged(runs["one"], "psft_k1")["records"]
    sft = _logged(runs["one"], "sft_k1")["records"]
    assert [r["phase"] for r in psft] == ["psft"] * 6
    for p, s in zip(psft, sft):
        # PSFT's loss is -ratio = -1 per token (SFT's is -logp), but the update is identical:
        assert p["ratio_min"] == p["ratio_max"] == 1.0
        assert p["clip_frac"] == 0.0
        for key in ("mean_logp", "entropy", "grad_norm", "lr"):
            assert p[key] == pytest.approx(s[key], rel=1e-6, abs=1e-7), key


def test_dft_runs_through_the_same_loop_without_snapshot(runs):
    recs = _logged(runs["one"], "dft")["records"]
    assert [r["phase"] for r in recs] == ["dft"] * 4
    for r in recs:
        assert r["ratio_min"] == r["ratio_max"] == 1.0 and r["clip_frac"] == 0.0  # no logp_old
        # -stopgrad(p) * logp per token: between 0 and 1/e per token, so the mean is too.
        assert 0.0 < r["loss"] <= 1 / 2.718281828 + 1e-9
    tp1_first = _logged(runs["one"], "tp1")["records"][0]
    assert recs[0]["mean_logp"] == pytest.approx(tp1_first["mean_logp"], abs=1e-6)  # same model, same first batch


def test_stop_and_resume_equals_uninterrupted(runs):
    stopped = _logged(runs["one"], "stopped")
    resumed = _logged(runs["one"], "resumed")
    ref = _logged(runs["one"], "tp1")["records"]
    assert stopped["step"] == 4 and resumed["step"] == 8
    assert [r["step"] for r in resumed["records"]] == [5, 6, 7, 8]
    # Same process, same layout: the continuation is bit-for-bit the uninterrupted run.
    for g, r in zip(stopped["records"] + resumed["records"], ref):
        for key in COMPARED:
            assert g[key] == r[key], f"step {r['step']} {key}"
    metrics = [json.loads(l) for l in (runs["tmp"] / "resume" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "split" not in m] == list(range(1, 9))


def test_checkpoint_resumed_at_other_layout_gives_same_next_steps(runs):
    got = _logged(runs["two"], "resumed_tp2")["records"]
    ref = _logged(runs["one"], "tp1")["records"][4:]
    _assert_same_curve(got, ref, "resumed at TP=2")


def test_metrics_jsonl_has_every_field(runs):
    from psft_megatron.training.metrics import TRAIN_FIELDS

    lines = (runs["tmp"] / "tp1" / "metrics.jsonl").read_text().splitlines()
    train = [json.loads(l) for l in lines if "split" not in json.loads(l)]
    evals = [json.loads(l) for l in lines if json.loads(l).get("split") == "eval"]
    assert len(train) == 8 and len(evals) == 2
    for rec in train:
        assert set(TRAIN_FIELDS) <= set(rec)
        assert rec["tokens_per_s"] > 0
    assert (runs["tmp"] / "tp1" / "config.yaml").is_file()
