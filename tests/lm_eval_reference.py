"""What the evaluation tests share: a random Llama with SmolLM2's tokenizer, and lm-eval's own ``hf``
backend on rendered task files (the reference the Megatron scorer is held to)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def tiny_llama(folder: Path, tokenizer: Path, seed: int, layers: int = 2, tied: bool = False,
               max_positions: int = 2048) -> Path:
    """A random Llama with SmolLM2's vocabulary and tokenizer files in ``folder`` (4 heads, 2 query
    groups: splits at TP=2). A wide init (0.5): peaked predictions, so multiple-choice answers rarely tie."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      initializer_range=0.5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    for f in tokenizer.iterdir():
        shutil.copy2(f, folder / f.name)
    return folder


def hf_backend_logliks(hf_dir: str, task_dir: str, tasks: list[str], limit: int) -> dict[str, Any]:
    """lm-eval's ``hf`` backend (batch 1: no padding effects) on the task files in ``task_dir``:
    ``{"acc": {task: acc}, "docs": {task: {doc_id: {"prompt", "resps"}}}}``, each response
    (log-likelihood, is_greedy, continuation tokens as HFLM splits them)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=hf_dir, device="cpu", dtype="float32", batch_size=1)
    res = simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=True, bootstrap_iters=0,
                          apply_chat_template=True, fewshot_as_multiturn=True,
                          task_manager=TaskManager(include_path=task_dir, include_defaults=False))
    return {"acc": {t: res["results"][t]["acc,none"] for t in tasks},
            "docs": {t: {d["doc_id"]: {"prompt": d["arguments"][0][0],
                                       "resps": [(float(ll), bool(g), len(lm._encode_pair(*args)[1]))
                                                 for ((ll, g),), args in zip(d["resps"], d["arguments"])]}
                         for d in res["samples"][t]} for t in tasks}}
