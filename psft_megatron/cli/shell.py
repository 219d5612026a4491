"""The shell every command runs in: logging, the known-warning filters, and the exit statuses.

    def main(argv: list[str] | None = None) -> int:
        args = parser().parse_args(argv)  # a usage error: argparse prints the usage and exits 2
        return run_command(lambda: _convert(args), user_errors=(OSError,))

:func:`run_command` sets up logging and ``runtime/quiet.py``'s warning filters (before the
command's body imports megatron-core), runs the body and maps its outcome to the exit status
the README documents (values in :mod:`psft_megatron.errors`):

    0   the body returned 0 or None
    2   a :class:`~psft_megatron.errors.UserError` (or one of the command's ``user_errors``,
        e.g. ``OSError`` for a tool whose output folder cannot be written): one line
        ``error: MESSAGE`` on stderr, no traceback
    3   a :class:`~psft_megatron.errors.Diverged` run: one ``error:`` line
    75  the body returned ``EXIT_PREEMPTED`` (stopped early after saving: relaunch to resume)
    1   any other exception propagates: Python prints its traceback and exits 1 (a bug: report it)

Under torchrun every process prints its own line, so with several ranks the message starts
with ``[rank N]``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from psft_megatron.errors import EXIT_OK, EXIT_USER_ERROR, Diverged, UserError
from psft_megatron.runtime.quiet import quiet_known_warnings

__all__ = ["one_line", "run_command", "setup_process"]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_process() -> None:
    """Logging and warning filters of a command's process (idempotent).

    Rank 0 and the last rank (which holds the loss) log at INFO, the others only warnings;
    each line says its rank. megatron-core logs its own set-up at INFO on every rank: only
    its warnings are kept.
    """
    quiet_known_warnings()
    rank, world = _rank(), _world_size()
    logging.basicConfig(
        level=logging.INFO if rank in (0, world - 1) else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)


def one_line(e: BaseException) -> str:
    """``e``'s message on one line (library messages may span several)."""
    return " ".join(str(e).split())


def _error_prefix() -> str:
    # A torchrun worker (LOCAL_RANK set) of a job with several processes: say which one. A single
    # process told the job's size (--validate-only with WORLD_SIZE) is not a rank of anything.
    if "LOCAL_RANK" in os.environ and _world_size() > 1:
        return f"error: [rank {_rank()}] "
    return "error: "


def run_command(body: Callable[[], int | None], *, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's ``body`` in the shell and return its exit status (see the module docstring)."""
    setup_process()
    try:
        status = body()
    except (UserError, Diverged, *user_errors) as e:
        print(_error_prefix() + one_line(e), file=sys.stderr)
        return getattr(e, "exit_status", EXIT_USER_ERROR)
    return EXIT_OK if status is None else status
