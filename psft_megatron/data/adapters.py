"""Map raw records of known dataset formats to chat :class:`Conversation` objects.

One small function per format, registered by name:

- ``gsm8k``: ``question`` / ``answer`` (``<<a=b>>`` calculator notes kept or stripped;
  the final ``#### N`` line is always kept).
- ``math``: ``problem`` / ``solution`` (Hendrycks MATH; the answer is in ``\\boxed{}``).
- ``hh_rlhf``: Anthropic HH ``chosen`` transcripts (``\\n\\nHuman:`` / ``\\n\\nAssistant:``)
  as multi-turn chat, trained on the final assistant turn or on every assistant turn.
- ``messages``: a ``messages`` list of ``{role, content}`` (OpenR1-Math style).
- ``generic``: prompt/response columns, or a messages column, named by the config.

Adapters validate what they read and raise :class:`DataError` naming the field.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from .config import AdapterConfig, TrainOn
from .errors import (
    BAD_ROLE,
    EMPTY_FIELD,
    MISSING_BOXED,
    MISSING_FIELD,
    NO_ASSISTANT_TURN,
    NOT_A_STRING,
    WRONG_TYPE,
    DataError,
)
from .types import Conversation, Message, RawRecord

Adapter = Callable[[RawRecord, AdapterConfig], Conversation]
ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str) -> Callable[[Adapter], Adapter]:
    """Decorator: make an adapter available to recipes under ``name``."""

    def deco(fn: Adapter) -> Adapter:
        ADAPTERS[name] = fn
        return fn

    return deco


def get_adapter(name: str) -> Adapter:
    """The adapter registered as ``name`` (ValueError listing the known ones otherwise)."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown adapter {name!r}; known: {sorted(ADAPTERS)}") from None


# ---------------------------------------------------------------- field helpers


def get_text(rec: RawRecord, key: str) -> str:
    """The non-empty string field ``key`` of ``rec``, else a DataError naming it."""
    return check_text(rec, key, key in rec.fields, rec.fields.get(key))


def check_text(rec: RawRecord, label: str, present: bool, value: Any) -> str:
    """Validate one text value found (or not) at ``label`` of ``rec``; return it."""
    if not present or value is None:
        # None counts as missing: Parquet/datasets fill absent columns with null.
        raise DataError.at(rec.provenance, label, MISSING_FIELD, "field is missing")
    if not isinstance(value, str):
        raise DataError.at(rec.provenance, label, NOT_A_STRING, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError.at(rec.provenance, label, EMPTY_FIELD, "field is empty")
    return value


def _with_system(msgs: list[Message], cfg: AdapterConfig) -> list[Message]:
    if cfg.system_prompt and not (msgs and msgs[0].role == "system"):
        return [Message("system", cfg.system_prompt)] + msgs
    return msgs


def _single_turn(rec: RawRecord, cfg: AdapterConfig, prompt: str, pkey: str, response: str, rkey: str) -> Conversation:
    msgs = [Message("user", prompt, source=pkey), Message("assistant", response, train=True, source=rkey)]
    return Conversation(tuple(_with_system(msgs, cfg)), rec.provenance)


def _mark_trained(msgs: list[Message], train_on: TrainOn) -> list[Message]:
    """Set ``train`` on the last (or every) assistant turn; drop turns after the last one."""
    last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
    if last is None:
        return []
    # Turns after the last assistant answer have nothing to train on and would only add prompt.
    msgs = msgs[: last + 1]
    return [
        Message(m.role, m.content, train=(m.role == "assistant" and (train_on == "all" or i == last)), source=m.source)
        for i, m in enumerate(msgs)
    ]


# ---------------------------------------------------------------- adapters

_CALC_NOTE = re.compile(r"<<[^<>]*>>")


@register_adapter("gsm8k")
def gsm8k(rec: RawRecord, cfg: AdapterConfig) -> Conversation:
    """GSM8K: ``question`` -> ``answer`` (worked solution ending in ``#### N``)."""
    q = get_text(rec, "question")
    a = get_text(rec, "answer")
    if cfg.strip_calculator_notes:
        a = _CALC_NOTE.sub("", a)  # "48/2 = <<48/2=24>>24" -> "48/2 = 24"
    return _single_turn(rec, cfg, q, "question", a, "answer")


@register_adapter("math")
def hendrycks_math(rec: RawRecord, cfg: AdapterConfig) -> Conversation:
    """Hendrycks MATH / MATH500: ``problem`` -> ``solution`` with the answer in ``\\boxed{}``."""
    p = get_text(rec, "problem")
    s = get_text(rec, "solution")
    if cfg.require_boxed and "\\boxed" not in s and "\\fbox" not in s:
        raise DataError.at(rec.provenance, "solution", MISSING_BOXED, "solution has no \\boxed{...} answer")
    return _single_turn(rec, cfg, p, "problem", s, "solution")


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@register_adapter("hh_rlhf")
def hh_rlhf(rec: RawRecord, cfg: AdapterConfig) -> Conversation:
    """Anthropic HH-RLHF: split a ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcript into turns.

    Consecutive turns of the same speaker (a few transcripts have them) are joined with a
    blank line so no text is lost; an empty turn is a bad record.
    """
    key = cfg.hh_field
    text = get_text(rec, key)
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise DataError.at(rec.provenance, key, BAD_ROLE, "transcript must start with '\\n\\nHuman:'")
    msgs: list[Message] = []
    for n, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), 1):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if not content:
            raise DataError.at(rec.provenance, key, EMPTY_FIELD, f"turn {n} ({speaker}) is empty")
        if msgs and msgs[-1].role == role:
            msgs[-1] = Message(role, msgs[-1].content + "\n\n" + content, source=key)
        else:
            msgs.append(Message(role, content, source=key))
    msgs = _mark_trained(msgs, cfg.train_on)
    if not msgs:
        raise DataError.at(rec.provenance, key, NO_ASSISTANT_TURN, "transcript has no Assistant turn")
    return Conversation(tuple(_with_system(msgs, cfg)), rec.provenance)


_ROLES = ("system", "user", "assistant")


def _messages_from_list(rec: RawRecord, key: str, cfg: AdapterConfig) -> Conversation:
    if key not in rec.fields or rec.fields[key] is None:
        raise DataError.at(rec.provenance, key, MISSING_FIELD, "field is missing")
    items = rec.fields[key]
    if not isinstance(items, list):
        raise DataError.at(rec.provenance, key, WRONG_TYPE, f"expected a list of messages, got {type(items).__name__}")
    msgs: list[Message] = []
    for i, item in enumerate(items):
        label = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise DataError.at(rec.provenance, label, WRONG_TYPE, f"expected a message object, got {type(item).__name__}")
        rk, ck = f"{label}.{cfg.role_key}", f"{label}.{cfg.content_key}"
        role = check_text(rec, rk, cfg.role_key in item, item.get(cfg.role_key))
        role = cfg.role_map.get(role, role)
        if role not in _ROLES:
            raise DataError.at(rec.provenance, rk, BAD_ROLE, f"role {role!r} is not one of {list(_ROLES)}")
        content = check_text(rec, ck, cfg.content_key in item, item.get(cfg.content_key))
        msgs.append(Message(role, content, source=ck))
    msgs = _mark_trained(msgs, cfg.train_on)
    if not msgs:
        raise DataError.at(rec.provenance, key, NO_ASSISTANT_TURN, "no assistant message")
    return Conversation(tuple(_with_system(msgs, cfg)), rec.provenance)


@register_adapter("messages")
def messages(rec: RawRecord, cfg: AdapterConfig) -> Conversation:
    """A ``messages`` list of ``{role, content}`` dicts (OpenR1-Math, most chat datasets)."""
    return _messages_from_list(rec, cfg.messages_field or "messages", cfg)


@register_adapter("generic")
def generic(rec: RawRecord, cfg: AdapterConfig) -> Conversation:
    """Prompt/response columns (``prompt_field``/``response_field``), or ``messages_field``."""
    if cfg.messages_field:
        return _messages_from_list(rec, cfg.messages_field, cfg)
    p = get_text(rec, cfg.prompt_field)
    r = get_text(rec, cfg.response_field)
    return _single_turn(rec, cfg, p, cfg.prompt_field, r, cfg.response_field)
