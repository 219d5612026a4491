"""The tiny recipe the tests and CPU benchmarks train, as a plain dict.

One definition instead of one per test module: a 4-layer Llama-style model small
enough for gloo on two cores, on the synthetic data of
:func:`psft_megatron.data.synthetic.write_tiny_dataset`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

TINY_MODEL: dict[str, Any] = {
    "family": "llama", "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 160,
    "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 384,
    "max_position_embeddings": 128, "params_dtype": "fp32", "transformer_impl": "local",
}


def tiny_recipe(data: str | Path, run_dir: str | Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict over the tiny dataset in ``data``; each keyword updates one section
    (``training={"train_steps": 4}``); ``model`` may replace the model section."""
    data = Path(data)
    base: dict[str, Any] = {
        "model": copy.deepcopy(TINY_MODEL),
        "parallel": {},
        "training": {
            "seq_length": 64, "global_batch_size": 8, "mini_batch_size": 4, "micro_batch_size": 2,
            "train_steps": 8, "sft_warmup_steps": 2, "seed": 7,
        },
        "optimizer": {"lr": 2e-3, "min_lr": 2e-4, "lr_warmup_steps": 2, "clip_grad": 1.0, "weight_decay": 0.1},
        "loss": {"name": "psft", "eps_low": 0.2, "eps_high": 0.28},
        "data": {
            "train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": 64}],
            "eval": [{"path": str(data / "eval.jsonl"), "adapter": "generic", "max_length": 64}],
            "tokenizer": str(data / "tokenizer"),
            "chat_template": "plain",
            "cache_dir": str(data / "cache"),
        },
        "checkpoint": {"allow_random_init": True, "save_at_end": False},
        "logging": {"run_dir": str(run_dir), "tensorboard": False, "progress_bar": False},
    }
    return with_sections(base, **sections)


def with_sections(recipe: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``recipe`` with each named section updated key by key."""
    out = copy.deepcopy(recipe)
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **copy.deepcopy(values)}
    return out
