"""``model.hf_config`` is read once per launch, and a resolved ModelConfig never reads it again.

The reads are counted as the operating system sees them: a Python audit hook records every
``open`` of the file (whichever function opens it; nothing is mocked). In this process:
``load_recipe``, ``validate`` at the world size, the preflight and the plan (with the
not-fit remedies it tries) read the HF config once. In a child process: a whole launch of
``launch/pretrain_psft.py`` (recipe checks, preflight, the model and its reference model built,
two steps trained) reads it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from psft_megatron.checkpoint.model_checkpoint import model_config_of
from psft_megatron.config.load import ConfigError
from psft_megatron.model.config import ModelConfig
from psft_megatron.plan import GPUS, check_fits, plan_recipe
from psft_megatron.preflight import preflight
from psft_megatron.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

_recording: list[list[str]] = []  # one list of opened paths per active _opens_of block


def _audit(event: str, args: tuple) -> None:
    if _recording and event == "open" and isinstance(args[0], (str, os.PathLike)):
        for opened in _recording:
            opened.append(os.fspath(args[0]))


_hook_installed = False


@contextlib.contextmanager
def _opens_of(path: str | Path) -> Iterator[list[int]]:
    """Yield a one-item list that holds, on exit, how many times ``path`` was opened inside the block."""
    global _hook_installed
    if not _hook_installed:  # an audit hook cannot be removed: one per process, idle unless recording
        sys.addaudithook(_audit)
        _hook_installed = True
    count, opened = [0], []
    _recording.append(opened)
    try:
        yield count
    finally:
        _recording[:] = [r for r in _recording if r is not opened]
        count[0] = sum(os.path.realpath(p) == os.path.realpath(path) for p in opened)


def _tiny_hf_config(folder: Path, **changes) -> Path:
    """The tiny recipe's architecture as transformers writes a Llama config.json."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    LlamaConfig(**{**fields, **changes}).save_pretrained(folder)
    return folder / "config.json"


def _recipe_file(tmp_path: Path, recipe: dict, hf_folder: Path) -> Path:
    recipe["model"] = {"hf_config": str(hf_folder), "params_dtype": "fp32", "transformer_impl": "local"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_a_resolved_config_reads_nothing(tmp_path):
    config_json = _tiny_hf_config(tmp_path / "hf")
    with _opens_of(config_json) as opens:
        resolved = ModelConfig(hf_config=str(tmp_path / "hf"), num_layers=2).resolve()
    assert opens[0] == 1 and resolved.resolved and (resolved.num_layers, resolved.hidden_size) == (2, 64)
    config_json.unlink()  # resolving again, or a checkpoint's saved (resolved) config, needs no file
    with _opens_of(config_json) as opens:
        assert resolved.resolve() == resolved
        assert model_config_of({"model": resolved.to_dict()}) == resolved
    assert opens[0] == 0
    assert "resolved" not in resolved.to_dict()  # derived state, not a recipe key
    with pytest.raises(FileNotFoundError):  # a copy is a new, unresolved config
        dataclasses.replace(resolved).resolve()


def test_checks_preflight_and_plan_read_the_hf_config_once(tmp_path, tiny):
    config_json = _tiny_hf_config(tmp_path / "hf")
    path = _recipe_file(tmp_path, tiny(), tmp_path / "hf")
    with _opens_of(config_json) as opens:
        recipe = load_recipe(path)  # validates
        recipe.validate(1)
        preflight(recipe)
        recipe.validate_for_device(False)
        plan_recipe(recipe, 1, GPUS["h100-80gb"], device="cpu")
        model = recipe.resolved_model
    assert opens[0] == 1
    assert recipe.model.num_layers == 0 and model.num_layers == 4  # the section keeps what the recipe says
    # A later edit of the section shows without a read; a new hf_config path is read.
    recipe.model.num_layers = 2
    other = _tiny_hf_config(tmp_path / "other", hidden_size=128)
    with _opens_of(config_json) as opens, _opens_of(other) as other_opens:
        assert recipe.resolved_model.num_layers == 2 and recipe.resolved_model.hidden_size == 64
        recipe.model.hf_config = str(tmp_path / "other")
        assert (recipe.resolved_model.hidden_size, recipe.resolved_model.num_layers) == (128, 2)
    assert (opens[0], other_opens[0]) == (0, 1)


def test_a_refused_plan_reads_the_hf_config_once(monkeypatch):
    """--plan's remedies are copies of the recipe: they keep what was read."""
    monkeypatch.chdir(ROOT)  # the recipe names recipes/hf_configs/... relative to the repository
    no_recompute = ["model.recompute_granularity=null", "model.recompute_method=null", "model.recompute_num_layers=null"]
    with _opens_of(ROOT / "recipes" / "hf_configs" / "llama-3.1-70b-instruct.json") as opens:
        recipe = load_recipe(ROOT / "recipes" / "70b_math.yaml", no_recompute)
        recipe.validate(64)
        plan = plan_recipe(recipe, 64, GPUS["h100-80gb"])
        with pytest.raises(ConfigError, match="then it fits"):
            check_fits(plan, recipe)
    assert opens[0] == 1


# The launcher as a user runs it, in a fresh interpreter with an audit hook counting the opens.
_DRIVER = """
import atexit, os, runpy, sys
target, launcher = os.path.realpath(sys.argv[1]), sys.argv[2]
opened = []
sys.addaudithook(lambda event, args: opened.append(os.fspath(args[0]))
                 if event == "open" and isinstance(args[0], (str, os.PathLike)) else None)
atexit.register(lambda: print("HF_CONFIG_OPENS", sum(os.path.realpath(p) == target for p in opened), file=sys.stderr))
sys.argv = [launcher, *sys.argv[3:]]
runpy.run_path(launcher, run_name="__main__")
"""


@pytest.mark.slow
def test_a_launch_reads_the_hf_config_once(tmp_path, tiny):
    config_json = _tiny_hf_config(tmp_path / "hf")
    # sft_kl: the reference model is built too, from the same resolved config.
    recipe = tiny(training={"train_steps": 2, "sft_warmup_steps": 0}, loss={"name": "sft_kl", "kl_beta": 0.1})
    recipe["data"]["eval"] = []
    path = _recipe_file(tmp_path, recipe, tmp_path / "hf")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(config_json), str(ROOT / "launch" / "pretrain_psft.py"),
                           str(path)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2, metrics
    assert "HF_CONFIG_OPENS 1" in done.stderr.splitlines(), done.stderr[-3000:]
