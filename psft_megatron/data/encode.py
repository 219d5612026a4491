"""Conversation -> TokenizedSample (int32 ids, uint8 loss mask), and the ingest pipeline.

The template renders the whole conversation to one string with the character spans of
the trained turns; the string is tokenised once, so the ids are exactly what
``apply_chat_template(..., tokenize=True)`` gives, and a token is trained when it
*starts* inside a span. A token that starts in the prompt and runs into the response
(possible only when the response begins with whitespace that merges with the header)
stays untrained: prompt text is never trained.

Long samples (``max_length``):

- ``drop``: a sample longer than ``max_length`` is dropped and counted (``too_long``).
- ``truncate_response``: the tokens after ``max_length`` are cut; everything before the
  first trained token (the prompt) is kept whole. When the prompt alone fills
  ``max_length`` no response token is left, so the sample is dropped and counted
  (``prompt_too_long``).

Length drops are always counted in the SkipReport and never raised; every other
:class:`DataError` follows ``on_error``.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from .adapters import get_adapter
from .config import DataSourceConfig, LongSamplePolicy
from .errors import NO_TRAINED_TOKENS, PROMPT_TOO_LONG, TOO_LONG, DataError, ErrorPolicy
from .sources import iter_records
from .templates import ChatTemplate
from .tokenizer import Tokenizer
from .types import Conversation, SkipReport, TokenizedSample

log = logging.getLogger(__name__)


def encode_conversation(
    conv: Conversation,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    max_length: int | None = None,
    long_sample: LongSamplePolicy = "drop",
) -> TokenizedSample:
    """Tokenise ``conv`` with ``template`` and build its loss mask.

    Raises :class:`DataError` (with the record's file, line and field) when the sample
    has no trained token or does not fit ``max_length`` under ``long_sample``.
    """
    rendered = template.render(conv)
    ids_list, starts_list = tokenizer.encode_with_offsets(rendered.text)
    ids = np.asarray(ids_list, dtype=np.int32)
    starts = np.asarray(starts_list, dtype=np.int64)
    mask = np.zeros(ids.shape[0], dtype=np.uint8)
    # Start offsets are non-decreasing, so each span is one contiguous run of tokens.
    for span in rendered.spans:
        lo, hi = np.searchsorted(starts, [span.start, span.end], side="left")
        mask[lo:hi] = 1
    trained = [conv.messages[s.message] for s in rendered.spans]
    field = trained[0].source if trained else None
    if not mask.any():
        raise DataError.at(conv.provenance, field, NO_TRAINED_TOKENS, "no assistant token to train on")
    n = int(ids.shape[0])
    if max_length is not None and n > max_length:
        if long_sample == "drop":
            raise DataError.at(conv.provenance, field, TOO_LONG, f"{n} tokens > max_length {max_length} (long_sample=drop)")
        prompt = int(np.argmax(mask))  # tokens before the first trained one
        if prompt >= max_length:
            raise DataError.at(
                conv.provenance, field, PROMPT_TOO_LONG,
                f"the prompt alone has {prompt} tokens, so no response token fits in max_length {max_length}",
            )
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedSample(input_ids=ids, loss_mask=mask, provenance=conv.provenance)


def iter_conversations(cfg: DataSourceConfig, policy: ErrorPolicy) -> Iterator[Conversation]:
    """Records of ``cfg`` mapped by its adapter; bad records go through ``policy``."""
    adapter = get_adapter(cfg.adapter)
    for rec in iter_records(cfg, policy):
        try:
            conv = adapter(rec, cfg.adapter_options)
        except DataError as e:
            policy.handle(e)
            continue
        yield conv


def iter_tokenized(
    cfg: DataSourceConfig,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    report: SkipReport | None = None,
) -> Iterator[TokenizedSample]:
    """The whole ingest half: source -> adapter -> template -> tokens + loss mask.

    Skipped samples (``on_error="skip"``, and always the length drops) are counted in
    ``report``; pass one to read the counts after iterating. With ``on_error="raise"``
    the first bad record raises a :class:`DataError` naming its file, line and field.
    """
    policy = ErrorPolicy(cfg.on_error, report if report is not None else SkipReport())
    skipped_before = policy.report.total
    for conv in iter_conversations(cfg, policy):
        try:
            sample = encode_conversation(conv, tokenizer, template, cfg.max_length, cfg.long_sample)
        except DataError as e:
            policy.handle(e)
            continue
        yield sample
    if policy.report.total > skipped_before:
        log.warning("%s: %s", cfg.path, policy.report.summary())
