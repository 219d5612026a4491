"""``tools/evaluate.py`` end to end at TP=1 and TP=2, against independent references.

Two launches of the real CLI (as torchrun would start it):

* TP=1, one process: SmolLM2-135M-Instruct (from ``../shared``'s GGUF, dequantised once per
  machine into pytest's cache, converted HF -> Megatron here), with a tiny random Llama of the
  same vocabulary as the ``--ref`` model for the drift;
* TP=2, two processes: the tiny random Llama (SmolLM2's 9 heads and 3 query groups do not split
  over 2 ranks), a second random Llama as ``--ref``; generation runs on the export made in a
  child process (the multi-rank path).

Each runs MMLU (2 items of one subject) and TruthfulQA MC1 (2 items) by log-likelihood, 2 GSM8K
items by greedy generation, and held-out NLL / entropy / KL drift on 2 GSM8K conversations.
References: lm-eval's own ``hf`` backend (batch size 1, same rendered task files, same chat
template) for the per-item log-likelihoods, ``is_greedy`` and accuracy; ``transformers.generate``
on the original HF folder, one prompt at a time, for the generations; float64 log-softmax / entropy
/ KL written here on the HF models' logits for the held-out numbers.

Tolerance 1e-4, the bound the conversion test puts on SmolLM2's logits: per continuation token for
the log-likelihood sums (a TruthfulQA answer spans 10-40 tokens: measured 2.4e-4 on a 25-token,
-46.9 nat answer, 1e-5 per token), and on the per-token means of the held-out numbers.
"""

from __future__ import annotations

import glob
import json
import runpy
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("math_verify")
pytest.importorskip("accelerate")  # lm-eval's hf backend

from lm_eval_reference import hf_backend_logliks, tiny_llama  # noqa: E402

from psft_megatron.testing.multiproc import run_in_processes  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "smollm2"
LOGLIK_TASKS = ["psft_mmlu_anatomy", "psft_truthfulqa_mc1"]
LIMIT = 2
TOL = 1e-4


def _hf_generate(hf_dir: str, prompts: dict[int, str], max_new: int) -> dict[int, str]:
    """``transformers.generate``, greedy, one prompt at a time, on the ORIGINAL HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = {}
    for doc_id, prompt in prompts.items():
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                                 eos_token_id=2, pad_token_id=2)[0, ids.shape[1]:]
        out[doc_id] = tok.decode(new, skip_special_tokens=True)
    return out


def _float64_heldout(model_dir: str, ref_dir: str, heldout: str) -> list[dict[str, float]]:
    """Per held-out sample: sums of NLL, entropy and KL(model || ref) over the response tokens the data
    pipeline marks, from float64 log-softmax of the HF models' logits."""
    from transformers import AutoModelForCausalLM

    from psft_megatron.data.config import DataSourceConfig
    from psft_megatron.data.templates import load_template
    from psft_megatron.data.tokenizer import load_tokenizer
    from psft_megatron.evaluation.heldout import read_heldout

    tok = load_tokenizer(TOKENIZER)
    source = DataSourceConfig.from_dict({"path": heldout, "adapter": "gsm8k", "long_sample": "truncate_response"})
    samples, _ = read_heldout(source, tok, load_template(None, tok))
    p_model, q_model = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval() for d in (model_dir, ref_dir))
    out = []
    for s in samples:
        ids = torch.tensor([s.ids])
        mask = torch.tensor(s.loss_mask[1:], dtype=torch.bool)  # position t predicts token t + 1
        with torch.no_grad():
            lp = torch.log_softmax(p_model(ids).logits[0, :-1], -1)[mask]
            lq = torch.log_softmax(q_model(ids).logits[0, :-1], -1)[mask]
        labels = ids[0, 1:][mask]
        out.append({"nll": float(-lp.gather(-1, labels[:, None]).sum()), "entropy": float(-(lp.exp() * lp).sum()),
                    "kl": float((lp.exp() * (lp - lq)).sum()), "tokens": int(mask.sum())})
    return out


def evaluate_worker(convert: list[list[str]], argv: list[str], references: dict[str, Any] | None = None) -> Any:
    """One rank of ``tools/evaluate.py ARGV``, after converting HF folders; then (one process only) the
    references: ``{name: (hf_dir, ref_hf_dir, max_new)}`` computed on the run's task files and prompts."""
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron

    for hf, out in convert:
        convert_hf_to_megatron(hf, out)
    start = time.monotonic()
    main = runpy.run_path(str(ROOT / "tools" / "evaluate.py"), run_name="psft_evaluate")["main"]
    rc = main(argv)
    seconds = {"evaluate": round(time.monotonic() - start, 1)}
    if rc != 0 or not references:
        return {"rc": rc, "seconds": seconds}
    out_dir = Path(argv[argv.index("--out") + 1])
    prompts = {i: d["arguments"]["gen_args_0"]["arg_0"] for i, d in _samples(out_dir, "psft_gsm8k").items()}
    heldout = argv[argv.index("--heldout") + 1]
    refs = {name: {**hf_backend_logliks(hf, str(out_dir / "tasks"), LOGLIK_TASKS, LIMIT),
                   "gen": _hf_generate(hf, prompts, max_new),
                   "heldout": _float64_heldout(hf, ref_hf, heldout)}
            for name, (hf, ref_hf, max_new) in references.items()}
    seconds["references"] = round(time.monotonic() - start - seconds["evaluate"], 1)
    return {"rc": rc, "refs": refs, "seconds": seconds}


@pytest.fixture(scope="module")
def runs(smollm2_hf, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluation")
    hf = {"smol": smollm2_hf, "a": tiny_llama(root / "a_hf", TOKENIZER, 1),
          "b": tiny_llama(root / "b_hf", TOKENIZER, 2)}
    mg = {k: root / f"{k}_mg" for k in hf}
    heldout = root / "heldout.jsonl"
    with open(SHARED / "data" / "gsm8k" / "test.jsonl") as f:
        heldout.write_text("".join(next(f) for _ in range(2)))
    common = ["--data-root", str(SHARED / "data"), "--tasks", "mmlu_anatomy,truthfulqa_mc1,gsm8k",
              "--limit", str(LIMIT), "--heldout", str(heldout), "--adapter", "gsm8k", "--bootstrap-iters", "0",
              "--gen-batch-size", "2"]
    layouts = {
        "tp1": {"model": "smol", "ref": "b", "nprocs": 1, "max_new": 12},
        "tp2": {"model": "a", "ref": "b", "nprocs": 2, "max_new": 8},
    }
    # TP=1 also computes every reference (one process: the task files and prompts are the same for both runs).
    references = {lay["model"]: (str(hf[lay["model"]]), str(hf[lay["ref"]]), lay["max_new"]) for lay in layouts.values()}
    results = {}
    for name, lay in layouts.items():
        argv = ["--ckpt", str(mg[lay["model"]]), "--ref", str(mg[lay["ref"]]), "--out", str(root / name),
                "--max-gen-toks", str(lay["max_new"]), *common] + (["--tp", "2"] if name == "tp2" else [])
        kwargs = {"convert": [[str(hf[k]), str(mg[k])] for k in hf], "argv": argv, "references": references}
        if name == "tp2":
            kwargs.update(convert=[], references=None)
        ranks = run_in_processes(evaluate_worker, lay["nprocs"], timeout=900, init_process_group=False, kwargs=kwargs)
        assert [r["rc"] for r in ranks] == [0] * lay["nprocs"], ranks
        print(name, ranks[0]["seconds"])
        results.update(ranks[0].get("refs") or {})
    return {"root": root, "hf": hf, "layouts": layouts, "refs": results}


def _samples(out: Path, task: str) -> dict[int, dict[str, Any]]:
    (path,) = glob.glob(str(out / "lm_eval" / "*" / f"samples_{task}_*.jsonl"))
    return {d["doc_id"]: d for d in map(json.loads, open(path))}


def _results(out: Path) -> dict[str, Any]:
    (path,) = glob.glob(str(out / "lm_eval" / "*" / "results_*.json"))
    return json.loads(Path(path).read_text())["results"]


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_loglikelihoods_match_lm_eval_hf_backend(runs, layout):
    """Per request: |log-likelihood - hf| <= 1e-4 per continuation token (the conversion test's bound on
    each logit, summed over the tokens a TruthfulQA answer spans), the same is_greedy; accuracy identical."""
    out = runs["root"] / layout
    ref = runs["refs"][runs["layouts"][layout]["model"]]
    worst = 0.0
    for task in LOGLIK_TASKS:
        got = _samples(out, task)
        want = ref["docs"][task]
        assert sorted(got) == sorted(want) == list(range(LIMIT))
        for doc_id, w in want.items():
            g = got[doc_id]
            assert g["arguments"]["gen_args_0"]["arg_0"] == w["prompt"]  # same prompt, same chat template
            g_ll = [(float(ll), greedy == "True") for ((ll, greedy),) in g["resps"]]
            assert len(g_ll) == len(w["resps"]) > 1
            for (gl, gg), (wl, wg, n) in zip(g_ll, w["resps"]):
                worst = max(worst, abs(gl - wl) / n)
                assert abs(gl - wl) <= TOL * n, (layout, task, doc_id, gl, wl, n)
                assert gg == wg, (layout, task, doc_id)
        assert _results(out)[task]["acc,none"] == ref["acc"][task], (layout, task)
    print(f"{layout}: max |loglik - hf| per continuation token = {worst:.2e}")


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_greedy_generations_match_transformers_generate(runs, layout):
    """The exported model through lm-eval (batches of 2, left padding) equals ``transformers.generate``
    on the original HF folder, one prompt at a time."""
    want = runs["refs"][runs["layouts"][layout]["model"]]["gen"]
    samples = _samples(runs["root"] / layout, "psft_gsm8k")
    assert sorted(samples) == sorted(int(k) for k in want) == list(range(LIMIT))
    for doc_id, d in samples.items():
        assert d["arguments"]["gen_args_0"]["arg_0"].endswith("<|im_start|>assistant\n")
        assert d["resps"][0][0] == want[doc_id], (layout, doc_id)
        assert d["acc"] in (0.0, 1.0)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_heldout_nll_entropy_and_drift_match_float64(runs, layout):
    """Per sample and token-weighted over the file: mean NLL, entropy and KL(model || ref)."""
    want = runs["refs"][runs["layouts"][layout]["model"]]["heldout"]
    rows = [json.loads(line) for line in open(runs["root"] / layout / "heldout.jsonl")]
    assert len(rows) == len(want) == 2
    for row, w in zip(rows, want):
        assert row["num_tokens"] == w["tokens"] > 10
        for key in ("nll", "entropy", "kl"):
            assert abs(row[key] - w[key] / w["tokens"]) <= TOL, (layout, key, row[key], w[key] / w["tokens"])
    metrics = json.loads((runs["root"] / layout / "psft_metrics.json").read_text())
    tokens = sum(w["tokens"] for w in want)
    for section, key in (("heldout", "nll"), ("heldout", "entropy"), ("drift", "kl")):
        assert abs(metrics[section][key] - sum(w[key] for w in want) / tokens) <= TOL, (layout, section, key)
    table = (runs["root"] / layout / "results.md").read_text()
    assert "| drift | kl |" in table and "| mmlu_anatomy | acc |" in table and "| gsm8k | acc |" in table
