"""Loss masks on real data with real tokenizers (../shared), and templates against transformers.

For every adapter and tokenizer/template pair, on a few hundred real records: the masked
tokens decode to exactly the response text plus the end-of-turn token, and the unmasked
tokens contain the prompt.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from psft_megatron.data.adapters import AdapterConfig, get_adapter
from psft_megatron.data.config import DataSourceConfig
from psft_megatron.data.encode import encode_conversation, iter_conversations, iter_tokenized
from psft_megatron.data.errors import DataError, ErrorPolicy
from psft_megatron.data.templates import load_template
from psft_megatron.data.tokenizer import load_tokenizer
from psft_megatron.data.types import Conversation, SkipReport, TokenizedSample

SHARED = Path(__file__).parents[1] / ".." / "shared"
TOK = SHARED / "tokenizers"
GSM8K = SHARED / "data/gsm8k/train.jsonl"
MATH = SHARED / "data/math/math_train_full.jsonl"
MATH500 = SHARED / "data/math/math500_test.jsonl"
HH = SHARED / "data/hh/harmless-base_test.jsonl.gz"

pytestmark = pytest.mark.skipif(not (SHARED / "data").is_dir() or not TOK.is_dir(), reason="../shared not available")

N = 120  # records per source and tokenizer: enough variety, a few seconds in all

# (tokenizer dir/file, template spec, the end-of-turn text that closes every trained span)
PAIRS = {
    "llama2-plain": ("llama2-sentencepiece/tokenizer.model", "plain", "</s>"),
    "llama2-llama2": ("llama2-sentencepiece/tokenizer.model", "llama2", " </s>"),
    "smollm2-jinja": ("smollm2", "auto", "<|im_end|>"),
    "smollm2-chatml": ("smollm2", "chatml", "<|im_end|>"),
    "qwen2-jinja": ("qwen2", "auto", "<|im_end|>"),
    "qwen2-chatml": ("qwen2", "chatml", "<|im_end|>"),
    "llama3-llama3": ("llama3", "llama3", "<|eot_id|>"),
}

_tok_cache: dict[str, object] = {}


def tok_and_template(pair: str):
    path, spec, eot = PAIRS[pair]
    if path not in _tok_cache:
        _tok_cache[path] = load_tokenizer(TOK / path)
    tok = _tok_cache[path]
    return tok, load_template(spec, tok), eot


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of ones."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def check_sample(sample: TokenizedSample, conv: Conversation, tok, eot: str) -> None:
    """Masked tokens decode to each trained turn's text + end of turn; the prompt is unmasked."""
    assert sample.input_ids.dtype == np.int32 and sample.loss_mask.dtype == np.uint8
    trained = [m for m in conv.messages if m.train]
    got = [tok.decode(sample.input_ids[a:b]) for a, b in runs(sample.loss_mask)]
    # (plain/llama2 spans start with the space before the answer, which SentencePiece's decode drops.)
    assert got == [m.content + eot for m in trained], conv.provenance
    unmasked = tok.decode(sample.input_ids[sample.loss_mask == 0])
    for m in conv.messages:
        if not m.train and m.role != "assistant":
            assert m.content in unmasked, conv.provenance
    # The token just before each trained run is prompt: the assistant header never counts.
    for a, _ in runs(sample.loss_mask):
        assert a > 0 and sample.loss_mask[a - 1] == 0


SOURCES = {
    "gsm8k": (GSM8K, "gsm8k", {}),
    "gsm8k-stripped": (GSM8K, "gsm8k", {"strip_calculator_notes": True}),
    "math": (MATH, "math", {}),
    "math500-generic": (MATH500, "generic", {"prompt_field": "problem", "response_field": "solution"}),
    "hh-last": (HH, "hh_rlhf", {}),
    "hh-all": (HH, "hh_rlhf", {"train_on": "all"}),
}


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("source", list(SOURCES))
def test_masks_cover_exactly_the_responses(pair, source):
    tok, template, eot = tok_and_template(pair)
    path, adapter, opts = SOURCES[source]
    cfg = DataSourceConfig(path=str(path), adapter=adapter, adapter_options=opts, limit=N, on_error="skip")
    report = SkipReport()
    convs = list(iter_conversations(cfg, ErrorPolicy("skip", report)))
    assert len(convs) + report.total == N
    for conv in convs:
        check_sample(encode_conversation(conv, tok, template), conv, tok, eot)


def test_messages_adapter_on_real_records(tmp_path):
    """OpenR1-style ``messages`` rows built from real MATH500 and HH records."""
    rows = []
    for line in MATH500.read_text(encoding="utf-8").splitlines()[:40]:
        r = json.loads(line)
        rows.append({"messages": [{"role": "user", "content": r["problem"]}, {"role": "assistant", "content": r["solution"]}]})
    hh_cfg = DataSourceConfig(path=str(HH), adapter="hh_rlhf", limit=40, on_error="skip")
    for conv in iter_conversations(hh_cfg, ErrorPolicy("skip")):
        rows.append({"messages": [{"role": m.role, "content": m.content} for m in conv.messages]})
    f = tmp_path / "openr1_style.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for pair in ("qwen2-jinja", "llama3-llama3", "llama2-plain"):
        tok, template, eot = tok_and_template(pair)
        for train_on in ("last", "all"):
            cfg = DataSourceConfig(path=str(f), adapter="messages", adapter_options={"train_on": train_on})
            convs = list(iter_conversations(cfg, ErrorPolicy("raise")))
            assert len(convs) == len(rows)
            for conv in convs:
                n_asst = sum(m.role == "assistant" for m in conv.messages)
                assert sum(m.train for m in conv.messages) == (n_asst if train_on == "all" else 1)
                check_sample(encode_conversation(conv, tok, template), conv, tok, eot)


def test_hh_final_turn_vs_all_turns():
    tok, template, eot = tok_and_template("smollm2-chatml")
    seen_multi = 0
    for train_on in ("last", "all"):
        cfg = DataSourceConfig(path=str(HH), adapter="hh_rlhf", adapter_options={"train_on": train_on}, limit=60, on_error="skip")
        for conv in iter_conversations(cfg, ErrorPolicy("skip")):
            s = encode_conversation(conv, tok, template)
            asst = [m for m in conv.messages if m.role == "assistant"]
            r = runs(s.loss_mask)
            if train_on == "last":
                assert len(r) == 1 and tok.decode(s.input_ids[r[0][0] : r[0][1]]) == asst[-1].content + eot
                # earlier assistant turns are context, not trained
                unmasked = tok.decode(s.input_ids[s.loss_mask == 0])
                assert all(m.content in unmasked for m in asst[:-1])
                seen_multi += len(asst) > 1
            else:
                assert [tok.decode(s.input_ids[a:b]) for a, b in r] == [m.content + eot for m in asst]
    assert seen_multi > 10


def test_hh_parsing_of_a_real_transcript():
    line = gzip.open(HH, "rt", encoding="utf-8").readline()
    chosen = json.loads(line)["chosen"]
    conv = next(iter_conversations(DataSourceConfig(path=str(HH), adapter="hh_rlhf", limit=1), ErrorPolicy()))
    assert [m.role for m in conv.messages] == ["user", "assistant"] * (len(conv.messages) // 2)
    assert conv.messages[0].content == "what are some pranks with a pen i can do?"
    assert conv.messages[-1].content.startswith("No, sorry!  All of these involve a pen")
    assert "\n\nHuman:" not in "".join(m.content for m in conv.messages)
    assert sum(len(m.content) for m in conv.messages) < len(chosen)
    assert conv.provenance.line == 1 and conv.provenance.path == str(HH)


def test_gsm8k_calculator_notes():
    rec_cfg = dict(path=str(GSM8K), adapter="gsm8k", limit=50)
    keep = list(iter_conversations(DataSourceConfig(**rec_cfg), ErrorPolicy()))
    strip = list(iter_conversations(DataSourceConfig(**rec_cfg, adapter_options={"strip_calculator_notes": True}), ErrorPolicy()))
    assert keep[0].messages[1].content.startswith("Natalia sold 48/2 = <<48/2=24>>24 clips in May.")
    assert strip[0].messages[1].content == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
    )
    assert sum("<<" in c.messages[1].content for c in keep) > 40
    for k, s in zip(keep, strip):
        a = s.messages[1].content
        assert "<<" not in a and ">>" not in a
        assert a.splitlines()[-1] == k.messages[1].content.splitlines()[-1]  # "#### N" kept
        assert a.splitlines()[-1].startswith("#### ")
    tok, template, eot = tok_and_template("qwen2-chatml")
    s = encode_conversation(strip[0], tok, template)
    masked = tok.decode(s.input_ids[s.loss_mask == 1])
    assert masked == strip[0].messages[1].content + eot and "<<" not in masked


# ---------------------------------------------------------------- Jinja vs transformers


@pytest.mark.parametrize("name", ["smollm2", "qwen2"])
def test_jinja_matches_transformers_apply_chat_template(name):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(TOK / name))
    tok = load_tokenizer(TOK / name)
    template = load_template("auto", tok)
    convs = list(iter_conversations(DataSourceConfig(path=str(GSM8K), adapter="gsm8k", limit=15), ErrorPolicy()))
    convs += list(iter_conversations(DataSourceConfig(path=str(HH), adapter="hh_rlhf", adapter_options={"train_on": "all"}, limit=15, on_error="skip"), ErrorPolicy("skip")))
    convs += list(iter_conversations(DataSourceConfig(path=str(MATH500), adapter="math", limit=10, adapter_options={"system_prompt": "Reason step by step."}), ErrorPolicy()))
    for conv in convs:
        msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
        want_ids = ref.apply_chat_template(msgs, tokenize=True)["input_ids"]
        s = encode_conversation(conv, tok, template)
        assert s.input_ids.tolist() == list(want_ids), conv.provenance
        assert template.render(conv).text == ref.apply_chat_template(msgs, tokenize=False)


def test_loss_mask_matches_transformers_generation_mask():
    """With a template that marks assistant text with {% generation %}, transformers computes
    its own assistant mask (return_assistant_tokens_mask); ours, found by prefix rendering,
    must be identical. The hand-written template also uses system extraction, | trim,
    tojson, branch-only set and loop controls, as real templates do."""
    transformers = pytest.importorskip("transformers")
    jinja = Path(__file__).parent / "data" / "template_featureful.jinja"
    source = jinja.read_text(encoding="utf-8")
    opts = {"train_on": "all", "system_prompt": " Answer briefly. "}
    for name in ("qwen2", "smollm2"):
        ref = transformers.AutoTokenizer.from_pretrained(str(TOK / name))
        tok = load_tokenizer(TOK / name)
        template = load_template(str(jinja), tok)
        cfg = DataSourceConfig(path=str(HH), adapter="hh_rlhf", adapter_options=opts, limit=25, on_error="skip")
        for conv in iter_conversations(cfg, ErrorPolicy("skip")):
            msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
            want = ref.apply_chat_template(
                msgs, chat_template=source, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            s = encode_conversation(conv, tok, template)
            assert s.input_ids.tolist() == list(want["input_ids"]), conv.provenance
            assert s.loss_mask.tolist() == list(want["assistant_masks"]), conv.provenance


def test_jinja_and_builtin_chatml_agree_on_ids_and_masks():
    """SmolLM2's template with its default system prompt given explicitly is plain ChatML:
    spans found by prefix rendering must equal the spans the builtin knows by construction."""
    tok = load_tokenizer(TOK / "smollm2")
    jinja, chatml = load_template("auto", tok), load_template("chatml", tok)
    opts = AdapterConfig(system_prompt="You are a helpful AI assistant named SmolLM, trained by Hugging Face", train_on="all")
    cfg = DataSourceConfig(path=str(HH), adapter="hh_rlhf", adapter_options=opts, limit=80, on_error="skip")
    n = 0
    for conv in iter_conversations(cfg, ErrorPolicy("skip")):
        a, b = encode_conversation(conv, tok, jinja), encode_conversation(conv, tok, chatml)
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.loss_mask.tolist() == b.loss_mask.tolist()
        n += 1
    assert n > 70


# ---------------------------------------------------------------- tokenizers


def test_tokenizer_special_ids_and_pad_choice():
    sp = load_tokenizer(TOK / "llama2-sentencepiece/tokenizer.model")
    assert (sp.vocab_size, sp.bos_id, sp.eos_id, sp.unk_id) == (32000, 1, 2, 0)
    assert sp.pad_id == sp.eos_id  # Llama-2 has no pad: EOS by default
    assert load_tokenizer(TOK / "llama2-sentencepiece/tokenizer.model", pad="unk").pad_id == 0
    assert sp.encode("<s>Hi</s>") == [1, sp.token_to_id("▁Hi"), 2]  # special strings -> ids, nothing added
    assert sp.token_to_id("<|im_start|>") is None
    text = "Café ’ 😀\n#### 72"
    assert sp.decode(sp.encode(text)) == text

    smol = load_tokenizer(TOK / "smollm2")
    assert (smol.vocab_size, smol.eos_token, smol.pad_id) == (49152, "<|im_end|>", 2)  # pad from tokenizer_config
    assert smol.chat_template is not None and smol.chat_template_path.endswith("chat_template.jinja")
    qwen = load_tokenizer(TOK / "qwen2")
    assert qwen.eos_id == qwen.token_to_id("<|endoftext|>") == qwen.pad_id
    l3 = load_tokenizer(TOK / "llama3")
    assert (l3.bos_id, l3.eos_id, l3.pad_id, l3.chat_template) == (128000, 128001, 128001, None)
    assert load_tokenizer(TOK / "smollm2", pad="<|endoftext|>").pad_id == 0
    assert load_tokenizer(TOK / "smollm2", pad=5).pad_id == 5
    from psft_megatron.data.errors import TokenizerError

    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load_tokenizer(TOK / "smollm2", pad="<pad>")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        load_tokenizer(TOK / "smollm2", pad=49152)
    with pytest.raises(TokenizerError, match="no unk token"):
        load_tokenizer(TOK / "qwen2", pad="unk")  # Qwen2 has no unk token
    for t in (sp, smol, qwen, l3):
        ids, starts = t.encode_with_offsets(text)
        assert ids == t.encode(text) and len(starts) == len(ids) and starts == sorted(starts)
        assert t.decode(ids) == text
    assert len({t.fingerprint() for t in (sp, smol, qwen, l3)}) == 4


# ---------------------------------------------------------------- the pipeline end to end


def test_iter_tokenized_with_length_policies():
    tok, template, eot = tok_and_template("llama3-llama3")
    base = dict(path=str(GSM8K), adapter="gsm8k", limit=200)
    full = list(iter_tokenized(DataSourceConfig(**base), tok, template))
    assert len(full) == 200
    lengths = np.array([len(s) for s in full])
    cut = int(np.median(lengths))
    rep = SkipReport()
    kept = list(iter_tokenized(DataSourceConfig(**base, max_length=cut), tok, template, rep))
    assert len(kept) == int((lengths <= cut).sum()) and rep.counts == {"too_long": int((lengths > cut).sum())}

    rep = SkipReport()
    trunc = list(iter_tokenized(DataSourceConfig(**base, max_length=cut, long_sample="truncate_response"), tok, template, rep))
    prompts = np.array([int(s.loss_mask.argmax()) for s in full])
    assert rep.counts.get("prompt_too_long", 0) == int((prompts >= cut).sum())
    assert len(trunc) + rep.total == 200
    by_line = {s.provenance.line: s for s in full}
    for s in trunc:
        ref = by_line[s.provenance.line]
        p = int(ref.loss_mask.argmax())
        assert len(s) == min(len(ref), cut) and s.loss_mask.sum() > 0
        assert (s.input_ids == ref.input_ids[: len(s)]).all() and (s.loss_mask == ref.loss_mask[: len(s)]).all()
        assert s.loss_mask[:p].sum() == 0  # the whole prompt is kept, untrained


def test_provenance_names_real_lines():
    tok, template, _ = tok_and_template("qwen2-chatml")
    cfg = DataSourceConfig(path=str(HH), adapter="hh_rlhf", limit=100, on_error="skip")
    rep = SkipReport()
    samples = list(iter_tokenized(cfg, tok, template, rep))
    assert rep.counts == {"empty_field": 1} and rep.examples["empty_field"] == [f"{HH}:87 [chosen]"]
    assert [s.provenance.line for s in samples] == [i for i in range(1, 101) if i != 87]
    with pytest.raises(DataError) as ei:
        list(iter_tokenized(DataSourceConfig(path=str(HH), adapter="hh_rlhf", limit=100), tok, template))
    assert (ei.value.path, ei.value.line, ei.value.field) == (str(HH), 87, "chosen")


def test_adapter_registry():
    assert {"gsm8k", "math", "hh_rlhf", "messages", "generic"} <= set(__import__("psft_megatron.data.adapters", fromlist=["ADAPTERS"]).ADAPTERS)
    with pytest.raises(ValueError, match="unknown adapter"):
        get_adapter("alpaca")
