"""lm-eval log-likelihood tasks during training (``training.eval_tasks``), and log-likelihood
scoring at PP > 1, in real processes on gloo, against independent references.

Three launches:

1. one process: a random 4-layer Llama with SmolLM2's vocabulary and tokenizer and tied embeddings
   (tied: at PP=2 the output layer on the last stage shares the first stage's embedding) is made
   with ``transformers`` and converted; then the references, all from ``transformers`` in float64
   or lm-eval's own ``hf`` backend: per-row sums of target log-probs and greedy flags for a set of
   scoring rows, and per-item log-likelihoods of MMLU (one subject) and TruthfulQA MC1 on the task
   files the trainer renders (the same package function, the same data);
2. two processes: (a) scoring rows with the pieces ``psft-evaluate`` uses (``load_scoring_model``,
   the driver, the Megatron scorer) at PP=2, PP=2 x VP=2 and PP=1 x DP=2; (b) the same model fine-tuned 4
   steps at PP=2 x VP=2 (the interleaved schedule: scoring groups topped up to PP micro-batches) and
   at TP=2 with ``eval_at_start`` and the two tasks every 4 steps, on GSM8K conversations, and a LoRA
   run at TP=2 the same way; (c) the ``psft-evaluate --pp 2`` command itself on the converted checkpoint;
3. one process: the LoRA run's final adapters merged into the base by peft, and lm-eval's ``hf``
   backend on that.

Checked: PP=2 (with and without VP) and PP=1 row scores equal each other and the float64 reference; ``psft-evaluate
--pp 2``'s per-item task log-likelihoods and both training layouts' at step 0 equal lm-eval's
``hf`` backend on the starting model, with identical accuracy; at step 4 the two layouts agree;
metrics.jsonl carries ``TASK/acc`` on the eval records, equal to lm-eval's results file of the
same step, and TensorBoard's ``eval/TASK/acc`` equals metrics.jsonl; the LoRA run's step-4 task scores
equal the ``hf`` backend's on peft's merge of its adapters.
"""

from __future__ import annotations

import copy
import glob
import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend

from lm_eval_reference import hf_backend_logliks, tiny_llama  # noqa: E402

from psft_megatron.testing.multiproc import run_in_processes  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "smollm2"
TASKS = ["mmlu_anatomy", "truthfulqa_mc1"]
LM_EVAL_TASKS = ["psft_" + t for t in TASKS]
LIMIT = 3
TOL = 1e-4  # per continuation token, as tests/test_evaluation_parity.py
STEPS = 4


def _rows() -> list[tuple[list[int], list[list[int]]]]:
    """Scoring rows of several lengths: four one-token targets sharing an input (MMLU-like) and
    multi-token continuations; 9 rows make 5 batches of 2, so PP=2 runs 3 groups, the last one short."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i, n in enumerate((37, 5, 22, 9, 30, 14, 3, 26, 18)):
        ids = torch.randint(0, 49152, (n,), generator=g).tolist()
        if i % 3 == 0:
            targets = [[ids[-1]]] + [[int(t)] for t in torch.randint(0, 49152, (3,), generator=g)]
        else:
            k = min(n, 1 + i % 4)
            targets = [ids[-k:]]
        rows.append((ids, targets))
    return rows


def prepare(root: str) -> dict[str, Any]:
    """Launch 1 (one process): the HF model, its conversion, and every reference."""
    from transformers import LlamaForCausalLM

    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron

    hf = tiny_llama(Path(root) / "hf", TOKENIZER, seed=1, layers=4, tied=True, max_positions=1024)
    convert_hf_to_megatron(hf, Path(root) / "mg")

    # Float64 row scores: sum of the targets' log-probs on the row's last len(target) predictions.
    m64 = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float64).eval()
    scores = []
    for ids, targets in _rows():
        with torch.no_grad():
            lp = torch.log_softmax(m64(torch.tensor([ids])).logits[0], -1)
        per_row = []
        for tgt in targets:
            pos = torch.arange(len(ids) - len(tgt), len(ids))
            t = torch.tensor(tgt)
            per_row.append((float(lp[pos, t].sum()), bool((lp[pos].argmax(-1) == t).all())))
        scores.append(per_row)

    return {"scores": scores, **hf_backend(str(hf), root)}


def hf_backend(hf: str, root: str) -> dict[str, Any]:
    """lm-eval's ``hf`` backend on the HF folder ``hf``, over the task files the trainer renders: per
    item the prompt and each choice's (log-likelihood, is_greedy, continuation tokens); the accuracy."""
    from psft_megatron.evaluation.tasks import check_data, default_paths, render_tasks

    tasks = render_tasks(Path(root) / "ref_tasks", TASKS, check_data(TASKS, default_paths(SHARED / "data")))
    return hf_backend_logliks(hf, str(tasks.folder), tasks.loglik, LIMIT)


def merged_reference(root: str, ckpt: str) -> dict[str, Any]:
    """Launch 3 (one process): the LoRA run's adapters exported for PEFT, merged into the transformers
    base by peft itself (``merge_and_unload``), saved with the tokenizer, and lm-eval's ``hf`` backend on it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psft_megatron.conversion.lora_export import export_peft_adapter

    hf, adapters, merged = Path(root) / "hf", Path(root) / "lora_peft", Path(root) / "lora_merged"
    export_peft_adapter(ckpt, adapters, dtype="float32", base_model=str(hf))
    base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapters).merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(hf).save_pretrained(merged)
    return hf_backend(str(merged), root)


def _score(ckpt: str, pp: int, vp: int | None = None) -> list[list[tuple[float, bool]]] | None:
    """The rows scored as psft-evaluate scores a checkpoint: loaded at PP=pp (x VP=vp: the
    interleaved schedule, as a trainer's chunks run it), driven from rank 0."""
    from psft_megatron.evaluation.driver import Driver
    from psft_megatron.evaluation.scoring import LOGLIK, MegatronScorer, loglik_handler
    from psft_megatron.evaluation.session import load_scoring_model
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed, teardown

    init_distributed()  # as psft-evaluate (evaluation/job.py): the CPU routes (cpu_compat) come with it
    parallel = ParallelConfig(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp)
    init_model_parallel(parallel)
    set_seed(0)  # megatron's model-parallel RNG tracker, which attention enters even in eval mode
    model = load_scoring_model(ckpt, parallel)
    driver = Driver({LOGLIK: loglik_handler(model, batch_size=2, pad_id=0)})
    out = None
    if driver.is_driver:
        try:
            out = MegatronScorer(driver, rows_per_call=4).score(_rows())  # several calls, as lm-eval makes
        finally:
            driver.stop()
    else:
        driver.serve()
    driver.close()
    teardown(destroy_process_group=False)
    return out


def train_and_score(root: str, recipes: dict[str, dict]) -> dict[str, Any]:
    """Launch 2 (two processes): scoring at PP=2 and PP=1 x DP=2, the training runs, then the
    ``psft-evaluate --pp 2`` command on the converted checkpoint (last: it tears the group down)."""
    from psft_megatron.cli.evaluate import main as psft_evaluate
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run

    out: dict[str, Any] = {"score_pp2": _score(f"{root}/mg", 2), "score_pp1_dp2": _score(f"{root}/mg", 1),
                           "score_pp2_vp2": _score(f"{root}/mg", 2, vp=2)}
    for name, r in recipes.items():
        result = run(recipe_from_dict(copy.deepcopy(r)))
        out[name] = {"records": result.records, "eval": result.eval_records,
                     "checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None}
    out["cli_status"] = psft_evaluate(["--ckpt", f"{root}/mg", "--pp", "2", "--tasks", ",".join(TASKS),
                                       "--data-root", str(SHARED / "data"), "--limit", str(LIMIT),
                                       "--batch-size", "2", "--out", f"{root}/cli_pp2"])
    return out


def _recipe(root: Path, name: str, parallel: dict, batch_size: int, lora: dict | None = None) -> dict:
    gsm8k = SHARED / "data" / "gsm8k"
    return {
        "model": {"hf_config": str(root / "hf"), "params_dtype": "fp32", "transformer_impl": "local",
                  **({"lora": lora} if lora else {})},
        "parallel": parallel,
        "training": {"seq_length": 256, "global_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 1,
                     "train_steps": STEPS, "seed": 7, "eval_interval": STEPS, "eval_at_start": True, "eval_rows": 2,
                     "eval_tasks": TASKS, "eval_tasks_data_root": str(SHARED / "data"), "eval_tasks_limit": LIMIT,
                     "eval_tasks_batch_size": batch_size},
        # LoRA: a larger lr, so that 4 steps from B = 0 move the task scores measurably
        "optimizer": {"lr": 3e-2 if lora else 1e-3, "lr_warmup_steps": 0, "weight_decay": 0.0},
        "loss": {"name": "psft"},
        "data": {"train": [{"path": str(gsm8k / "train.jsonl"), "adapter": "gsm8k", "limit": 24}],
                 "eval": [{"path": str(gsm8k / "test.jsonl"), "adapter": "gsm8k", "limit": 4}],
                 "tokenizer": str(TOKENIZER), "chat_template": None, "cache_dir": str(root / "cache")},
        "checkpoint": {"init_from": str(root / "mg"), "save_at_end": bool(lora)},
        "logging": {"run_dir": str(root / name), "tensorboard": name == "pp2_vp2", "progress_bar": False},
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    if not (TOKENIZER.is_dir() and (SHARED / "data" / "ood" / "mmlu").is_dir()):
        pytest.skip("needs ../shared (SmolLM2 tokenizer, GSM8K, MMLU and TruthfulQA data)")
    root = tmp_path_factory.mktemp("eval_tasks")
    refs = run_in_processes(prepare, 1, timeout=600, init_process_group=False, kwargs={"root": str(root)})[0]
    # Two batch sizes: the layouts' step-4 scores agree although they batch the rows differently.
    recipes = {"pp2_vp2": _recipe(root, "pp2_vp2", {"pipeline_model_parallel_size": 2,
                                                    "virtual_pipeline_model_parallel_size": 2}, batch_size=1),
               "tp2": _recipe(root, "tp2", {"tensor_model_parallel_size": 2}, batch_size=2),
               "lora_tp2": _recipe(root, "lora_tp2", {"tensor_model_parallel_size": 2}, batch_size=2,
                                   lora={"rank": 4, "alpha": 8.0})}
    ranks = run_in_processes(train_and_score, 2, timeout=900, kwargs={"root": str(root), "recipes": recipes})
    merged = run_in_processes(merged_reference, 1, timeout=600, init_process_group=False,
                              kwargs={"root": str(root), "ckpt": ranks[0]["lora_tp2"]["checkpoint"]})[0]
    return {"root": root, "refs": refs, "rank0": ranks[0], "last": ranks[-1], "lora_merged": merged}


@pytest.mark.parametrize("layout", ["score_pp2", "score_pp2_vp2"])
def test_pp2_row_scores_equal_pp1_and_float64(runs, layout):
    """The scorer's calls hold 4, 4 and 1 rows in batches of 2: at PP=2 the last call is a pipeline
    group of one micro-batch (under VP=2 topped up with a filler micro-batch)."""
    want = runs["refs"]["scores"]
    pp2, pp1 = runs["rank0"][layout], runs["rank0"]["score_pp1_dp2"]
    assert len(pp2) == len(pp1) == len(want) == 9
    for i, (a, b, w) in enumerate(zip(pp2, pp1, want)):
        assert len(a) == len(b) == len(w)
        for (la, ga), (lb, gb), (lw, gw) in zip(a, b, w):
            n = len(_rows()[i][1][0])
            # The same model at two layouts, in fp32: the layouts batch the rows differently (other
            # padding lengths, so other matmul shapes), which changes the round-off, not the value.
            assert abs(la - lb) <= 2e-6 * max(abs(lw), n), (i, la, lb, abs(la - lb) / abs(lw))
            assert abs(la - lw) <= TOL * n, (i, la, lw)  # against float64 transformers
            assert ga == gb == gw, i


def _samples_in(folder: Path, task: str) -> dict[int, dict[str, Any]]:
    """lm-eval's per-item records of ``task`` in an EvaluationTracker folder, by doc_id."""
    (path,) = glob.glob(str(folder / "*" / f"samples_{task}_*.jsonl"))
    return {d["doc_id"]: d for d in map(json.loads, open(path))}


def _samples(run_dir: Path, step: int, task: str) -> dict[int, dict[str, Any]]:
    return _samples_in(run_dir / "eval_tasks" / f"step_{step:06d}", task)


def _logliks(doc: dict[str, Any]) -> list[tuple[float, bool]]:
    return [(float(ll), greedy == "True") for ((ll, greedy),) in doc["resps"]]


def _assert_match_hf_backend(want_docs: dict[str, Any], samples: Any, what: str) -> None:
    """Per item: the prompt, and each choice's log-likelihood (within TOL per continuation token)
    and is_greedy, against lm-eval's ``hf`` backend on the same task files."""
    for task in LM_EVAL_TASKS:
        want = want_docs[task]
        got = samples(task)
        assert sorted(got) == sorted(want) == list(range(LIMIT))
        for doc_id, w in want.items():
            g = got[doc_id]
            assert g["arguments"]["gen_args_0"]["arg_0"] == w["prompt"]  # the same chat-template prompt
            for (gl, gg), (wl, wg, n) in zip(_logliks(g), w["resps"], strict=True):
                assert abs(gl - wl) <= TOL * n, (what, task, doc_id, gl, wl)
                assert gg == wg, (what, task, doc_id)


def test_psft_evaluate_pp2_matches_lm_eval_hf_backend(runs):
    """The command itself at --pp 2 (tools/evaluate.py --pp 2 = psft-evaluate --pp 2)."""
    assert runs["rank0"]["cli_status"] == 0
    out = runs["root"] / "cli_pp2"
    _assert_match_hf_backend(runs["refs"]["docs"], lambda task: _samples_in(out / "lm_eval", task), "cli_pp2")
    summary = json.loads((out / "summary.json").read_text())
    for task in TASKS:
        assert summary[f"{task}/acc"] == runs["refs"]["acc"]["psft_" + task]


@pytest.mark.parametrize("layout", ["pp2_vp2", "tp2", "lora_tp2"])
def test_step0_task_logliks_match_lm_eval_hf_backend(runs, layout):
    """At step 0 every run is the starting model (a LoRA run's B = 0: its base)."""
    run_dir = runs["root"] / layout
    _assert_match_hf_backend(runs["refs"]["docs"], lambda task: _samples(run_dir, 0, task), layout)
    first = runs["last"][layout]["eval"][0]
    assert first["step"] == 0
    for task in TASKS:
        assert first[f"{task}/acc"] == runs["refs"]["acc"]["psft_" + task]


def test_lora_task_scores_during_training_equal_its_peft_merge(runs):
    """A LoRA run (TP=2, adapters on every projection) scores the tasks with its adapters on: at step 4
    its per-item log-likelihoods and accuracy equal lm-eval's ``hf`` backend on the base with the same
    step's adapters merged by peft."""
    run_dir = runs["root"] / "lora_tp2"
    want = runs["lora_merged"]
    _assert_match_hf_backend(want["docs"], lambda task: _samples(run_dir, STEPS, task), "lora_tp2 step 4")
    last = runs["last"]["lora_tp2"]["eval"][-1]
    assert last["step"] == STEPS
    for task in TASKS:
        assert last[f"{task}/acc"] == want["acc"]["psft_" + task]
    moved = [abs(a[0] - b[0]) for t in LM_EVAL_TASKS for d in want["docs"][t]
             for a, b in zip(want["docs"][t][d]["resps"], runs["refs"]["docs"][t][d]["resps"])]
    assert max(moved) > 1e-2, "the adapters must have moved the scores for the comparison to mean something"

def test_task_metrics_logged_at_each_evaluation_and_layouts_agree(runs):
    pp2, tp2 = runs["last"]["pp2_vp2"], runs["last"]["tp2"]
    assert [e["step"] for e in pp2["eval"]] == [e["step"] for e in tp2["eval"]] == [0, STEPS]
    for task in LM_EVAL_TASKS:  # the trained model, scored at two layouts
        a, b = _samples(runs["root"] / "pp2_vp2", STEPS, task), _samples(runs["root"] / "tp2", STEPS, task)
        for doc_id in a:
            for (la, ga), (lb, gb) in zip(_logliks(a[doc_id]), _logliks(b[doc_id]), strict=True):
                assert abs(la - lb) <= 1e-3 * max(1.0, abs(la)), (task, doc_id, la, lb)
    for layout in ("pp2_vp2", "tp2"):
        run_dir = runs["root"] / layout
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        evals = [x for x in lines if x.get("split") == "eval"]
        assert [e["step"] for e in evals] == [0, STEPS]
        for e in evals:
            (path,) = glob.glob(str(run_dir / "eval_tasks" / f"step_{e['step']:06d}" / "*" / "results_*.json"))
            results = json.loads(Path(path).read_text())["results"]
            for task in TASKS:
                assert e[f"{task}/acc"] == results["psft_" + task]["acc,none"], (layout, e["step"], task)
            assert e["loss"] > 0 and e["eval_tasks_s"] > 0  # the held-out rows scored too
        train = [x for x in lines if "split" not in x]
        assert [x["step"] for x in train] == list(range(1, STEPS + 1))


def test_task_metrics_reach_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = runs["root"] / "pp2_vp2"
    evals = [x for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if x.get("split") == "eval"]
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for task in TASKS:
        tb = {e.step: e.value for e in acc.Scalars(f"eval/{task}/acc")}
        assert tb == pytest.approx({e["step"]: e[f"{task}/acc"] for e in evals}, rel=1e-6)
