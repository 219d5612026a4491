"""GPU-only checks (skipped without CUDA): bf16 training from a converted checkpoint.

Written in a session without a GPU; the first session with one should run it
(`python -m pytest -q tests/test_gpu.py`) before trusting bf16 runs.

- init_from must reach megatron's fp32 main params: bf16 runs keep fp32 copies of the
  weights, made when the optimizer is built. With a learning rate far below bf16
  resolution, the weights after training must still be the init_from weights (had
  the optimizer copied a random init instead, step 1 would overwrite them).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from psft_megatron.data.synthetic import write_tiny_dataset
from psft_megatron.testing.multiproc import run_in_processes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _recipe(data: Path, tmp: Path) -> dict:
    return {
        "model": {"num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 256, "num_attention_heads": 4,
                  "num_query_groups": 2, "vocab_size": 384, "max_position_embeddings": 128,
                  "params_dtype": "bf16", "transformer_impl": "auto"},
        "training": {"seq_length": 128, "global_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 2,
                     "train_steps": 4, "seed": 5},
        "optimizer": {"lr": 1e-12, "min_lr": 0.0, "weight_decay": 0.0},
        "data": {"train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": 128}],
                 "tokenizer": str(data / "tokenizer"), "chat_template": "plain", "cache_dir": str(data / "cache")},
        "checkpoint": {"init_from": str(tmp / "init"), "save_at_end": True},
        "logging": {"run_dir": str(tmp / "run"), "tensorboard": False},
    }


def _weights(chunks: list) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for c in chunks for k, v in c.state_dict().items() if "_extra_state" not in k}


def bf16_init_from(recipe_dict: dict) -> float:
    from psft_megatron.checkpoint.model_checkpoint import load_model_checkpoint, save_model_checkpoint
    from psft_megatron.config.recipe import recipe_from_dict
    from psft_megatron.model.build import build_model
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed
    from psft_megatron.training.loop import train

    env = init_distributed()
    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    init_model_parallel(recipe.parallel)
    set_seed(99)  # the "pretrained" weights: another seed than the training run's init
    pretrained = build_model(recipe.model, recipe.parallel).chunks
    save_model_checkpoint(pretrained, recipe.checkpoint.init_from, {"model": recipe.model.resolve(), "step": 0})
    set_seed(recipe.training.seed)
    result = train(recipe, env)
    trained = build_model(recipe.model, recipe.parallel).chunks
    load_model_checkpoint(trained, result.last_checkpoint)
    before, after = _weights(pretrained), _weights(trained)
    return max(float((before[k] - after[k]).abs().max()) for k in before)


def test_bf16_init_from_survives_the_first_optimizer_steps(tmp_path):
    write_tiny_dataset(tmp_path / "data", train=200, eval=8)
    diff = run_in_processes(
        bf16_init_from, 1, kwargs={"recipe_dict": _recipe(tmp_path / "data", tmp_path)},
        env={"PSFT_DIST_BACKEND": "nccl"}, timeout=600,
    )[0]
    assert diff == 0.0
