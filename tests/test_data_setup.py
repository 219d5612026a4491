"""psft_megatron/training/data_setup.py in a launched process: the held-out rows the evaluator scores do
not follow training.seed (runs that differ only in seed are scored on the same rows), while the
training order does."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import tiny_recipe

pytestmark = pytest.mark.slow  # a launched process (megatron's import)


def _data_of_each(recipes: dict[str, dict]) -> dict[str, Any]:
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel
    from psft_megatron.training.data_setup import build_data

    env = init_distributed()
    built = {name: recipe_from_dict(copy.deepcopy(d)) for name, d in recipes.items()}
    init_model_parallel(next(iter(built.values())).parallel)  # one layout (TP=PP=DP=1) for all
    out = {}
    for name, r in built.items():
        data = build_data(r.data, r.training, r.parallel, env)
        out[name] = {"eval": [(mb.tokens.numpy(), mb.loss_mask.numpy()) for mb in data.eval_micro_batches(5)],
                     "train": data.loader.epoch_order(0)}
    return out


def test_held_out_rows_are_the_same_for_every_seed(tiny_data, tmp_path):
    recipes = {f"seed{s}": tiny_recipe(tiny_data, tmp_path / f"seed{s}", training={"seed": s}) for s in (7, 8)}
    got = run_in_processes(_data_of_each, 1, kwargs={"recipes": recipes}, init_process_group=False, timeout=200)[0]
    a, b = got["seed7"], got["seed8"]
    assert not np.array_equal(a["train"], b["train"]), "the seed must still order the training rows"
    assert len(a["eval"]) == len(b["eval"]) >= 2
    for (ta, ma), (tb, mb) in zip(a["eval"], b["eval"]):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ma, mb)
        assert ma.sum() > 0
