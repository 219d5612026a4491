"""Loaders, document mappings and metrics the psft_* lm-eval tasks name with ``!function utils.NAME``.

lm-eval resolves ``!function utils.NAME`` to the file ``utils.py`` next to the task YAML; the
rendered task folder holds a one-line ``utils.py`` that re-exports this module, so there is one
copy of the code.

Why custom CSV loaders instead of ``dataset_path: csv``: the HF csv builder goes through pandas,
which turns MMLU cells spelled ``None`` into nulls (10 cells in MMLU's test split) and would type
an all-numeric column as numbers (``0.50`` -> ``0.5``); the ``csv`` module keeps every cell the
exact string of the file, and the loaders build the ``choices`` / MC target lists lm-eval needs.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from psft_megatron.evaluation.math_answers import distinct_answers, mean_and_pass

__all__ = [
    "docs_asdiv",
    "docs_gsm8k",
    "docs_input_target",
    "docs_math500",
    "docs_problem_answer",
    "docs_svamp",
    "load_mmlu",
    "load_truthfulqa",
    "process_results_math",
    "process_results_mc2",
]


# ---------------------------------------------------------------- loaders (custom_dataset)
# lm-eval calls custom_dataset(**metadata, **dataset_kwargs) and expects a dict of splits.


def load_mmlu(*, data_dir: str, subject: str, **_: Any) -> dict[str, datasets.Dataset]:
    """MMLU ``{data_dir}/{dev,test}/{subject}_{split}.csv`` (question, choice0..3, answer 0-3), as lm-eval's
    ``cais/mmlu`` docs: ``question``, ``subject``, ``choices``, ``answer``."""
    out = {}
    for split in ("dev", "test"):
        path = Path(data_dir) / split / f"{subject}_{split}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"MMLU file not found: {path}")
        with path.open(encoding="utf-8", newline="") as f:
            rows = [
                {"question": r["question"], "subject": subject,
                 "choices": [r["choice0"], r["choice1"], r["choice2"], r["choice3"]], "answer": int(r["answer"])}
                for r in csv.DictReader(f)
            ]
        out[split] = datasets.Dataset.from_list(rows)
    return out


def _split_answers(cell: str) -> list[str]:
    return [a.strip() for a in cell.split(";") if a.strip()]


def _with_period(s: str) -> str:
    # TruthfulQA's multiple-choice set (mc_task.json, HF config `multiple_choice`) ends every answer with a period.
    return s if s.endswith(".") else s + "."


def load_truthfulqa(*, path: str, **_: Any) -> dict[str, datasets.Dataset]:
    """``TruthfulQA.csv`` -> docs with ``mc1_targets`` / ``mc2_targets`` shaped like the HF ``multiple_choice`` config.

    MC1: the Best Answer (label 1) then the Incorrect Answers (label 0). MC2: the Correct Answers
    (the Best Answer first if absent) then the Incorrect Answers. The CSV is the revised TruthfulQA
    (813 questions, current answer texts), so scores compare between runs of this task, not with
    published ``truthfulqa_mc1`` numbers (817 questions from mc_task.json).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TruthfulQA file not found: {p}")
    rows = []
    with p.open(encoding="utf-8-sig", newline="") as f:  # the file starts with a byte-order mark
        for r in csv.DictReader(f):
            best = _with_period(r["Best Answer"].strip())
            correct = [_with_period(a) for a in _split_answers(r["Correct Answers"])]
            incorrect = [_with_period(a) for a in _split_answers(r["Incorrect Answers"])]
            if best not in correct:
                correct = [best] + correct
            rows.append({
                "question": r["Question"].strip(),
                "category": r["Category"],
                "mc1_targets": {"choices": [best] + incorrect, "labels": [1] + [0] * len(incorrect)},
                "mc2_targets": {"choices": correct + incorrect, "labels": [1] * len(correct) + [0] * len(incorrect)},
            })
    return {"validation": datasets.Dataset.from_list(rows)}


# ---------------------------------------------------------------- docs -> {"problem", "answer"}
# Every math generation task is mapped to one shape so one process_results serves all.

_UNIT_SUFFIX = re.compile(r"\s*\([^()]*\)\s*$")  # asdiv: "9 (apples)" -> "9"
_NUMERIC = re.compile(r"^-?[\d,]*\.?\d+(e-?\d+)?$")


def docs_gsm8k(ds: datasets.Dataset) -> datasets.Dataset:
    """GSM8K: the answer is what follows the last ``####``, thousands commas removed."""
    return ds.map(lambda d: {"problem": d["question"], "answer": d["answer"].split("####")[-1].strip().replace(",", "")})


def docs_math500(ds: datasets.Dataset) -> datasets.Dataset:
    """MATH500: ``problem`` / ``answer`` (the boxed answer of the solution)."""
    return ds.map(lambda d: {"problem": d["problem"], "answer": d["answer"]})


def docs_svamp(ds: datasets.Dataset) -> datasets.Dataset:
    """SVAMP: ``Body`` + ``Question`` / ``Answer``."""
    return ds.map(lambda d: {"problem": f'{d["Body"].strip()} {d["Question"].strip()}', "answer": str(d["Answer"])})


def docs_asdiv(ds: datasets.Dataset) -> datasets.Dataset:
    """ASDiv: ``body`` + ``question``; the unit in parentheses is dropped, and the non-numeric answers
    (names, yes/no, times: 131 of 2215) are left out because math-verify cannot judge them."""
    ds = ds.map(lambda d: {"problem": f'{d["body"].strip()} {d["question"].strip()}',
                           "answer": _UNIT_SUFFIX.sub("", d["answer"]).strip()})
    return ds.filter(lambda d: bool(_NUMERIC.match(d["answer"])))


def docs_input_target(ds: datasets.Dataset) -> datasets.Dataset:
    """GSM-Hard, MAWPS: ``input`` / ``target``."""
    return ds.map(lambda d: {"problem": d["input"], "answer": str(d["target"])})


def docs_problem_answer(ds: datasets.Dataset) -> datasets.Dataset:
    """AIME24, AMC23: ``problem`` / ``answer``."""
    return ds.map(lambda d: {"problem": d["problem"], "answer": str(d["answer"])})


# ---------------------------------------------------------------- metrics


def process_results_math(doc: dict[str, Any], results: list[Any]) -> dict[str, float]:
    """math-verify scoring of one problem. ``results[0]`` is one generation (greedy) or the list of
    ``n`` samples (``repeats: n`` with a ``take_first_k`` filter). ``acc`` = mean@n (accuracy for
    n = 1), ``pass_at_n`` = 1 if any sample is correct, ``distinct_answers`` = how many different
    final answers the n samples give (1 for greedy)."""
    gens = results[0] if isinstance(results[0], list) else [results[0]]
    mean, passed = mean_and_pass(doc["answer"], gens)
    return {"acc": mean, "pass_at_n": passed, "distinct_answers": float(distinct_answers(gens))}


def process_results_mc2(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """Normalised probability mass on the true answers (lm-eval's ``truthfulqa`` ``process_results_mc2``)."""
    ll = np.array([r[0] for r in results])
    probs = np.exp(ll)
    probs = probs / probs.sum()
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": float(probs[labels == 1].sum())}
