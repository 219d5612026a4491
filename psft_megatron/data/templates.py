"""Chat templates: render a conversation to text plus the character spans to train on.

A template returns :class:`Rendered`: the full text and, for every trained assistant
turn, the character span ``[start, end)`` of its content plus the end-of-turn token
that follows it (``<|im_end|>``, ``<|eot_id|>``, ``</s>``). ``encode.py`` tokenises the
*whole* text once (so ids equal ``apply_chat_template(..., tokenize=True)``) and marks
the tokens that start inside a span. Prompt text, including the assistant header
(``<|im_start|>assistant\\n``) and anything after the end-of-turn token (ChatML's
``\\n``), is never trained.

Built-in templates (``chatml`` for Qwen/SmolLM2, ``llama3``, ``llama2``, ``plain``) know
their spans by construction. Bundled Jinja templates (``qwen3``: Qwen3's own, with its
``<think>`` handling, in ``chat_templates/``) are used as a tokenizer's template would be.

Jinja templates (the tokenizer's own, or a ``.jinja`` file) are rendered the way
Hugging Face's ``apply_chat_template`` renders them (sandboxed jinja2, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``bos_token``/``eos_token``). Spans are found by
rendering prefix by prefix: for trained assistant turn ``k``,
``P = render(messages[:k], add_generation_prompt=True)`` ends with the assistant header
and ``Q = render(messages[:k+1])`` adds the turn, so the turn's text is ``Q[len(P):]``;
it is trained from its start up to the end of the first special token after the
content (the end of turn): everything the model writes in that turn after the generation
prompt. A template that moves a reasoning block (Qwen3 writes a demonstration's
``<think>...</think>`` re-spaced, as ``<think>\nR\n</think>\n\n`` ahead of the answer) is
located by its reasoning and its answer, each written verbatim, so the think block is trained
with the answer; an empty one (Qwen3 writes ``<think>\n\n</think>\n\n`` into the last turn of a
demonstration without reasoning) is trained too, unless the generation prompt already holds it
(Qwen3 with ``enable_thinking: false``). Both ``P`` and ``Q`` must be prefixes of the full render,
otherwise the template is not prefix-stable (e.g. it rewrites earlier turns) and the
sample is rejected, since no honest mask exists for it. This needs no sentinel
strings that could merge with neighbouring text in the tokenizer.

Templates are checked against the tokenizer when built (:func:`load_template`): the
special tokens they write must be single tokens of the vocabulary, and a Jinja
template may only use the variables ``apply_chat_template`` provides.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from .errors import SPECIAL_TOKEN_IN_CONTENT, TEMPLATE, TEMPLATE_RENDER, DataError, TemplateError
from .tokenizer import Tokenizer, special_token_regex
from .types import Conversation, Message, Provenance


@dataclass(frozen=True)
class Span:
    """Trained characters ``text[start:end]`` of one assistant turn (``message`` index)."""

    start: int
    end: int
    message: int


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[Span, ...]


class ChatTemplate(Protocol):
    name: str

    def render(self, conv: Conversation) -> Rendered: ...

    def fingerprint(self) -> str: ...


BUILTIN_TEMPLATES = ("chatml", "llama3", "llama2", "plain")
# Jinja templates shipped with the package (name -> file in chat_templates/), for tokenizers that
# lack their model's template (tests use Qwen3's with the Qwen2 tokenizer it extends).
BUNDLED_TEMPLATES = {"qwen3": "qwen3.jinja"}
_BUNDLED_DIR = Path(__file__).parent / "chat_templates"


def load_template(
    spec: str | None,
    tokenizer: Tokenizer,
    template_vars: dict[str, Any] | None = None,
) -> ChatTemplate:
    """The chat template named by ``spec``, checked against ``tokenizer``.

    ``spec``: ``None``/``"auto"``/``"tokenizer"`` = the tokenizer's own Jinja template;
    ``"chatml"``, ``"llama3"``, ``"llama2"``, ``"plain"`` = built-ins; ``"qwen3"`` = a bundled
    Jinja template (:data:`BUNDLED_TEMPLATES`); otherwise a path to a ``.jinja`` file. ``template_vars`` are extra variables for a Jinja template
    (e.g. ``{"enable_thinking": False}``).
    """
    if spec in (None, "auto", "tokenizer"):
        if tokenizer.chat_template is None:
            raise TemplateError(
                tokenizer.name, None, "chat_template", TEMPLATE,
                f"tokenizer has no chat template; choose one of {list(BUILTIN_TEMPLATES)} or a .jinja file",
            )
        return JinjaTemplate(tokenizer.chat_template, tokenizer, tokenizer.chat_template_path or tokenizer.name, template_vars)
    if spec in BUILTIN_TEMPLATES:
        return BuiltinTemplate(spec, tokenizer)
    if spec in BUNDLED_TEMPLATES:
        path = _BUNDLED_DIR / BUNDLED_TEMPLATES[spec]
        return JinjaTemplate(path.read_text(encoding="utf-8"), tokenizer, f"{spec} ({path.name})", template_vars)
    path = Path(spec)
    if not path.is_file():
        raise TemplateError(str(spec), None, None, TEMPLATE,
                            f"not a built-in template {list(BUILTIN_TEMPLATES) + list(BUNDLED_TEMPLATES)} nor a file")
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(str(path), None, None, TEMPLATE, f"template is not UTF-8: {e}") from None
    return JinjaTemplate(source, tokenizer, str(path), template_vars)


def _check_content(conv: Conversation, special: re.Pattern | None) -> None:
    """Reject content that spells a special token: it would be parsed as the real token
    (e.g. a stray ``<|im_end|>`` ending the turn early), corrupting the sample and mask."""
    if special is None:
        return
    for i, m in enumerate(conv.messages):
        hit = special.search(m.content)
        if hit:
            raise DataError.at(
                conv.provenance, m.source or f"messages[{i}].content", SPECIAL_TOKEN_IN_CONTENT,
                f"text contains the special token {hit.group()!r}",
            )


# ---------------------------------------------------------------- built-in templates

# Each builtin lists the special tokens it writes, and maps messages to text segments;
# a segment tagged with a message index is trained.
Segments = list[tuple[str, int | None]]


def _chatml(msgs: Sequence[Message], tok: Tokenizer) -> Segments:
    out: Segments = []
    for i, m in enumerate(msgs):
        if m.role == "assistant":
            out += [("<|im_start|>assistant\n", None), (m.content + "<|im_end|>", i if m.train else None), ("\n", None)]
        else:
            out.append((f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n", None))
    return out


def _llama3(msgs: Sequence[Message], tok: Tokenizer) -> Segments:
    out: Segments = [("<|begin_of_text|>", None)]
    for i, m in enumerate(msgs):
        out.append((f"<|start_header_id|>{m.role}<|end_header_id|>\n\n", None))
        if m.role == "assistant":
            out.append((m.content + "<|eot_id|>", i if m.train else None))
        else:
            out.append((m.content + "<|eot_id|>", None))
    return out


def _llama2(msgs: Sequence[Message], tok: Tokenizer) -> Segments:
    # Meta's Llama-2-chat format: <s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST] A </s>
    out: Segments = []
    system = None
    for i, m in enumerate(msgs):
        if m.role == "system":
            system = m.content
        elif m.role == "user":
            text = m.content if system is None else f"<<SYS>>\n{system}\n<</SYS>>\n\n{m.content}"
            system = None
            out.append((f"{tok.bos_token or ''}[INST] {text} [/INST]", None))
        else:
            # The space belongs to the answer: SentencePiece starts the first word with it ("▁Sure").
            out.append((f" {m.content} {tok.eos_token}", i if m.train else None))
    return out


def _plain(msgs: Sequence[Message], tok: Tokenizer) -> Segments:
    # For base models: "<s>System\n\nUser: Q\n\nAssistant: A</s>User: ..."
    out: Segments = [(tok.bos_token or "", None)]
    for i, m in enumerate(msgs):
        if m.role == "system":
            out.append((m.content + "\n\n", None))
        elif m.role == "user":
            out.append((f"User: {m.content}\n\nAssistant:", None))
        else:
            # The space belongs to the answer so that "▁Natalia"/"ĠNatalia" starts inside it.
            out.append((f" {m.content}{tok.eos_token}", i if m.train else None))
    return out


_BUILTINS: dict[str, tuple[Callable[[Sequence[Message], Tokenizer], Segments], tuple[str, ...]]] = {
    "chatml": (_chatml, ("<|im_start|>", "<|im_end|>")),
    "llama3": (_llama3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "llama2": (_llama2, ()),
    "plain": (_plain, ()),
}


def _require_tokens(name: str, tokenizer: Tokenizer, tokens: Sequence[str]) -> None:
    for t in tokens:
        tid = tokenizer.token_to_id(t)
        if tid is None or tokenizer.encode(t) != [tid]:
            raise TemplateError(
                f"template '{name}'", None, t, TEMPLATE,
                f"special token {t!r} is not a single token of tokenizer {tokenizer.name}",
            )


class BuiltinTemplate:
    """One of the built-in formats, with spans known by construction."""

    def __init__(self, name: str, tokenizer: Tokenizer) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self._fn, required = _BUILTINS[name]
        needed = list(required) + [tokenizer.eos_token] + ([tokenizer.bos_token] if name == "llama2" else [])
        if name == "llama2" and tokenizer.bos_token is None:
            raise TemplateError(f"template '{name}'", None, "bos_token", TEMPLATE, f"tokenizer {tokenizer.name} has no BOS token")
        _require_tokens(name, tokenizer, needed)
        self._special = special_token_regex(list(tokenizer.special_tokens))

    def render(self, conv: Conversation) -> Rendered:
        """Text of ``conv`` and the character spans of its trained turns."""
        _check_content(conv, self._special)
        parts: list[str] = []
        spans: list[Span] = []
        pos = 0
        for text, msg in self._fn(conv.messages, self.tokenizer):
            if msg is not None:
                spans.append(Span(pos, pos + len(text), msg))
            parts.append(text)
            pos += len(text)
        return Rendered("".join(parts), tuple(spans))

    def fingerprint(self) -> str:
        return f"builtin:{self.name}"


# ---------------------------------------------------------------- Jinja templates

# Variables Hugging Face's apply_chat_template provides, plus common optional kwargs that
# templates test with "is defined"; anything else is a typo or needs template_vars.
_KNOWN_VARS = frozenset({
    "messages", "add_generation_prompt", "continue_final_message", "bos_token", "eos_token",
    "pad_token", "unk_token", "tools", "documents", "raise_exception", "strftime_now",
    "enable_thinking", "date_string", "custom_tools", "tools_in_user_message", "builtin_tools",
    "add_vision_id", "reasoning_effort", "range", "namespace", "dict", "lipsum", "cycler", "joiner",
})
# No system turn: some templates (e.g. Gemma) reject one. Only the last turn is trained: a template
# may render history turns differently (Qwen3 drops their think blocks), which makes an earlier
# trained turn unlocatable; such a sample is refused on its own, the template is not.
_PROBE = (
    Message("user", "What is 2 + 2?"),
    Message("assistant", "2 + 2 = 4."),
    Message("user", "And 3 + 3?"),
    Message("assistant", "3 + 3 = 6.", train=True),
)
# Strings that look like special tokens, to catch a template written for another vocabulary.
_SPECIAL_LIKE = re.compile(r"<\|[^|<>\s]{1,64}\|>")


def _tojson(x: Any, indent: int | None = None, **kw: Any) -> str:
    return json.dumps(x, indent=indent, ensure_ascii=False, **kw)  # as transformers does


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError as JinjaTemplateError

    raise JinjaTemplateError(message)


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def _content_end(turn: str, content: str) -> int:
    """Where the assistant text ends in its rendered ``turn`` (-1: not written there).

    Verbatim, or stripped (templates that apply ``| trim``), or for a message that starts with a
    ``<think>...</think>`` reasoning block, its reasoning and then its answer each verbatim
    (templates that re-space the block, as Qwen3's and DeepSeek-R1's do)."""
    for text in (content, content.strip()):
        at = turn.find(text)
        if at >= 0:
            return at + len(text)
    if _THINK_CLOSE in content:
        reasoning, answer = content.rsplit(_THINK_CLOSE, 1)
        reasoning, answer = reasoning.split(_THINK_OPEN)[-1].strip(), answer.strip()
        at = turn.find(reasoning)
        after = turn.find(answer, at + len(reasoning)) if at >= 0 else -1
        if after >= 0:
            return after + len(answer)
    return -1


class JinjaTemplate:
    """A Hugging Face style Jinja chat template, with spans found prefix by prefix."""

    def __init__(
        self,
        source: str,
        tokenizer: Tokenizer,
        origin: str,
        template_vars: dict[str, Any] | None = None,
    ) -> None:
        import jinja2
        from jinja2 import meta, nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _Generation(Extension):
            # HF's {% generation %} marks assistant text for return_assistant_tokens_mask;
            # our spans come from prefix rendering, so the tag only renders its body.
            tags = {"generation"}

            def parse(self, parser):  # type: ignore[no-untyped-def]
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return nodes.Scope(body).set_lineno(lineno)

        self.name = origin
        self.source = source
        self.tokenizer = tokenizer
        self.template_vars = dict(template_vars or {})
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            ast = env.parse(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(origin, e.lineno, None, TEMPLATE, f"Jinja syntax error: {e.message}") from None
        # find_undeclared_variables also reports names set only in some branches of an
        # {% if %}; a name the template assigns anywhere is its own business.
        assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
        unknown = sorted(meta.find_undeclared_variables(ast) - assigned - _KNOWN_VARS - set(self.template_vars))
        if unknown:
            var = unknown[0]
            line = min((n.lineno for n in ast.find_all(nodes.Name) if n.name == var), default=None)
            raise TemplateError(
                origin, line, var, TEMPLATE,
                f"template uses unknown variable {var!r} (pass it in template_vars if it is intended)",
            )
        self._tmpl = env.from_string(source)
        self._vars: dict[str, Any] = {"tools": None, "documents": None}
        for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = getattr(tokenizer, k, None)
            if v is not None:  # HF leaves absent special tokens undefined, not None
                self._vars[k] = v
        self._vars.update(self.template_vars)
        self._special = special_token_regex(list(tokenizer.special_tokens))
        self._check_probe()

    def _render(self, conv: Conversation, msgs: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2.exceptions import TemplateError as JinjaTemplateError

        try:
            return self._tmpl.render(messages=msgs, add_generation_prompt=add_generation_prompt, **self._vars)
        except JinjaTemplateError as e:  # includes raise_exception(...) and undefined attributes
            raise DataError.at(conv.provenance, None, TEMPLATE_RENDER, f"template {self.name} failed: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # from template expressions
            raise DataError.at(
                conv.provenance, None, TEMPLATE_RENDER, f"template {self.name} failed: {type(e).__name__}: {e}"
            ) from None

    def _check_probe(self) -> None:
        """Render a small two-turn chat to check that the template fits the tokenizer."""
        probe = Conversation(_PROBE, Provenance(f"probe conversation for {self.name}", 0))
        msgs = [{"role": m.role, "content": m.content} for m in probe.messages]
        try:
            text = self._render(probe, msgs, False)
            for m in _SPECIAL_LIKE.finditer(text):
                if self.tokenizer.token_to_id(m.group()) is None:
                    raise TemplateError(
                        self.name, None, m.group(), TEMPLATE,
                        f"template writes {m.group()!r}, which is not a token of tokenizer {self.tokenizer.name}",
                    )
            if self._render(probe, msgs[:1], True) == self._render(probe, msgs[:1], False):
                raise TemplateError(
                    self.name, None, "add_generation_prompt", TEMPLATE,
                    "template ignores add_generation_prompt, so the assistant header cannot be told apart from the answer",
                )
            self._spans(probe)
        except TemplateError:
            raise
        except DataError as e:
            raise TemplateError(self.name, None, e.field, TEMPLATE, e.detail) from None

    def render(self, conv: Conversation) -> Rendered:
        """Text of ``conv`` and the character spans of its trained turns."""
        _check_content(conv, self._special)
        return self._spans(conv)

    def _spans(self, conv: Conversation) -> Rendered:
        msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
        full = self._render(conv, msgs, False)
        spans: list[Span] = []
        for k, m in enumerate(conv.messages):
            if not m.train:
                continue
            field = m.source or f"messages[{k}].content"
            if _content_end(full, m.content) < 0:  # nothing of it to train, wherever the spans would be
                raise DataError.at(
                    conv.provenance, field, TEMPLATE_RENDER, f"template {self.name} does not write the assistant text verbatim"
                )
            prefix = self._render(conv, msgs[:k], True)
            upto = self._render(conv, msgs[: k + 1], False)
            if not (upto.startswith(prefix) and full.startswith(upto)):
                raise DataError.at(
                    conv.provenance, field, TEMPLATE_RENDER,
                    f"template {self.name} is not prefix-stable here (it renders a turn differently once later "
                    "turns exist), so the trained tokens cannot be located",
                )
            turn = upto[len(prefix):]
            end = _content_end(turn, m.content)
            if end < 0:
                raise DataError.at(
                    conv.provenance, field, TEMPLATE_RENDER, f"template {self.name} does not write the assistant text verbatim"
                )
            eot = self._special.search(turn, end) if self._special else None
            if eot is None:
                raise DataError.at(
                    conv.provenance, field, TEMPLATE_RENDER,
                    f"template {self.name} writes no special end-of-turn token of tokenizer "
                    f"{self.tokenizer.name} after the assistant text",
                )
            # Text between the generation prompt and the content (e.g. an empty <think></think>)
            # is trained too: the model has to generate it.
            spans.append(Span(len(prefix), len(prefix) + eot.end(), k))
        return Rendered(full, tuple(spans))

    def fingerprint(self) -> str:
        h = hashlib.sha256((self.source + repr(sorted(self.template_vars.items()))).encode()).hexdigest()[:16]
        return f"jinja:{h}"
