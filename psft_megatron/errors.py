"""The project's error types and the exit statuses of its commands (the bottom layer: no imports).

Every error a user can fix (a bad recipe, data file, checkpoint, option or disk) derives from
:class:`UserError`; the command-line shell (``psft_megatron/cli/shell.py``) prints its message
as one ``error: ...`` line and exits :data:`EXIT_USER_ERROR`. A run stopped by
:class:`Diverged` exits :data:`EXIT_DIVERGED`. Any other exception is a bug: a traceback and
:data:`EXIT_INTERNAL`.

The concrete classes live next to the code that raises them (``config.load.ConfigError``,
``data.errors.DataError``, ``conversion.errors.ConversionError``, ...). Most also keep the
builtin base they had before (``ValueError`` or ``RuntimeError``), so code that catches those
still does.
"""

from __future__ import annotations

__all__ = [
    "Diverged",
    "EXIT_DIVERGED",
    "EXIT_INTERNAL",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_USER_ERROR",
    "UserError",
]

EXIT_OK = 0
# An uncaught exception: a bug (a traceback follows).
EXIT_INTERNAL = 1
# Bad input (and argparse's usage errors): one "error: ..." line says what to fix.
EXIT_USER_ERROR = 2
# Training diverged: too many consecutive non-finite steps.
EXIT_DIVERGED = 3
# Stopped early on a signal or the time budget, after saving: EX_TEMPFAIL, "try again"
# (launch/slurm/psft.sbatch requeues on it).
EXIT_PREEMPTED = 75


class UserError(Exception):
    """Bad input the user can fix; the message names the file, field or option and what to change."""

    exit_status = EXIT_USER_ERROR


class Diverged(Exception):
    """The run cannot go on: its training diverged (e.g. too many non-finite steps in a row)."""

    exit_status = EXIT_DIVERGED
