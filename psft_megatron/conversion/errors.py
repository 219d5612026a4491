"""The converters' error type and a one-line description of a library exception.

Library exceptions (``json``, ``pickle``, torch's dist-checkpoint reader, ``OSError``)
are caught where they happen and re-raised as :class:`ConversionError` naming the file,
so the command-line tools print one line instead of a traceback.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TypeVar

from psft_megatron.errors import UserError

__all__ = ["ConversionError", "describe", "size_text", "writing_to", "wrapped"]

E = TypeVar("E", bound=BaseException)


class ConversionError(UserError, ValueError):
    """The input cannot be converted exactly, or the output cannot be written; the message says why."""


def _failures(e: BaseException) -> list[BaseException]:
    """The per-rank errors a torch ``CheckpointException`` carries (``failures``: rank ->
    ``(exception, stack summary)``); none for any other exception."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict):
        return []
    found = [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return [f for f in found if isinstance(f, BaseException)]


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e``, then what it wraps: the per-rank errors of torch's ``CheckpointException``, and
    Python's ``__cause__``/``__context__`` chain."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += _failures(cur)
        todo += [c for c in (cur.__cause__, cur.__context__) if c is not None]


def wrapped(e: BaseException, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` in ``e`` or what it wraps, if any (e.g. the OS
    error behind a failed dist-checkpoint write, or a ConversionError raised while torch wrote)."""
    return next((c for c in _chain(e) if isinstance(c, kind)), None)


def describe(e: BaseException, limit: int = 300) -> str:
    """``e`` as one line: the OS error behind it if any (``[Errno 28] No space left on device: 'path'``),
    else the innermost wrapped error as ``Type: first line of its message``."""
    found = wrapped(e, OSError)
    if found is not None:
        return " ".join(str(found).split())
    root = next(iter(_failures(e)), e)
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(first) > limit // 2 and ". " in first:  # a long explanation: its first sentence names the problem
        first = first.split(". ", 1)[0] + "."
    text = f"{type(root).__name__}: {first}" if first else type(root).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``512 B``, ``137.4 KiB``, ``2.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


@contextmanager
def writing_to(out: str | Path, need_bytes: int) -> Iterator[None]:
    """Turn a failed write of ``out`` into a one-line :class:`ConversionError`.

    Use it inside the ``atomic_dir`` block, while the partial output still fills the disk: an
    OS error anywhere in the exception counts, and so does any error while the disk has less
    room left than the tensors take (torch's zip writer reports a full disk as ``unexpected
    pos``, with no OS error). A ConversionError raised while torch wrote (a bad input tensor,
    found as it was read) comes out unwrapped. Anything else is a bug and propagates as is.
    """
    try:
        yield
    except (ConversionError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch's CheckpointException derives from BaseException
        inner = wrapped(e, ConversionError)
        if inner is not None:
            raise inner from None
        if wrapped(e, OSError) is not None:
            raise ConversionError(f"could not write {out}: {describe(e)}") from None
        probe = Path(out)
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need_bytes:
            raise ConversionError(
                f"could not write {out}: {describe(e)}; its disk has {size_text(free)} free, the tensors "
                f"take {size_text(need_bytes)} (disk full?)"
            ) from None
        raise
