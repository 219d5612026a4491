"""Bad input: every case raises a DataError naming file, line and field, or is skipped and counted.

Fixtures are tiny hand-written files in tests/data/. The tokenizer is a small byte-level
BPE trained here with ChatML special tokens, so these tests need nothing from ../shared.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from psft_megatron.data.config import DataSourceConfig
from psft_megatron.data.encode import iter_tokenized
from psft_megatron.data.errors import DataError, ErrorPolicy, TemplateError
from psft_megatron.data.sources import iter_records
from psft_megatron.data.templates import load_template
from psft_megatron.data.tokenizer import load_tokenizer
from psft_megatron.data.types import SkipReport

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).parents[1] / ".." / "shared"


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    """A byte-level BPE tokenizer with ChatML special tokens, written as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(DATA.glob("*.json*"))]
    tk.train_from_iterator(corpus * 5, trainer)
    d = tmp_path_factory.mktemp("tiny_tok")
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def chatml(tiny_tok):
    return load_template("chatml", tiny_tok)


def run(path: Path, adapter: str, tok, template, **kw):
    """All samples plus the skip report of one source under on_error=skip."""
    report = SkipReport()
    cfg = DataSourceConfig(path=str(path), adapter=adapter, on_error="skip", **kw)
    return list(iter_tokenized(cfg, tok, template, report)), report


def first_error(path: Path, adapter: str, tok, template, **kw) -> DataError:
    cfg = DataSourceConfig(path=str(path), adapter=adapter, on_error="raise", **kw)
    with pytest.raises(DataError) as ei:
        list(iter_tokenized(cfg, tok, template))
    return ei.value


def assert_names(err: DataError, path: Path, line: int | None, field: str | None, reason: str) -> None:
    """The error carries the location as attributes and in its message."""
    assert (Path(err.path).name, err.line, err.field, err.reason) == (path.name, line, field, reason), str(err)
    msg = str(err)
    assert path.name in msg
    if line is not None:
        assert f"line {line}" in msg
    if field is not None:
        assert f"'{field}'" in msg


# ---------------------------------------------------------------- source-level problems


def test_malformed_json_line(tiny_tok, chatml):
    p = DATA / "malformed_json.jsonl"
    assert_names(first_error(p, "gsm8k", tiny_tok, chatml), p, 2, None, "malformed_json")
    samples, rep = run(p, "gsm8k", tiny_tok, chatml)
    # line 4 is a JSON array, line 5 blank (not a record), lines 1, 3, 6 good
    assert [s.provenance.line for s in samples] == [1, 3, 6]
    assert rep.counts == {"malformed_json": 1, "not_an_object": 1}
    assert rep.examples["not_an_object"] == [f"{p}:4"]


def test_invalid_utf8_line(tiny_tok, chatml):
    p = DATA / "invalid_utf8.jsonl"
    err = first_error(p, "gsm8k", tiny_tok, chatml)
    assert_names(err, p, 3, None, "invalid_utf8")
    assert "0xe9" in str(err)
    samples, rep = run(p, "gsm8k", tiny_tok, chatml)
    assert [s.provenance.line for s in samples] == [1, 2, 4]  # the valid UTF-8 "Café" on line 2 is kept
    assert rep.counts == {"invalid_utf8": 1}


def test_json_array_with_non_object(tiny_tok, chatml):
    p = DATA / "array_bad.json"
    assert_names(first_error(p, "generic", tiny_tok, chatml), p, 2, None, "not_an_object")
    samples, rep = run(p, "generic", tiny_tok, chatml)
    assert [s.provenance.line for s in samples] == [1, 3]
    assert rep.counts == {"not_an_object": 1}


def test_malformed_json_document_is_fatal(tiny_tok, chatml):
    """A JSON document that does not parse loses the whole file: raised even under skip."""
    p = DATA / "malformed_document.json"
    for on_error in ("raise", "skip"):
        cfg = DataSourceConfig(path=str(p), adapter="generic", on_error=on_error)
        with pytest.raises(DataError) as ei:
            list(iter_tokenized(cfg, tiny_tok, chatml))
        assert_names(ei.value, p, 3, None, "malformed_json")


def test_missing_file_and_truncated_gzip(tmp_path, tiny_tok, chatml):
    cfg = DataSourceConfig(path=str(tmp_path / "nope.jsonl"), adapter="gsm8k", on_error="skip")
    with pytest.raises(DataError, match="file not found"):
        list(iter_tokenized(cfg, tiny_tok, chatml))
    import gzip

    blob = gzip.compress((DATA / "gsm8k_bad_fields.jsonl").read_bytes())
    bad = tmp_path / "cut.jsonl.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cannot read file") as ei:
        list(iter_records(DataSourceConfig(path=str(bad), on_error="skip")))
    assert ei.value.path == str(bad) and ei.value.line is not None


# ---------------------------------------------------------------- record-level problems


def test_missing_empty_and_non_string_fields(tiny_tok, chatml):
    p = DATA / "gsm8k_bad_fields.jsonl"
    assert_names(first_error(p, "gsm8k", tiny_tok, chatml), p, 2, "answer", "missing_field")
    samples, rep = run(p, "gsm8k", tiny_tok, chatml)
    assert [s.provenance.line for s in samples] == [1, 6]
    assert rep.counts == {
        "missing_field": 2,  # line 2 (no answer), line 5 (question null)
        "empty_field": 1,  # line 3 (whitespace question)
        "not_a_string": 1,  # line 4 (answer 8)
        "special_token_in_content": 1,  # line 7 (question spells <|im_end|>)
    }
    assert rep.examples["missing_field"] == [f"{p}:2 [answer]", f"{p}:5 [question]"]
    assert rep.examples["empty_field"] == [f"{p}:3 [question]"]
    assert rep.examples["not_a_string"] == [f"{p}:4 [answer]"]
    assert rep.examples["special_token_in_content"] == [f"{p}:7 [question]"]
    assert len(samples) + rep.total == 7  # nothing lost uncounted


def test_messages_bad_records(tiny_tok, chatml):
    p = DATA / "messages_bad.jsonl"
    assert_names(first_error(p, "messages", tiny_tok, chatml), p, 2, "messages[1].content", "missing_field")
    samples, rep = run(p, "messages", tiny_tok, chatml)
    assert [s.provenance.line for s in samples] == [1]
    assert rep.counts == {
        "missing_field": 3,  # content null (2), no role key (8), no messages key (9)
        "not_a_string": 1,  # content is a list (3)
        "bad_role": 1,  # role "robot" (4)
        "no_assistant_turn": 1,  # only user turns (5)
        "wrong_type": 2,  # messages is a string (6), a message is a string (7)
    }
    assert rep.examples["bad_role"] == [f"{p}:4 [messages[1].role]"]
    assert rep.examples["not_a_string"] == [f"{p}:3 [messages[1].content]"]
    assert rep.examples["wrong_type"] == [f"{p}:6 [messages]", f"{p}:7 [messages[1]]"]
    assert rep.examples["missing_field"] == [f"{p}:2 [messages[1].content]", f"{p}:8 [messages[1].role]", f"{p}:9 [messages]"]


def test_hh_bad_records(tiny_tok, chatml):
    p = DATA / "hh_bad.jsonl"
    err = first_error(p, "hh_rlhf", tiny_tok, chatml)
    assert_names(err, p, 2, "chosen", "empty_field")
    assert "turn 2 (Assistant) is empty" in str(err)
    samples, rep = run(p, "hh_rlhf", tiny_tok, chatml)
    assert [s.provenance.line for s in samples] == [1]
    assert rep.counts == {"empty_field": 1, "no_assistant_turn": 1, "bad_role": 1, "missing_field": 1}
    assert rep.examples["missing_field"] == [f"{p}:5 [chosen]"]


# ---------------------------------------------------------------- length policy


def test_no_trained_tokens_left_after_truncation(tiny_tok, chatml):
    """The prompt alone fills max_length: dropped and counted (even under raise), naming the field."""
    p = DATA / "data_wrapper.json"
    full, _ = run(p, "generic", tiny_tok, chatml)
    prompt_len = int(full[0].loss_mask.argmax())
    cfg = DataSourceConfig(
        path=str(p), adapter="generic", max_length=prompt_len, long_sample="truncate_response", on_error="raise"
    )
    rep = SkipReport()
    kept = list(iter_tokenized(cfg, tiny_tok, chatml, rep))
    assert rep.counts.get("prompt_too_long", 0) + len(kept) == 2
    assert rep.examples["prompt_too_long"][0] == f"{p}:1 [response]"
    # The error itself names file, row and field.
    from psft_megatron.data.adapters import generic
    from psft_megatron.data.encode import encode_conversation

    rec = next(iter_records(DataSourceConfig(path=str(p))))
    with pytest.raises(DataError) as ei:
        encode_conversation(generic(rec, cfg.adapter_options), tiny_tok, chatml, prompt_len, "truncate_response")
    assert_names(ei.value, p, 1, "response", "prompt_too_long")
    assert "no response token fits" in str(ei.value)

    # One more token: the sample survives with exactly one trained token (the response's first).
    cfg1 = DataSourceConfig(path=str(p), adapter="generic", max_length=prompt_len + 1, long_sample="truncate_response")
    s = next(iter_tokenized(cfg1, tiny_tok, chatml))
    assert len(s) == prompt_len + 1 and int(s.loss_mask.sum()) == 1
    assert (s.input_ids == full[0].input_ids[: prompt_len + 1]).all()


def test_drop_policy_counts_long_samples(tiny_tok, chatml):
    p = DATA / "data_wrapper.json"
    full, _ = run(p, "generic", tiny_tok, chatml)
    cut = max(len(s) for s in full) - 1
    rep = SkipReport()
    kept = list(iter_tokenized(DataSourceConfig(path=str(p), adapter="generic", max_length=cut), tiny_tok, chatml, rep))
    assert len(kept) + rep.counts["too_long"] == 2 and rep.counts["too_long"] >= 1
    assert all(len(s) <= cut for s in kept)


# ---------------------------------------------------------------- templates


def test_jinja_template_unknown_variable(tiny_tok):
    p = DATA / "template_unknown_var.jinja"
    with pytest.raises(TemplateError) as ei:
        load_template(str(p), tiny_tok)
    assert_names(ei.value, p, 3, "assistant_prefix", "template")
    # Declaring it makes the template usable.
    t = load_template(str(p), tiny_tok, template_vars={"assistant_prefix": ""})
    assert t.name == str(p)


def test_jinja_template_syntax_error(tiny_tok):
    p = DATA / "template_syntax_error.jinja"
    with pytest.raises(TemplateError) as ei:
        load_template(str(p), tiny_tok)
    assert Path(ei.value.path).name == p.name and ei.value.line == 4 and "syntax" in str(ei.value)


def test_jinja_raise_exception_is_a_per_sample_error(tiny_tok):
    """A template that rejects some conversations (system turns) fails those samples only."""
    p = DATA / "template_no_system.jinja"
    t = load_template(str(p), tiny_tok)
    data = DATA / "data_wrapper.json"
    ok, rep = run(data, "generic", tiny_tok, t)
    assert len(ok) == 2 and rep.total == 0
    bad, rep = run(data, "generic", tiny_tok, t, adapter_options={"system_prompt": "Be brief."})
    assert bad == [] and rep.counts == {"template_render": 2}
    err = first_error(data, "generic", tiny_tok, t, adapter_options={"system_prompt": "Be brief."})
    assert err.line == 1 and "System role not supported" in str(err)


def test_builtin_template_tokens_missing_from_vocab(tiny_tok):
    with pytest.raises(TemplateError) as ei:
        load_template("llama3", tiny_tok)
    assert ei.value.field == "<|begin_of_text|>" and "not a single token" in str(ei.value)


@pytest.mark.skipif(not (SHARED / "tokenizers").is_dir(), reason="../shared/tokenizers not available")
def test_chatml_needs_its_tokens_in_real_vocabs():
    sp = load_tokenizer(SHARED / "tokenizers/llama2-sentencepiece/tokenizer.model")
    l3 = load_tokenizer(SHARED / "tokenizers/llama3")
    for tok in (sp, l3):
        with pytest.raises(TemplateError) as ei:
            load_template("chatml", tok)
        assert ei.value.field == "<|im_start|>" and "chatml" in str(ei.value)
    # SmolLM2's own Jinja template with Llama-2's vocabulary.
    jinja = SHARED / "tokenizers/smollm2/chat_template.jinja"
    with pytest.raises(TemplateError) as ei:
        load_template(str(jinja), sp)
    assert ei.value.field == "<|im_start|>" and ei.value.path == str(jinja)
    with pytest.raises(TemplateError) as ei:
        load_template("auto", l3)  # llama3 ships no template
    assert ei.value.field == "chat_template"


# ---------------------------------------------------------------- the policy object


def test_error_policy_and_pickling():
    err = DataError("f.jsonl", 7, "answer", "empty_field", "field is empty")
    assert str(err) == "f.jsonl, line 7, field 'answer': field is empty (empty_field)"
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.line, again.field, again.reason, str(again)) == (err.path, 7, "answer", "empty_field", str(err))
    pol = ErrorPolicy("raise")
    with pytest.raises(DataError):
        pol.handle(err)
    pol.handle(DataError("f.jsonl", 8, "answer", "too_long", "x"))  # length drops are counted, not raised
    assert pol.report.counts == {"too_long": 1}
    with pytest.raises(DataError):
        ErrorPolicy("skip").handle(DataError("f.jsonl", None, None, "source", "file not found"))
    with pytest.raises(ValueError):
        ErrorPolicy("ignore")  # type: ignore[arg-type]
