"""Errors for bad input data, and the raise-or-skip policy that handles them.

Every problem with a record (malformed JSON, a missing or empty field, a value of the
wrong type, undecodable bytes, a sample with nothing left to train on, a template
that cannot render it) becomes a :class:`DataError` naming the file, the 1-based line
(or row) and the field. Library exceptions are caught where they happen and re-raised
as a ``DataError`` so a user never has to read a traceback from inside ``json``,
``jinja2`` or ``datasets`` to find the bad record.

Under ``on_error="skip"`` the :class:`ErrorPolicy` counts the error in a
:class:`~psft_megatron.data.types.SkipReport` instead of raising, so no sample is ever
lost without being counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from psft_megatron.errors import UserError

from .types import Provenance, SkipReport

OnError = Literal["raise", "skip"]

# Reasons (SkipReport keys). Kept as constants so tests and reports use one spelling.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
EMPTY_FIELD = "empty_field"
NOT_A_STRING = "not_a_string"
WRONG_TYPE = "wrong_type"  # e.g. messages is not a list of objects
BAD_ROLE = "bad_role"
NO_ASSISTANT_TURN = "no_assistant_turn"
MISSING_BOXED = "missing_boxed"
SPECIAL_TOKEN_IN_CONTENT = "special_token_in_content"
TEMPLATE_RENDER = "template_render"
NO_TRAINED_TOKENS = "no_trained_tokens"
TOO_LONG = "too_long"
PROMPT_TOO_LONG = "prompt_too_long"
# Whole-file and setup problems (never skippable: nothing could be read or encoded).
SOURCE = "source"
TEMPLATE = "template"
TOKENIZER = "tokenizer"

# Samples removed by the max-length policy are expected in any large dataset, so they
# are always dropped and counted, never raised, whatever ``on_error`` says.
LENGTH_REASONS = frozenset({TOO_LONG, PROMPT_TOO_LONG})
# File-level/setup errors are always raised: skipping them would silently lose a whole file.
FATAL_REASONS = frozenset({SOURCE, TEMPLATE, TOKENIZER})


class DataError(UserError, ValueError):
    """A problem with one input record (or a whole file / template), with its location.

    Attributes:
        path: file path, hub dataset name or template name.
        line: 1-based line (JSONL, templates) or row (JSON arrays, Parquet, hub), or None.
        field: the record field (e.g. ``"answer"``, ``"messages[2].content"``), or None.
        reason: a short machine-readable key, used as the SkipReport category.
        detail: the human-readable description of the problem.
    """

    def __init__(
        self,
        path: str,
        line: int | None,
        field: str | None,
        reason: str,
        detail: str,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.reason = reason
        self.detail = detail
        super().__init__(self._format())

    @classmethod
    def at(cls, prov: Provenance, field: str | None, reason: str, detail: str) -> "DataError":
        """Build an error located at a record's provenance."""
        return cls(prov.path, prov.line, field, reason, detail)

    @property
    def where(self) -> str:
        """``path:line [field]``, the short location used in skip reports."""
        loc = self.path if self.line is None else f"{self.path}:{self.line}"
        return loc if self.field is None else f"{loc} [{self.field}]"

    def _format(self) -> str:
        line = "" if self.line is None else f", line {self.line}"
        fld = "" if self.field is None else f", field '{self.field}'"
        return f"{self.path}{line}{fld}: {self.detail} ({self.reason})"

    def __reduce__(self):  # picklable across DataLoader / multiprocessing workers
        return (type(self), (self.path, self.line, self.field, self.reason, self.detail))


class TemplateError(DataError):
    """A chat template that does not fit the tokenizer or cannot be parsed (setup error)."""


class TokenizerError(DataError):
    """A tokenizer that cannot be loaded or lacks a token the pipeline needs (setup error)."""


@dataclass
class ErrorPolicy:
    """Raise or count a :class:`DataError`; shared by every pipeline stage of one source."""

    on_error: OnError = "raise"
    report: SkipReport = field(default_factory=SkipReport)

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")

    def handle(self, err: DataError) -> None:
        """Count ``err`` in the report, or raise it (fatal errors always raise)."""
        if err.reason in FATAL_REASONS:
            raise err
        if err.reason in LENGTH_REASONS or self.on_error == "skip":
            self.report.add(err.reason, err.where)
            return
        raise err
