"""``training.eval_tasks``: what a recipe may ask for, checked before anything is built (quick, no
processes), and the interleaved-pipeline grouping of scoring batches.

The scoring itself (at PP=2 against PP=1 and float64 ``transformers``, and through the trainer
against lm-eval's ``hf`` backend) is in tests/test_eval_tasks_training.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from psft_megatron.config.load import ConfigError
from psft_megatron.evaluation.scoring import batch_groups
from psft_megatron.preflight import _check_eval_tasks
from psft_megatron.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_cpu.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data"


def _load(*overrides: str):
    return load_recipe(TINY, list(overrides))


def test_tasks_accepted_and_resolved():
    r = _load("training.eval_tasks=[mmlu_anatomy, psft_truthfulqa_mc1]", "training.eval_tasks_data_root=../shared/data",
              "training.eval_tasks_limit=5")
    assert r.training.eval_tasks == ["mmlu_anatomy", "psft_truthfulqa_mc1"]
    assert r.training.eval_tasks_limit == 5 and r.training.eval_tasks_batch_size == 8
    # Tasks alone are something to evaluate: no held-out split needed.
    r = _load("data.eval=[]", "training.eval_tasks=[truthfulqa_mc1]", "training.eval_tasks_data_root=d")
    assert r.training.eval_interval == 32


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["training.eval_tasks=[mmlu_anatomy, gsm8k]"],
         r"training.eval_tasks lists generation tasks \(gsm8k\), which do not run during training .* psft-evaluate"),
        (["training.eval_tasks=[mmlu_anatomy, math_ood]"], r"training.eval_tasks lists generation tasks \(svamp, asdiv, gsm_hard, mawps, amc23, aime24\)"),
        (["training.eval_tasks=[hellaswag]"], r"training.eval_tasks names an unknown task 'hellaswag'; known: .*truthfulqa_mc1"),
        (["training.eval_tasks=[mmlu]", "training.eval_interval=0"],
         r"training.eval_tasks are set but nothing is evaluated: set training.eval_interval"),
        (["training.eval_tasks=[mmlu]", "training.eval_tasks_data_root=null"],
         r"training.eval_tasks_data_root must name the tasks' data folder"),
        (["training.eval_tasks=[mmlu]", "training.eval_tasks_limit=0"], r"training.eval_tasks_limit must be >= 1 or null"),
        (["training.eval_tasks=[mmlu]", "training.eval_tasks_batch_size=0"], r"training.eval_tasks_batch_size must be >= 1"),
        (["training.eval_tasks=[mmlu]", "parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=1",
          "parallel.sequence_parallel=false"],
         r"training.eval_tasks cannot be scored with parallel.context_parallel_size > 1"),
        (["training.eval_tasks=[mmlu]", "data.eval=[]", "training.eval_kl_to_start=true"],
         r"training.eval_kl_to_start is true but data.eval lists no held-out source"),
    ],
)
def test_bad_task_settings_fail_up_front(overrides, expected):
    base = ["training.eval_tasks_data_root=../shared/data"]
    with pytest.raises(ConfigError, match=r"^command-line override: " + expected):
        _load(*base, *overrides)


def test_preflight_checks_the_task_data(tmp_path):
    r = _load("training.eval_tasks=[mmlu_anatomy]", f"training.eval_tasks_data_root={tmp_path}")
    with pytest.raises(ConfigError, match=r"training.eval_tasks_data_root \(.*\) lacks data training.eval_tasks need: .*ood/mmlu/dev: folder not found \(lay it out"):
        _check_eval_tasks(r)
    if not (SHARED_DATA / "ood" / "mmlu").is_dir():
        pytest.skip("needs ../shared/data")
    _check_eval_tasks(_load("training.eval_tasks=[mmlu_anatomy, truthfulqa_mc2]",
                            f"training.eval_tasks_data_root={SHARED_DATA}"))


def test_filled_groups_for_the_interleaved_schedule():
    """Five batches of 2 at PP=2: three groups; filled, the last holds an all-filler micro-batch."""
    seqs = [[1] * n for n in (9, 8, 7, 6, 5, 4, 3, 2, 1)]
    order = list(range(len(seqs)))
    plain = batch_groups(seqs, order, batch_size=2, per_group=2, pad_id=0)
    filled = batch_groups(seqs, order, batch_size=2, per_group=2, pad_id=0, fill=True)
    assert [len(g.microbatches) for g in plain] == [2, 2, 1]
    assert [len(g.microbatches) for g in filled] == [2, 2, 2]
    last = filled[-1].microbatches
    assert last[0]["rows"].tolist() == [8, -1]  # the ninth item and one filler row
    assert last[1]["rows"].tolist() == [-1, -1]  # the topped-up micro-batch
    assert last[1]["input_ids"].shape == last[0]["input_ids"].shape
    # Every real item is scored exactly once either way.
    rows = [r for g in filled for mb in g.microbatches for r in mb["rows"].tolist() if r >= 0]
    assert sorted(rows) == order


def test_lm_eval_seeding_leaves_the_global_generators_as_they_were():
    """lm-eval seeds Python's, NumPy's and torch's global generators on rank 0; the training
    stream after an evaluation must be the one it would have been without it."""
    import random

    import numpy as np
    import torch

    from psft_megatron.evaluation.training_tasks import _rng_kept

    def draws() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    want = draws()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with _rng_kept():
        random.seed(1234), np.random.seed(1234), torch.manual_seed(1234)  # what simple_evaluate does
        inside = draws()
    assert draws() == want and inside != want
