"""A small self-contained chat data set: synthetic arithmetic, with its own BPE tokenizer.

Used by recipes/tiny_cpu.yaml (via tools/make_tiny_dataset.py) and by the tests, so
the default job and the test suite need no download. Under ``out``:

- ``train.jsonl`` / ``eval.jsonl``: ``{"prompt": "What is 37 plus 45?", "response": "37 + 45 = 82. The answer is 82."}``
  rows for the ``generic`` adapter;
- ``tokenizer/``: a byte-level BPE tokenizer trained on them with the ``tokenizers``
  library (``tokenizer.json`` + ``tokenizer_config.json``; BOS ``<s>``, EOS ``</s>``, pad ``<pad>``).

Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

_OPS = (
    ("plus", "+", lambda a, b: a + b),
    ("minus", "-", lambda a, b: a - b),
    ("times", "*", lambda a, b: a * b),
)
_ASK = ("What is {a} {word} {b}?", "Compute {a} {word} {b}.", "Please work out {a} {word} {b}.")


def make_sample(rng: random.Random) -> dict[str, str]:
    word, sym, fn = rng.choice(_OPS)
    hi = 12 if sym == "*" else 99
    a, b = rng.randint(0, hi), rng.randint(0, hi)
    c = fn(a, b)
    return {
        "prompt": rng.choice(_ASK).format(a=a, word=word, b=b),
        "response": f"{a} {sym} {b} = {c}. The answer is {c}.",
    }


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (HF tokenizer.json) with explicit special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, indent=1)
    )


def write_tiny_dataset(out: str | Path, train: int = 4000, eval: int = 400, vocab_size: int = 384, seed: int = 0) -> Path:
    """Write the data set and tokenizer under ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {"train": [make_sample(rng) for _ in range(train)], "eval": [make_sample(rng) for _ in range(eval)]}
    for name, rows in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    texts = [f"User: {r['prompt']}\n\nAssistant: {r['response']}" for r in splits["train"]]
    train_tokenizer(texts, out / "tokenizer", vocab_size)
    return out

