"""Qwen3's chat template and the answer-only loss mask it gives (no processes).

The template is Qwen3's own (``psft_megatron/data/chat_templates/qwen3.jinja``, ``data.chat_template:
qwen3``); there is no Qwen3 tokenizer in ../shared, so it runs on the real Qwen2 tokenizer Qwen3's
extends (the same ChatML special tokens; ``<think>`` is plain text there, several tokens).

- Rendering: text and token ids equal transformers' ``apply_chat_template`` with the same template,
  on real GSM8K conversations with and without a reasoning block, thinking on (the default) and off.
- The mask, against strings written here from Qwen3's format: what is trained is exactly what the
  model writes after the generation prompt ``<|im_start|>assistant\\n``, up to its ``<|im_end|>``:
  - a demonstration with a ``<think>...</think>`` block: the think block (Qwen3 re-spaces it to
    ``<think>\\nR\\n</think>\\n\\n``), then the answer, then ``<|im_end|>``;
  - a demonstration without one: the empty ``<think>\\n\\n</think>\\n\\n`` Qwen3 writes into the last
    turn, the answer, ``<|im_end|>`` (in thinking mode the model writes that empty block itself);
  - with ``enable_thinking: false`` the generation prompt holds the empty block: the answer and
    ``<|im_end|>`` only.
  Never the prompt, the header or the newline after ``<|im_end|>``.
- transformers' own assistant mask (``return_assistant_tokens_mask``) is empty for this template (it
  has no ``{% generation %}`` tags): the silent masks-nothing bug of peers that rely on it.
- Templates whose mask would be empty or wrong fail loudly: one that drops the assistant text, one
  with no end-of-turn token, one that ignores ``add_generation_prompt``; and with Qwen3's, a
  reasoning demonstration under ``enable_thinking: false`` and a trained earlier turn of a multi-turn
  chat (Qwen3 rewrites history turns without their think blocks) are refused, not mis-masked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from psft_megatron.data.config import DataSourceConfig
from psft_megatron.data.encode import encode_conversation, iter_conversations
from psft_megatron.data.errors import DataError, ErrorPolicy, TemplateError
from psft_megatron.data.templates import BUNDLED_TEMPLATES, load_template
from psft_megatron.data.tokenizer import load_tokenizer
from psft_megatron.data.types import Conversation, Message, Provenance

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QWEN2 = SHARED / "tokenizers" / "qwen2"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
TEMPLATE = ROOT / "psft_megatron" / "data" / "chat_templates" / BUNDLED_TEMPLATES["qwen3"]

pytestmark = pytest.mark.skipif(not QWEN2.is_dir() or not GSM8K.is_file(), reason="../shared not available")

N = 40  # GSM8K records per case


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(QWEN2)


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(QWEN2))


def _gsm8k(n: int = N) -> list[tuple[str, str, str]]:
    """(question, worked steps, final answer line) of the first ``n`` GSM8K records."""
    out = []
    with open(GSM8K) as f:
        for line in list(f)[:n]:
            r = json.loads(line)
            steps, final = r["answer"].rsplit("\n", 1)
            out.append((r["question"], steps, final))
    return out


def _conv(*turns: tuple[str, str], train_last_only: bool = True) -> Conversation:
    msgs = tuple(Message(role, text, train=(role == "assistant" and (not train_last_only or i == len(turns) - 1)))
                 for i, (role, text) in enumerate(turns))
    return Conversation(msgs, Provenance("test", 1))


def _masked_text(tok, sample) -> tuple[str, str]:
    """(the trained tokens decoded, the untrained tokens before them decoded); one trained run."""
    mask = sample.loss_mask.astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    assert len(edges) == 2, f"expected one trained run, got {len(edges) // 2}"
    ids = sample.input_ids.tolist()
    return tok.decode(ids[edges[0]:edges[1]]), tok.decode(ids[:edges[0]])


def test_renders_as_transformers(tok, hf_tok):
    source = TEMPLATE.read_text(encoding="utf-8")
    for thinking in (None, False):
        extra = {} if thinking is None else {"enable_thinking": thinking}
        template = load_template("qwen3", tok, extra)
        for q, steps, final in _gsm8k(15):
            for answer in (f"{steps}\n{final}", f"<think>\n{steps}\n</think>\n\n{final}", f"<think>{steps}</think>{final}"):
                if thinking is False and "<think>" in answer:
                    continue  # refused (test_refused_instead_of_mis_masked)
                conv = _conv(("system", "Reason step by step."), ("user", q), ("assistant", answer))
                msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
                want = hf_tok.apply_chat_template(msgs, chat_template=source, tokenize=False, **extra)
                assert template.render(conv).text == want
                ids = hf_tok.apply_chat_template(msgs, chat_template=source, tokenize=True, **extra)["input_ids"]
                assert encode_conversation(conv, tok, template).input_ids.tolist() == list(ids)


def test_mask_is_the_answer_and_the_think_block(tok):
    template = load_template("qwen3", tok)
    for q, steps, final in _gsm8k():
        # A demonstration with reasoning, in the two spellings datasets use.
        for content in (f"<think>\n{steps}\n</think>\n\n{final}", f"<think>{steps}</think>{final}"):
            trained, prompt = _masked_text(tok, encode_conversation(_conv(("user", q), ("assistant", content)), tok, template))
            assert trained == f"<think>\n{steps}\n</think>\n\n{final}<|im_end|>"
            assert prompt == f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        # Without reasoning: the empty think block Qwen3 writes into the last turn, then the answer.
        trained, prompt = _masked_text(tok, encode_conversation(_conv(("user", q), ("assistant", final)), tok, template))
        assert trained == f"<think>\n\n</think>\n\n{final}<|im_end|>"
        assert prompt.endswith("<|im_start|>assistant\n")


def test_mask_with_thinking_off_is_the_answer_only(tok):
    template = load_template("qwen3", tok, {"enable_thinking": False})
    for q, steps, final in _gsm8k():
        answer = f"{steps}\n{final}"
        sample = encode_conversation(_conv(("system", "Be brief."), ("user", q), ("assistant", answer)), tok, template)
        trained, prompt = _masked_text(tok, sample)
        assert trained == f"{answer}<|im_end|>"
        assert prompt == (f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n"
                          "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_multi_turn_trains_the_last_turn(tok):
    """Earlier turns are history (Qwen3 writes them without think blocks): untrained, the last one trained."""
    template = load_template("qwen3", tok)
    (q1, s1, f1), (q2, s2, f2) = _gsm8k(2)
    conv = _conv(("user", q1), ("assistant", f"<think>{s1}</think>{f1}"), ("user", q2), ("assistant", f"<think>{s2}</think>{f2}"))
    trained, prompt = _masked_text(tok, encode_conversation(conv, tok, template))
    assert trained == f"<think>\n{s2}\n</think>\n\n{f2}<|im_end|>"
    assert f"<|im_start|>assistant\n{f1}<|im_end|>" in prompt and s1 not in prompt  # history: answer only


def test_transformers_generation_mask_is_empty_for_qwen3(tok, hf_tok):
    """transformers marks assistant tokens only inside {% generation %} tags, which Qwen3's template
    lacks: its mask trains nothing. Ours trains the answer."""
    source = TEMPLATE.read_text(encoding="utf-8")
    q, _, final = _gsm8k(1)[0]
    conv = _conv(("user", q), ("assistant", final))
    msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
    theirs = hf_tok.apply_chat_template(msgs, chat_template=source, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert not any(theirs["assistant_masks"])
    assert encode_conversation(conv, tok, load_template("qwen3", tok)).loss_mask.sum() > 0


BAD_TEMPLATES = {
    # The assistant's text never appears: nothing to train.
    "drops_assistant": ("{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                        "does not write the assistant text verbatim"),
    # No end-of-turn token after the answer: the model would never learn to stop.
    "no_end_of_turn": ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}",
                       "writes no special end-of-turn token"),
    # The prompt cannot be told apart from the answer.
    "ignores_generation_prompt": ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                  "{% endfor %}", "ignores add_generation_prompt"),
}


@pytest.mark.parametrize("name", list(BAD_TEMPLATES))
def test_a_template_that_masks_nothing_fails_loudly(tok, tmp_path, name):
    source, message = BAD_TEMPLATES[name]
    path = tmp_path / f"{name}.jinja"
    path.write_text(source)
    with pytest.raises(TemplateError, match=message):
        load_template(str(path), tok)


def test_refused_instead_of_mis_masked(tok):
    (q1, s1, f1), (q2, s2, f2) = _gsm8k(2)
    # Thinking off puts an empty think block in the prompt; a demonstration with reasoning contradicts it.
    off = load_template("qwen3", tok, {"enable_thinking": False})
    with pytest.raises(DataError, match="not prefix-stable"):
        encode_conversation(_conv(("user", q1), ("assistant", f"<think>{s1}</think>{f1}")), tok, off)
    # Training an earlier turn: Qwen3 renders it with a think block as the last turn, without one as history.
    conv = _conv(("user", q1), ("assistant", f1), ("user", q2), ("assistant", f2), train_last_only=False)
    with pytest.raises(DataError, match="not prefix-stable"):
        encode_conversation(conv, tok, load_template("qwen3", tok))


def test_qwen3_template_by_name_in_a_data_source(tok):
    convs = list(iter_conversations(DataSourceConfig(path=str(GSM8K), adapter="gsm8k", limit=3), ErrorPolicy()))
    template = load_template("qwen3", tok)
    assert template.fingerprint().startswith("jinja:") and "qwen3" in template.name
    for conv in convs:
        trained, _ = _masked_text(tok, encode_conversation(conv, tok, template))
        assert trained == f"<think>\n\n</think>\n\n{conv.messages[-1].content}<|im_end|>"
    with pytest.raises(TemplateError, match="qwen3"):
        load_template("qwen4", tok)
