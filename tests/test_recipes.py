"""Recipes: every shipped recipe validates at its intended world size; bad recipes fail
before anything is built, with a message naming the file, line and field to change."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from psft_megatron.config.load import ConfigError
from psft_megatron.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# The world size each recipe is written for (see its header comment).
WORLD_SIZES = {"tiny_cpu.yaml": 2, "qwen2.5_7b_math.yaml": 8, "8b_math.yaml": 8, "70b_math.yaml": 64,
               "70b_math_lora.yaml": 8, "qwen2.5_7b_math_lora.yaml": 1,
               "qwen3_8b_math.yaml": 8, "qwen3_30b_a3b_math.yaml": 16, "tiny_moe_cpu.yaml": 2,
               **{f"smollm2_gsm8k_{o}.yaml": 1 for o in ("sft", "psft", "dft", "sft_kl", "mix")}}


def test_every_recipe_is_listed():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(WORLD_SIZES)


@pytest.mark.parametrize("name", sorted(WORLD_SIZES))
def test_recipe_validates(name):
    recipe = load_recipe(RECIPES / name)
    recipe.validate(WORLD_SIZES[name])


def test_paper_setting():
    r = load_recipe(RECIPES / "qwen2.5_7b_math.yaml")
    assert r.training.mini_batches_per_global_batch == 8
    assert (r.loss.name, r.loss.eps_low, r.loss.eps_high) == ("psft", 0.2, 0.28)
    assert (r.optimizer.lr, r.optimizer.weight_decay, r.optimizer.clip_grad) == (1e-6, 0.1, 1.0)
    assert r.model.resolve().qkv_bias  # from the model's config.json (model.hf_config)


def test_mixture_recipe():
    r = load_recipe(RECIPES / "smollm2_gsm8k_mix.yaml")
    assert r.data.train_weights() == [0.75, 0.25]
    assert r.training.eval_tasks == ["mmlu_anatomy", "truthfulqa_mc1"] and r.data.eval


def test_70b_layout_fits_its_cluster():
    r = load_recipe(RECIPES / "70b_math.yaml")
    p = r.parallel
    assert p.tensor_model_parallel_size == 8  # one NVLink node
    assert r.model.num_layers % (p.pipeline_model_parallel_size * p.virtual_pipeline_model_parallel_size) == 0
    assert p.context_parallel_size == 2 and p.data_parallel_size(64) == 1
    with pytest.raises(ConfigError, match=r"70b_math.yaml:\d+: parallel layout does not fit the job: world size 48 is not divisible"):
        r.validate(48)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


TINY = (RECIPES / "tiny_cpu.yaml").read_text()


@pytest.mark.parametrize(
    "edit, expected",
    [
        (("  mini_batch_size: 4 ", "  mini_batch_size: 5 "), r"bad.yaml:\d+: training.global_batch_size \(16\) is not a multiple of training.mini_batch_size \(5\)"),
        (("  train_steps: 96", "  train_stpes: 96"), r"bad.yaml:\d+: unknown key training.train_stpes \(did you mean training.train_steps\?\)"),
        (("  num_attention_heads: 4", "  num_attention_heads: 3"), r"bad.yaml:\d+: model.num_query_groups \(2\) must divide model.num_attention_heads \(3\)"),
        (("  lr: 3.0e-3 ", "  lr: fast "), r"bad.yaml:\d+: optimizer.lr must be a number, got 'fast'"),
        (("  allow_random_init: true ", "  allow_random_init: false "), r"bad.yaml:\d+: checkpoint.init_from is not set, so the model would start from random weights"),
        (("  sft_warmup_steps: 16", "  sft_warmup_steps: 6"), r"bad.yaml:\d+: training.sft_warmup_steps \(6\) must be a multiple of .* = 4"),
        (("  seq_length: 128", "  seq_length: 127"), r"bad.yaml:\d+: training.seq_length \(127\) must be divisible by parallel.tensor_model_parallel_size \(2\)"),
        (("  name: psft", "  name: ppo"), r"bad.yaml:\d+: loss: unknown objective 'ppo'; known: \[.*'psft'"),
    ],
)
def test_bad_recipe_messages(tmp_path, edit, expected):
    old, new = edit
    assert old in TINY, old
    with pytest.raises(ConfigError, match=expected):
        load_recipe(_write(tmp_path, TINY.replace(old, new)))


def test_layout_constraints_need_world_size():
    r = load_recipe(RECIPES / "tiny_cpu.yaml", ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"])
    r.validate(2)  # DP=2: mini-batch 4 = micro 2 x DP 2
    with pytest.raises(ConfigError, match=r"tiny_cpu.yaml:\d+: training.mini_batch_size \(4\) is not a multiple of micro_batch_size x data-parallel size = 2 x 4 = 8"):
        r.validate(4)
    with pytest.raises(ConfigError, match=r"num_query_groups \(2\) must be divisible by parallel.tensor_model_parallel_size \(4\)"):
        load_recipe(RECIPES / "tiny_cpu.yaml", ["parallel.tensor_model_parallel_size=4"])


def test_overrides_are_typed_and_checked():
    r = load_recipe(RECIPES / "tiny_cpu.yaml", ["training.train_steps=32", "optimizer.lr=1e-3", "loss.eps_high=0.3"])
    assert (r.training.train_steps, r.optimizer.lr, r.loss.eps_high) == (32, 1e-3, 0.3)
    # Errors about an override name the command line, not a line of the YAML file.
    with pytest.raises(ConfigError, match="^command-line override: training.train_steps must be an integer"):
        load_recipe(RECIPES / "tiny_cpu.yaml", ["training.train_steps=many"])
    with pytest.raises(ConfigError, match=r"^command-line override: unknown key training.trian_steps \(did you mean training.train_steps\?\)"):
        load_recipe(RECIPES / "tiny_cpu.yaml", ["training.trian_steps=4"])
    with pytest.raises(ConfigError, match="^command-line override: unknown key model.layers"):
        load_recipe(RECIPES / "tiny_cpu.yaml", ["model.layers=2"])


@pytest.mark.parametrize("field", ["training.eval_interval=4", "training.eval_at_start=true"])
def test_evaluation_needs_a_held_out_source(field):
    name = field.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{re.escape(name)} is (set|true) but data.eval lists no held-out source"):
        load_recipe(RECIPES / "tiny_cpu.yaml", ["data.eval=[]", "training.eval_interval=0", field])


def test_per_source_fields_can_be_overridden():
    r = load_recipe(RECIPES / "tiny_cpu.yaml", ["data.train[0].on_error=skip", "data.eval[0].limit=5"])
    assert r.data.train[0].on_error == "skip" and r.data.eval[0].limit == 5
    assert r.data.train[0].path == "data/tiny/train.jsonl"  # the rest of the source is kept
    with pytest.raises(ConfigError, match=r"^command-line override: data.train\[0\].on_error must be one of \['raise', 'skip'\]"):
        load_recipe(RECIPES / "tiny_cpu.yaml", ["data.train[0].on_error=ignore"])
    with pytest.raises(ConfigError, match=r"data.train\[3\] does not exist \(the list has 1 entries\)"):
        load_recipe(RECIPES / "tiny_cpu.yaml", ["data.train[3].limit=5"])


@pytest.mark.slow  # starts the entry point
def test_cli_refuses_bad_recipe_before_building(tmp_path):
    """The torchrun entry exits 2 with the message, without initialising anything."""
    bad = _write(tmp_path, TINY.replace("  mini_batch_size: 4 ", "  mini_batch_size: 5 "))
    env = dict(os.environ, WORLD_SIZE="2", RANK="0")
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain_psft.py"), str(bad)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2
    assert "bad recipe" in out.stderr and "mini_batch_size (5)" in out.stderr
    # --validate-only also checks what the recipe points at: here the 70B checkpoint is missing.
    missing = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain_psft.py"), str(RECIPES / "70b_math.yaml"), "--validate-only"],
        capture_output=True, text=True, env=dict(os.environ, WORLD_SIZE="64", RANK="0"), timeout=120,
    )
    assert missing.returncode == 2
    assert re.search(r"70b_math.yaml:\d+: checkpoint.init_from: checkpoints/llama3.1-70b-instruct does not exist",
                     missing.stderr), missing.stderr


@pytest.mark.slow  # starts the entry point
def test_validate_only_checks_files_and_folders(tiny_data, tmp_path):
    """Up-front checks of what a recipe names: data files, init_from, writable folders (no files written)."""
    base = [f"data.train[0].path={tiny_data / 'train.jsonl'}", f"data.eval[0].path={tiny_data / 'eval.jsonl'}",
            f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.cache_dir={tmp_path / 'cache'}",
            f"logging.run_dir={tmp_path / 'run'}"]

    def validate(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain_psft.py"), str(RECIPES / "tiny_cpu.yaml"),
                               *base, *overrides, "--validate-only"], capture_output=True, text=True,
                              env=dict(os.environ, WORLD_SIZE="2", RANK="0"), timeout=120)

    ok = validate()
    assert ok.returncode == 0, ok.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # checked, not created
    (tmp_path / "blocker").write_text("a file where a folder should go")
    cases = {
        "data.train[0].path=missing.jsonl": r"data.train\[0\].path: no such file missing.jsonl",
        f"checkpoint.init_from={tmp_path}": r"checkpoint.init_from: .* is not a psft_megatron model checkpoint",
        f"logging.run_dir={tmp_path / 'blocker' / 'run'}": r"logging.run_dir: cannot write .*blocker is a file",
    }
    for override, message in cases.items():
        bad = validate(override)
        assert bad.returncode == 2, (override, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: bad recipe:"), bad.stderr
        assert re.search(message, lines[0]), (override, lines[0])


def test_cpu_refuses_what_needs_cuda():
    r = load_recipe(RECIPES / "qwen2.5_7b_math.yaml")
    r.validate_for_device(has_cuda=True)
    # bf16 stays refused; the distributed optimizer runs on CPU (tests/test_distributed_optimizer.py).
    with pytest.raises(ConfigError, match="bf16 needs CUDA") as refused:
        r.validate_for_device(has_cuda=False)
    assert "distributed_optimizer" not in str(refused.value)
    load_recipe(RECIPES / "tiny_cpu.yaml").validate_for_device(has_cuda=False)


def test_a_launch_checks_its_recipe_once(tiny_data, tmp_path, monkeypatch):
    """load_recipe returns a recipe validated at the job's size; the launcher's check_launch adds the
    device and file checks, and run()'s own call (build_trainer) finds it all done. A change to any
    field voids what passed, so an edited recipe is checked again."""
    import psft_megatron.preflight as preflight
    from psft_megatron.recipe import RecipeConfig

    calls = {"recipe": 0, "files": 0}
    cross_section, files = RecipeConfig._validate_cross_section, preflight.preflight

    def counted_cross_section(self):
        calls["recipe"] += 1
        cross_section(self)

    def counted_files(recipe):
        calls["files"] += 1
        files(recipe)

    monkeypatch.setattr(RecipeConfig, "_validate_cross_section", counted_cross_section)
    monkeypatch.setattr(preflight, "preflight", counted_files)
    overrides = [f"data.train[0].path={tiny_data / 'train.jsonl'}", f"data.eval[0].path={tiny_data / 'eval.jsonl'}",
                 f"data.tokenizer={tiny_data / 'tokenizer'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"logging.run_dir={tmp_path / 'run'}"]
    r = load_recipe(RECIPES / "tiny_cpu.yaml", overrides, world_size=2)
    assert calls == {"recipe": 1, "files": 0}
    preflight.check_launch(r, 2, has_cuda=False)  # the launcher
    preflight.check_launch(r, 2, has_cuda=False)  # run() -> build_trainer
    assert calls == {"recipe": 1, "files": 1}
    # Another world size is another check: TP=2 x DP=4 needs mini_batch_size 4 >= 2 x 4.
    with pytest.raises(ConfigError, match=r"training.mini_batch_size \(4\) is not a multiple of .* = 2 x 4 = 8"):
        preflight.check_launch(r, 8, has_cuda=False)
    r.training.mini_batch_size = 3  # an edit after loading: checked again, and refused
    with pytest.raises(ConfigError, match=r"mini_batch_size"):
        preflight.check_launch(r, 2, has_cuda=False)
    r.training.mini_batch_size = 4  # back as loaded: what passed then holds again
    calls.update(recipe=0, files=0)
    preflight.check_launch(r, 2, has_cuda=False)
    assert calls == {"recipe": 0, "files": 0}
