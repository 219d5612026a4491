"""Evaluation pieces that need no model: math-verify verdicts, mean@n / pass@n, the vocab-parallel
KL and argmax at one rank against float64 / torch references, the training chat template as a
generation prompt, the local-file loaders, and the one-line errors of ``tools/evaluate.py``.

The multi-rank and model-level checks (lm-eval's ``hf`` backend, ``transformers.generate``,
TP=2) are in ``test_evaluation_parity.py``.
"""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("math_verify")

ROOT = Path(__file__).resolve().parents[1]

# (gold as the data sets store it, a model's answer, the truth). Gold and wrong answers in the
# shapes the math sets use: GSM8K "#### N", dollars, units, thousands commas, LaTeX fractions,
# boxed answers, tuples, intervals, percentages, AMC's "27.0", GSM-Hard's floats.
VERDICTS = [
    ("18", "She makes 18 dollars every day.", True),
    ("18", "9 * 2 = 18\n#### 18", True),
    ("18", "16 - 3 - 4 = 9 eggs.\n#### 9", False),
    ("18", "The answer is $18.", True),
    ("18", "The answer is \\$18.", True),  # LaTeX-escaped dollar: math_answers normalises it
    ("18", "18 dollars", True),
    ("18", "The answer is 18.00", True),
    ("18", "so the total is \\boxed{18}.", True),
    ("18", "The answer is 17.", False),
    ("18", "9 * 2 = 18, so the answer is 20.", False),
    ("1234567", "Total: 1,234,567", True),
    ("-5", "The answer is -5.", True),
    ("25", "0.25", False),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{14}{3}", "\\boxed{4\\frac{2}{3}}", True),
    ("\\frac{14}{3}", "\\boxed{\\frac{13}{3}}", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(\\frac{\\pi}{2}, 3)}", False),
    ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True),
    ("[2,5)", "\\boxed{[2,5]}", False),
    ("27.0", "\\boxed{27}", True),
    ("-9867630.0", "The answer is -9867630", True),
    ("25\\%", "The answer is 25", True),
    ("18", "", False),
    ("18", "I don't know.", False),
]


@pytest.mark.timeout(120, method="thread")  # math-verify's signal.alarm would cancel a signal-method timeout
def test_math_verify_verdicts_and_mean_at_n():
    from psft_megatron.evaluation.math_answers import is_correct
    from psft_megatron.evaluation.tasks.utils import process_results_math

    wrong = [(g, p, want) for g, p, want in VERDICTS if is_correct(g, p) != want]
    assert not wrong, wrong
    # n samples of one problem: the filter hands process_results the list of n generations.
    doc = {"answer": "18"}
    assert process_results_math(doc, ["#### 18"]) == {"acc": 1.0, "pass_at_n": 1.0, "distinct_answers": 1.0}
    assert process_results_math(doc, [["#### 18", "#### 7", "\\boxed{18}", "no"]]) == {
        "acc": 0.5, "pass_at_n": 1.0, "distinct_answers": 3.0}  # 18, 7 and "no answer"
    assert process_results_math(doc, [["#### 17", "19"]]) == {"acc": 0.0, "pass_at_n": 0.0, "distinct_answers": 2.0}


@pytest.mark.timeout(120, method="thread")
def test_distinct_answers_counts_equal_answers_once():
    from psft_megatron.evaluation.math_answers import distinct_answers

    # The same number written four ways is one answer; a wrong one and two without any answer add two.
    same = ["The answer is 18.", "#### 18.0", "so $\\frac{36}{2}$", "\\boxed{18}"]
    assert distinct_answers(same) == 1
    assert distinct_answers(same + ["#### 7", "I do not know", "no idea"]) == 3
    assert distinct_answers(["#### 1", "#### 2", "#### 3", "#### 4"]) == 4
    assert distinct_answers(["nothing", "here"]) == 1


def test_vocab_parallel_kl_and_argmax_at_one_rank():
    """Against float64 math written here (the TP=2 run is in test_evaluation_parity.py)."""
    from psft_megatron.loss.argmax import vocab_parallel_argmax
    from psft_megatron.loss.kl import vocab_parallel_kl

    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, 40, generator=g) * 4
    q = torch.randn(3, 5, 40, generator=g) * 4
    p[0, 0, 7] = p[0, 0, 9] = 50.0  # a tie: torch.argmax takes the lower id
    v = 37  # columns 37.. are vocabulary padding
    lp = torch.log_softmax(p[..., :v].double(), -1)
    lq = torch.log_softmax(q[..., :v].double(), -1)
    want = (lp.exp() * (lp - lq)).sum(-1)
    got = vocab_parallel_kl(p, q, vocab_size=v, chunk_size=4)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=0), (got.double() - want).abs().max()
    assert vocab_parallel_kl(p, p, vocab_size=v).abs().max() < 1e-6
    p[1, 1, 38] = 1e4  # padding never wins
    assert torch.equal(vocab_parallel_argmax(p, vocab_size=v), p[..., :v].argmax(-1))
    assert int(vocab_parallel_argmax(p, vocab_size=v)[0, 0]) == 7


def test_generation_prompt_is_the_tokenizers_chat_template(shared):
    """lm-eval prompts are rendered with the training template; for a tokenizer's own Jinja template
    that is exactly ``apply_chat_template(add_generation_prompt=True)`` (HFLM's prompt)."""
    from transformers import AutoTokenizer

    from psft_megatron.data.templates import load_template
    from psft_megatron.data.tokenizer import load_tokenizer
    from psft_megatron.evaluation.lm_eval_model import render_prompt

    folder = shared / "tokenizers" / "smollm2"
    template = load_template(None, load_tokenizer(folder))
    hf = AutoTokenizer.from_pretrained(folder)
    chats = [
        [{"role": "user", "content": "What is 2 + 2?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    ]
    for chat in chats:
        assert render_prompt(template, chat) == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prefilled = chats[0] + [{"role": "assistant", "content": "The answer is"}]
    assert render_prompt(template, prefilled, add_generation_prompt=False) == hf.apply_chat_template(
        prefilled, tokenize=False, continue_final_message=True)


def test_local_loaders_keep_cells_and_build_choices(tmp_path):
    import datasets

    from psft_megatron.evaluation.tasks.utils import docs_asdiv, docs_gsm8k, load_mmlu, load_truthfulqa

    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / f"algebra_{split}.csv").write_text(
            "question,choice0,choice1,choice2,choice3,answer\nWhich?,None,0.50,x,y,1\n")
    mmlu = load_mmlu(data_dir=str(tmp_path), subject="algebra")
    assert mmlu["test"][0] == {"question": "Which?", "subject": "algebra", "choices": ["None", "0.50", "x", "y"],
                               "answer": 1}
    csv_path = tmp_path / "tqa.csv"
    csv_path.write_text("\ufeffType,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
                        'A,Misc,Q?,Yes,"Yes; Indeed.","No; Never",s\n', encoding="utf-8")
    doc = load_truthfulqa(path=str(csv_path))["validation"][0]
    assert doc["mc1_targets"] == {"choices": ["Yes.", "No.", "Never."], "labels": [1, 0, 0]}
    assert doc["mc2_targets"] == {"choices": ["Yes.", "Indeed.", "No.", "Never."], "labels": [1, 1, 0, 0]}
    gsm = docs_gsm8k(datasets.Dataset.from_list([{"question": "q", "answer": "a <<1+1=2>>\n#### 1,234"}]))
    assert gsm[0]["answer"] == "1234" and gsm[0]["problem"] == "q"
    asdiv = docs_asdiv(datasets.Dataset.from_list([{"body": "B", "question": "Q", "answer": "9 (apples)"},
                                                    {"body": "B", "question": "Q", "answer": "Tom"}]))
    assert [d["answer"] for d in asdiv] == ["9"]


def _fake_checkpoint(root: Path, tokenizer_dir: Path, heads: int = 4) -> Path:
    """A folder that passes the torch-free checks (psft_meta.json, model/); no weights are read."""
    ckpt = root / "ckpt"
    (ckpt / "model").mkdir(parents=True)
    model = {"family": "llama", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
             "num_attention_heads": heads, "num_query_groups": 2, "vocab_size": 384}
    (ckpt / "psft_meta.json").write_text(json.dumps({"format": "psft-megatron", "format_version": 1, "model": model,
                                                     "dtype": "float32", "tokenizer": str(tokenizer_dir)}))
    (ckpt / "model" / "metadata.json").write_text("{}")
    return ckpt


def test_bad_inputs_give_one_line_and_exit_2(tiny_data, tmp_path, capsys):
    evaluate = runpy.run_path(str(ROOT / "tools" / "evaluate.py"), run_name="psft_evaluate")["main"]
    ckpt = _fake_checkpoint(tmp_path, tiny_data / "tokenizer")  # the synthetic tokenizer has no chat template
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    out = str(tmp_path / "out")
    cases = {
        "unknown task 'gsm9k'": ["--ckpt", str(ckpt), "--tasks", "gsm9k", "--out", out],
        "nope.jsonl: file not found (--data gsm8k=PATH)": [
            "--ckpt", str(ckpt), "--tasks", "gsm8k", "--data", f"gsm8k={tmp_path / 'nope.jsonl'}", "--out", out],
        "missing does not exist (--ckpt)": ["--ckpt", str(tmp_path / "missing"), "--tasks", "gsm8k", "--out", out],
        "tokenizer has no chat template": [
            "--ckpt", str(ckpt), "--tasks", "gsm8k", "--data", f"gsm8k={gsm}", "--out", out],
        "must be divisible by parallel.tensor_model_parallel_size (3)": [
            "--ckpt", str(ckpt), "--tasks", "gsm8k", "--data", f"gsm8k={gsm}", "--no-chat-template", "--tp", "3",
            "--out", out],
    }
    for expected, argv in cases.items():
        assert evaluate(argv) == 2, expected
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (expected, err)


class _ScriptedGenerator:
    """Stands in for the exported model: answers from a script, so the lm-eval plumbing and the
    metrics can be checked exactly (greedy: always right; sampled: right on every 4th call)."""

    def __init__(self, tokenizer, answers: dict[str, str]) -> None:
        self.tokenizer, self.answers, self.sampled_calls = tokenizer, answers, 0

    def generate(self, prompts, *, max_new_tokens, do_sample, temperature, top_p, stop):
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            gold = next(a for q, a in self.answers.items() if q in text)
            if do_sample:
                assert (temperature, top_p) == (0.7, 0.9)
                right = self.sampled_calls % 4 == 0
                self.sampled_calls += 1
            else:
                right = True
            out.append(self.tokenizer.encode(f"So the answer is {gold if right else gold + '1'}.\n#### end")
                       + [self.tokenizer.eos_id])
        return out


@pytest.mark.timeout(300, method="thread")
def test_generation_tasks_greedy_and_mean_pass_at_n(shared, tmp_path):
    """gsm8k through lm-eval with the psft model class: greedy accuracy, and mean@4 / pass@4 when one
    sample in four is right; special tokens are left out of the text."""
    from psft_megatron.data.tokenizer import load_tokenizer
    from psft_megatron.evaluation.harness import EvalSettings, run_tasks, task_manager
    from psft_megatron.evaluation.lm_eval_model import PSFTMegatronLM
    from psft_megatron.evaluation.report import summarize_lm_eval
    from psft_megatron.evaluation.tasks import Sampling, render_tasks

    data = tmp_path / "gsm8k.jsonl"
    qa = {"Tom has 3 apples and buys 4.": "7", "A box holds 12 eggs; 5 are used.": "7000"}
    data.write_text("".join(json.dumps({"question": q + " How many?", "answer": f"work\n#### {a[:-3]},{a[-3:]}"
                                         if len(a) > 3 else f"work\n#### {a}"}) + "\n" for q, a in qa.items()))
    tok = load_tokenizer(shared / "tokenizers" / "smollm2")
    rendered = render_tasks(tmp_path / "tasks", ["gsm8k"], {"gsm8k": str(data)}, max_gen_toks=32,
                            sampling=Sampling(4, 0.7, 0.9))
    assert rendered.generate == ["psft_gsm8k", "psft_gsm8k_n4"] and not rendered.loglik
    lm = PSFTMegatronLM(tok, generator=_ScriptedGenerator(tok, qa), batch_size=3, max_length=512)
    results = run_tasks(lm, rendered.generate, task_manager(rendered.folder),
                        EvalSettings(apply_chat_template=False, bootstrap_iters=0))
    summary = summarize_lm_eval(results, rendered.generate)
    # Sampled: the gold answer once and the same wrong one three times: two distinct answers.
    assert summary == {"gsm8k/acc": 1.0, "gsm8k/pass_at_n": 1.0, "gsm8k/distinct_answers": 1.0,
                       "gsm8k_n4/acc@n4": 0.25, "gsm8k_n4/pass_at_n@n4": 1.0, "gsm8k_n4/distinct_answers@n4": 2.0}
    resp = results["samples"]["psft_gsm8k"][0]["resps"][0][0]
    assert resp.startswith("So the answer is") and "<|im_end|>" not in resp


def test_a_run_folder_gives_checkpoint_tokenizer_template_and_heldout(tiny_data, tmp_path):
    """--ckpt RUN_DIR: its latest checkpoint, the tokenizer and held-out data the recipe named relative to
    the folder training ran in, and the recipe's chat template; --ref alone measures drift on data.eval[0]."""
    import yaml

    from psft_megatron.evaluation.options import EvalJob, check_job

    shutil.copytree(tiny_data / "tokenizer", tmp_path / "tok")
    (tmp_path / "data").mkdir()
    shutil.copy(tiny_data / "eval.jsonl", tmp_path / "data" / "eval.jsonl")
    run = tmp_path / "runs" / "x"
    ckpt = _fake_checkpoint(run / "checkpoints", Path("tok"))  # paths as a recipe run from tmp_path wrote them
    (run / "checkpoints" / "latest").write_text("ckpt\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {
        "chat_template": "plain", "eval": [{"path": "data/eval.jsonl", "adapter": "generic", "limit": 5}]}}))
    checked = check_job(EvalJob(ckpt=str(run), ref=str(ckpt), out=str(tmp_path / "out")))
    assert checked.ckpt == ckpt and checked.tokenizer_path == tmp_path / "tok"
    assert checked.template_spec == "plain" and checked.apply_chat_template
    held = checked.job.heldout
    assert (held.path, held.adapter, held.limit) == (str(tmp_path / "data" / "eval.jsonl"), "generic", 5)


def test_truthfulqa_mc2_metric():
    """Normalised probability mass on the true answers (lm-eval's truthfulqa MC2), from float64 math here."""
    import math

    from psft_megatron.evaluation.tasks.utils import process_results_mc2

    g = torch.Generator().manual_seed(0)
    for n_true, n_false in ((1, 1), (3, 5), (4, 2)):
        doc = {"mc2_targets": {"labels": [1] * n_true + [0] * n_false}}
        ll = [float(x) for x in torch.randn(n_true + n_false, generator=g) * 5 - 20]
        want = sum(math.exp(x) for x in ll[:n_true]) / sum(math.exp(x) for x in ll)
        got = process_results_mc2(doc, [(x, False) for x in ll])["acc"]
        assert got == pytest.approx(want, abs=1e-12)
