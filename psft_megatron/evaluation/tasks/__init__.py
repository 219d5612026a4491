"""lm-eval task configs for psft, rendered at run time from package templates into ``OUT/tasks``.

lm-eval task YAML has no variables, so the user's data paths are written into task files at
run time (:func:`render_tasks`), next to the results: a reader sees the exact tasks that
ran and can rerun them with the ``lm_eval`` CLI (``--include_path OUT/tasks``). They load with
``TaskManager(include_path=OUT/tasks, include_defaults=False)`` (0.5 s instead of lm-eval's
44 s index of its 14,818 built-in names). Names carry a ``psft_`` prefix so they never clash
with lm-eval's own ``gsm8k`` / ``mmlu``; users give them without it.

Tasks (the data key each reads, and its file under ``--data-root``):

| name | kind | data | default path under the data root |
| --- | --- | --- | --- |
| gsm8k | generation, math-verify | gsm8k | gsm8k/test.jsonl |
| math500 | generation, math-verify | math500 | math/math500_test.jsonl |
| svamp, asdiv, gsm_hard, mawps, amc23, aime24 (``math_ood`` = all six) | generation, math-verify | same | ood/math_ood/NAME_test.jsonl |
| mmlu, mmlu_5shot (or one subject: mmlu_anatomy, mmlu_5shot_anatomy) | log-likelihood | mmlu | ood/mmlu (dev/ and test/ CSVs) |
| truthfulqa_mc1, truthfulqa_mc2 | log-likelihood | truthfulqa | ood/TruthfulQA.csv |

A math set's data may also be a ``datasets`` hub name (``openai/gsm8k:main``: name, then config).
Generation settings: greedy (``acc`` = accuracy), and with ``Sampling(n > 1)`` a second task
``NAME_nN`` that draws n samples per problem at the given temperature/top_p and reports
``acc`` = mean@n and ``pass_at_n``.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from psft_megatron.evaluation.inputs import EvalInputError

__all__ = ["MATH_SETS", "OOD_MATH", "RenderedTasks", "Sampling", "data_keys", "default_paths", "render_tasks",
           "resolve_task_names"]

TEMPLATES = Path(__file__).resolve().parent
PREFIX = "psft_"
BOXED = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class MathSet:
    path: str  # default file under the data root
    docs: str  # utils function mapping the file's records to {"problem", "answer"}
    boxed: bool  # add the "put your final answer within \boxed{}" instruction


MATH_SETS = {
    "gsm8k": MathSet("gsm8k/test.jsonl", "docs_gsm8k", False),
    "math500": MathSet("math/math500_test.jsonl", "docs_math500", True),
    "svamp": MathSet("ood/math_ood/svamp_test.jsonl", "docs_svamp", False),
    "asdiv": MathSet("ood/math_ood/asdiv_test.jsonl", "docs_asdiv", False),
    "gsm_hard": MathSet("ood/math_ood/gsm_hard_test.jsonl", "docs_input_target", False),
    "mawps": MathSet("ood/math_ood/mawps_test.jsonl", "docs_input_target", False),
    "amc23": MathSet("ood/math_ood/amc23_test.jsonl", "docs_problem_answer", True),
    "aime24": MathSet("ood/math_ood/aime24_test.jsonl", "docs_problem_answer", True),
}
OOD_MATH = ("svamp", "asdiv", "gsm_hard", "mawps", "amc23", "aime24")
LOGLIK_PATHS = {"mmlu": "ood/mmlu", "truthfulqa": "ood/TruthfulQA.csv"}
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class Sampling:
    """Sampled generation (the paper's mean@n / pass@n); n = 1 means greedy only."""

    n: int = 1
    temperature: float = 0.6
    top_p: float = 0.95


@dataclass
class RenderedTasks:
    folder: Path
    loglik: list[str] = field(default_factory=list)  # lm-eval task/group names, scored by log-likelihood
    generate: list[str] = field(default_factory=list)  # lm-eval task names, scored on generations


def resolve_task_names(spec: str | list[str]) -> list[str]:
    """``"gsm8k,math_ood,mmlu"`` -> known short names, aliases expanded, order kept; unknown ones raise."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    out: list[str] = []
    for n in names:
        n = n.removeprefix(PREFIX)
        expanded = list(OOD_MATH) if n == "math_ood" else [n]
        for e in expanded:
            if data_key(e) is None:
                known = sorted(MATH_SETS) + ["math_ood", "mmlu", "mmlu_5shot", "mmlu_SUBJECT", "mmlu_5shot_SUBJECT",
                                             "truthfulqa_mc1", "truthfulqa_mc2"]
                raise EvalInputError(f"unknown task {n!r} (--tasks); known: {', '.join(known)}")
            if e not in out:
                out.append(e)
    if not out:
        raise EvalInputError("no task given (--tasks)")
    return out


def data_key(name: str) -> str | None:
    """Which data a task reads (``mmlu``, ``truthfulqa`` or the math set's name); None if unknown."""
    if name in MATH_SETS:
        return name
    if name == "mmlu" or name.startswith("mmlu_"):
        return "mmlu"
    if name in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return "truthfulqa"
    return None


def data_keys(names: list[str]) -> list[str]:
    """The data keys the tasks need, in order."""
    return list(dict.fromkeys(data_key(n) for n in names))  # type: ignore[arg-type]


def default_paths(root: str | Path) -> dict[str, str]:
    """Every data key's path under a data root laid out like ``../shared/data``."""
    root = Path(root)
    paths = {k: str(root / s.path) for k, s in MATH_SETS.items()}
    paths.update({k: str(root / p) for k, p in LOGLIK_PATHS.items()})
    return paths


def check_data(names: list[str], paths: dict[str, str], option: str = "--data") -> dict[str, str]:
    """The path of every data key the tasks need, checked to exist (hub names pass); raises :class:`EvalInputError`."""
    out = {}
    for key in data_keys(names):
        value = paths.get(key)
        if not value:
            raise EvalInputError(f"task data {key!r} has no path: pass {option} {key}=PATH or --data-root DIR")
        p = Path(value)
        if key == "mmlu":
            for split in ("dev", "test"):
                if not (p / split).is_dir():
                    raise EvalInputError(f"{p / split}: folder not found (MMLU data for {option} mmlu=DIR needs dev/ and test/)")
        elif not p.exists() and not (key in MATH_SETS and _HUB_NAME.match(value)):
            raise EvalInputError(f"{p}: file not found ({option} {key}=PATH)")
        elif p.is_dir():
            raise EvalInputError(f"{p} is a folder: {option} {key}=PATH needs a file")
        out[key] = value
    return out


def _mmlu_subjects(data_dir: Path) -> list[str]:
    subjects = sorted(p.name[: -len("_test.csv")] for p in (data_dir / "test").glob("*_test.csv"))
    if not subjects:
        raise EvalInputError(f"{data_dir / 'test'} holds no SUBJECT_test.csv files (MMLU data)")
    return subjects


def _dump(path: Path, config: dict, functions: dict[str, str] | None = None) -> None:
    """Write a task YAML; ``functions`` become ``key: !function utils.NAME`` lines (yaml.safe_dump cannot tag)."""
    text = yaml.safe_dump(config, sort_keys=False, width=1000, allow_unicode=True)
    for key, fn in (functions or {}).items():
        text += f"{key}: !function utils.{fn}\n"
    path.write_text(text)


def _math_task(folder: Path, name: str, value: str, max_gen_toks: int, sampling: Sampling | None) -> str:
    spec = MATH_SETS[name]
    task = PREFIX + name + (f"_n{sampling.n}" if sampling else "")
    gen: dict = {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}
    cfg: dict = {"include": "_psft_math_gen_template", "task": task, "tag": ["psft_math"]}
    if Path(value).exists():
        cfg.update(dataset_path="json", dataset_kwargs={"data_files": {"test": str(Path(value).resolve())}})
    else:  # a hub name, "org/name" or "org/name:config"
        hub, _, config = value.partition(":")
        cfg["dataset_path"] = hub
        if config:
            cfg["dataset_name"] = config
    cfg["doc_to_text"] = "{{problem}}" + (BOXED if spec.boxed else "")
    if sampling:
        # n samples per problem: lm-eval sends the request n times; the filter keeps all n for process_results.
        gen.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        cfg["repeats"] = sampling.n
        cfg["filter_list"] = [{"name": f"n{sampling.n}", "filter": [{"function": "take_first_k", "k": sampling.n}]}]
    cfg["generation_kwargs"] = gen
    _dump(folder / f"{task}.yaml", cfg, {"process_docs": spec.docs})
    return task


def _mmlu_tasks(folder: Path, data_dir: Path) -> set[str]:
    """Subject tasks, category groups and the whole-MMLU group, 0-shot and 5-shot (names without prefix)."""
    try:  # lm-eval's own subject -> category map (stem, humanities, social_sciences, other)
        from lm_eval.tasks.mmlu._generate_configs import SUBJECTS as categories
    except ImportError:  # a future lm-eval that moves it: no category groups, the whole-MMLU group still works
        categories = {}
    names: set[str] = set()
    agg = [{"metric": "acc", "weight_by_size": True}]
    for shots, suffix in ((0, ""), (5, "_5shot")):
        groups: dict[str, list[str]] = {}
        for s in _mmlu_subjects(data_dir):
            task = f"{PREFIX}mmlu{suffix}_{s}"
            groups.setdefault(categories.get(s, "other"), []).append(task)
            _dump(folder / f"{task}.yaml", {
                "include": "_psft_mmlu_template", "task": task, "task_alias": s, "num_fewshot": shots,
                "dataset_kwargs": {"data_dir": str(data_dir.resolve()), "subject": s},
                "description": f"The following are multiple choice questions (with answers) about {' '.join(s.split('_'))}.\n\n",
            })
            names.add(task.removeprefix(PREFIX))
        for cat, tasks in groups.items():
            _dump(folder / f"{PREFIX}mmlu{suffix}_{cat}.yaml", {
                "group": f"{PREFIX}mmlu{suffix}_{cat}", "group_alias": cat, "task": tasks,
                "aggregate_metric_list": agg, "metadata": {"version": 1.0}})
            names.add(f"mmlu{suffix}_{cat}")
        _dump(folder / f"{PREFIX}mmlu{suffix}.yaml", {
            "group": f"{PREFIX}mmlu{suffix}", "task": [f"{PREFIX}mmlu{suffix}_{c}" for c in sorted(groups)],
            "aggregate_metric_list": agg, "metadata": {"version": 1.0}})
        names.add(f"mmlu{suffix}")
    return names


def render_tasks(out_dir: str | Path, names: list[str], paths: dict[str, str], *, max_gen_toks: int = 512,
                 sampling: Sampling | None = None) -> RenderedTasks:
    """Write the task files for ``names`` (short names, :func:`resolve_task_names`) into ``out_dir``
    (replaced), reading the data ``paths`` (:func:`check_data`). Returns the lm-eval names to run."""
    folder = Path(out_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for template in TEMPLATES.glob("_psft_*"):
        shutil.copy2(template, folder / template.name)
    # lm-eval imports `!function utils.X` from the file next to the YAML: re-export the package module.
    (folder / "utils.py").write_text("from psft_megatron.evaluation.tasks.utils import *  # noqa: F401,F403\n")
    out = RenderedTasks(folder)
    sampled = sampling if sampling is not None and sampling.n > 1 else None
    available: set[str] = set()
    if "mmlu" in data_keys(names):
        available |= _mmlu_tasks(folder, Path(paths["mmlu"]))
    for name in names:
        key = data_key(name)
        if key in MATH_SETS:
            out.generate.append(_math_task(folder, name, paths[key], max_gen_toks, None))
            if sampled:
                out.generate.append(_math_task(folder, name, paths[key], max_gen_toks, sampled))
        elif key == "truthfulqa":
            cfg = {"include": "_psft_truthfulqa_template", "task": PREFIX + name,
                   "dataset_kwargs": {"path": str(Path(paths[key]).resolve())}}
            cfg["doc_to_choice"] = "{{mc1_targets.choices}}" if name.endswith("mc1") else "{{mc2_targets.choices}}"
            _dump(folder / f"{PREFIX}{name}.yaml", cfg,
                  {"process_results": "process_results_mc2"} if name.endswith("mc2") else None)
            out.loglik.append(PREFIX + name)
        else:  # mmlu, mmlu_5shot, a category or one subject
            if name not in available:
                raise EvalInputError(f"unknown MMLU task {name!r} (--tasks): no such subject in {paths[key]}/test")
            out.loglik.append(PREFIX + name)
    return out
