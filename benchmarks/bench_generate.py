"""Greedy generation throughput on CPU: the evaluation's generate path vs transformers without and with batching.

    python benchmarks/bench_generate.py [--hf HF_DIR] [--n 100] [--max-new 256] [--batch 8] [--naive-n 5] [--threads 1]

Model: SmolLM2-135M-Instruct (without ``--hf``: dequantised once from ``../shared``'s GGUF into
``--work``), fp32. Prompts: the first ``--n`` GSM8K test questions rendered with the tokenizer's chat
template, exactly as ``tools/evaluate.py --tasks gsm8k`` renders them. Greedy, stop at EOS. Three
paths, side by side in one process:

  naive      re-run the whole prefix for every new token (``use_cache=False``), one prompt at a time
             (on the first ``--naive-n`` prompts: it is an order of magnitude slower);
  generate1  ``transformers.generate`` with the KV cache, one prompt at a time;
  evaluate   ``psft_megatron.evaluation.generation.TransformersGenerator`` (what ``tools/evaluate.py``
             runs): ``generate`` with the KV cache, ``--batch`` prompts per call, left padding.

Reports tokens/s per path, the speed-up ratios on the same prompts, and token identity (batched vs
one at a time; naive vs one at a time), with the first differing position of any that differ.
Prints a table and a JSON line; docs/benchmarks.md ("## Generation") records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(work: Path) -> Path:
    folder = work / "smollm2_hf"
    if (folder / "config.json").is_file():
        return folder
    from psft_megatron.conversion.gguf import gguf_to_hf

    return gguf_to_hf(GGUF, folder, SHARED / "tokenizers" / "smollm2")


def trim(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def naive(model: Any, prompts: list[list[int]], max_new: int, eos: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen: list[int] = []
        for _ in range(max_new):
            nxt = int(model(ids, use_cache=False).logits[0, -1].argmax())
            gen.append(nxt)
            if nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        outs.append(gen)
    return outs


@torch.no_grad()
def generate1(model: Any, prompts: list[list[int]], max_new: int, eos: int) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
        outs.append(trim(out[0, len(p):].tolist(), eos))
    return outs


def timed(fn: Any, *args: Any) -> tuple[list[list[int]], dict[str, float]]:
    t = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t
    n = sum(len(o) for o in out)
    return out, {"seconds": round(dt, 2), "tokens": n, "tokens_per_s": round(n / dt, 2)}


def first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", type=Path, default=None)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_generate")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--naive-n", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from psft_megatron.data.templates import load_template
    from psft_megatron.data.tokenizer import load_tokenizer
    from psft_megatron.evaluation.generation import TransformersGenerator
    from psft_megatron.evaluation.lm_eval_model import render_prompt

    hf = args.hf or prepare_smollm2(args.work)
    tok = load_tokenizer(hf)
    template = load_template(None, tok)
    questions = [json.loads(line)["question"] for line in open(SHARED / "data" / "gsm8k" / "test.jsonl")][: args.n]
    prompts = [tok.encode(render_prompt(template, [{"role": "user", "content": q}])) for q in questions]
    eos = tok.eos_id
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    gen = TransformersGenerator(hf, pad_id=tok.pad_id if tok.pad_id is not None else eos, eos_id=eos)

    def evaluate_path(ps: list[list[int]]) -> list[list[int]]:
        out = []
        for i in range(0, len(ps), args.batch):
            out += gen.generate(ps[i : i + args.batch], max_new_tokens=args.max_new)
        return out

    res: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                           "load_avg_before": [round(x, 1) for x in os.getloadavg()], "threads": args.threads,
                           "n": args.n, "max_new": args.max_new, "batch": args.batch,
                           "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1)}
    ev, res["evaluate"] = timed(evaluate_path, prompts)
    g1, res["generate1"] = timed(generate1, model, prompts, args.max_new, eos)
    sub = prompts[: args.naive_n]
    g1_sub, res["generate1_naive_subset"] = timed(generate1, model, sub, args.max_new, eos)
    nv, res["naive"] = timed(naive, model, sub, args.max_new, eos)
    res["load_avg_after"] = [round(x, 1) for x in os.getloadavg()]
    res["speedup_evaluate_vs_generate1"] = round(res["evaluate"]["tokens_per_s"] / res["generate1"]["tokens_per_s"], 2)
    res["speedup_generate1_vs_naive"] = round(
        res["generate1_naive_subset"]["tokens_per_s"] / res["naive"]["tokens_per_s"], 2)
    res["identical_evaluate_vs_generate1"] = f"{sum(a == b for a, b in zip(ev, g1))}/{len(g1)}"
    res["first_diff_evaluate_vs_generate1"] = {i: first_diff(a, b) for i, (a, b) in enumerate(zip(ev, g1)) if a != b}
    res["identical_naive_vs_generate1"] = f"{sum(a == b for a, b in zip(nv, g1_sub))}/{len(sub)}"

    print("| path | prompts | tokens | seconds | tokens/s |\n| --- | ---: | ---: | ---: | ---: |")
    for key, n in (("naive", len(sub)), ("generate1_naive_subset", len(sub)), ("generate1", len(prompts)),
                   ("evaluate", len(prompts))):
        r = res[key]
        print(f"| {key} | {n} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
