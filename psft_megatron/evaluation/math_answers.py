"""Math answer checking with math-verify (the paper's checker): gold answer vs a model's generation.

Gold answers are bare strings from the data sets (``18``, ``\\frac{14}{3}``, ``-9867630.0``,
``\\left( 3, \\frac{\\pi}{2} \\right)``); they are wrapped in ``$...$`` so math-verify's LaTeX
extractor reads the LaTeX ones, with a plain-expression fallback. Generations are parsed
with math-verify's defaults (the last boxed answer first, then LaTeX, then the last
expression), after one normalisation: a LaTeX-escaped dollar sign (``\\$18``, common in GSM8K
style answers) is read as a dollar sign, which math-verify otherwise fails to parse at all.

Timeouts and threads: math-verify bounds each call with ``signal.alarm``, which only works on
a process's main thread and *cancels any alarm already pending* (pytest-timeout's default
``signal`` method among them). lm-eval calls the scoring in rank 0's main thread, where the
bound is kept. Off the main thread (or with ``timeout=False``) the calls run without the
alarm instead of raising; tests that need their own timeout intact pass ``timeout=False``.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

__all__ = ["distinct_answers", "is_correct", "mean_and_pass", "parse_gold", "parse_prediction"]

# Seconds per parse / verify call on the main thread (math-verify's own default).
TIMEOUT_S = 5
_GOLD_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]


def _seconds(timeout: bool) -> int | None:
    return TIMEOUT_S if timeout and threading.current_thread() is threading.main_thread() else None


def parse_gold(answer: str, *, timeout: bool = True) -> list[Any]:
    """A bare gold answer as math-verify targets (empty when it cannot be read)."""
    return parse(f"${answer.strip()}$", extraction_config=_GOLD_CONFIG, parsing_timeout=_seconds(timeout))


def parse_prediction(text: str, *, timeout: bool = True) -> list[Any]:
    """The answer math-verify extracts from a generation (empty when there is none)."""
    return parse(text.replace("\\$", "$"), parsing_timeout=_seconds(timeout))


def is_correct(gold: str | list[Any], prediction: str, *, timeout: bool = True) -> bool:
    """math-verify's verdict on one generation; ``gold`` is the bare answer or :func:`parse_gold`'s result."""
    targets = parse_gold(gold, timeout=timeout) if isinstance(gold, str) else gold
    return bool(verify(targets, parse_prediction(prediction, timeout=timeout), timeout_seconds=_seconds(timeout)))


def mean_and_pass(gold: str, generations: Sequence[str], *, timeout: bool = True) -> tuple[float, float]:
    """``(mean@n, pass@n)`` over ``n`` generations for one problem: the fraction correct, and 1 if any is."""
    targets = parse_gold(gold, timeout=timeout)
    hits = [is_correct(targets, g, timeout=timeout) for g in generations]
    if not hits:
        raise ValueError("no generations to score")
    return sum(hits) / len(hits), float(any(hits))


def distinct_answers(generations: Sequence[str], *, timeout: bool = True) -> int:
    """How many different final answers ``generations`` give: answers math-verify judges equal
    (``18``, ``18.0``, ``\\boxed{18}``) count once, and generations without an answer count as one
    more answer between them. A diversity signal for sampled runs: a model whose distribution has
    collapsed gives the same answer n times, right or wrong."""
    classes: list[list[Any]] = []
    unanswered = False
    for text in generations:
        parsed = parse_prediction(text, timeout=timeout)
        if not parsed:
            unanswered = True
            continue
        # Equal both ways: math-verify's verify(gold, pred) is not symmetric for every pair of forms.
        if not any(verify(c, parsed, timeout_seconds=_seconds(timeout)) and verify(parsed, c, timeout_seconds=_seconds(timeout))
                   for c in classes):
            classes.append(parsed)
    return len(classes) + int(unanswered)
