"""The command shell's exit statuses, and the one error type every bad-input error derives from.

In process, with bodies that raise the project's own errors: what ``run_command`` returns and
prints for each. The real commands, as processes, are in tests/test_cli_errors.py (bad input),
tests/test_faults.py (divergence: 3, preemption: 75) and tests/test_trainer_errors.py.
"""

from __future__ import annotations

import pytest

from psft_megatron.cli.shell import run_command
from psft_megatron.config.load import ConfigError, FieldError
from psft_megatron.conversion.errors import ConversionError
from psft_megatron.data.cache import CacheError, CacheMissingError, StaleCacheError
from psft_megatron.data.errors import DataError, TemplateError, TokenizerError
from psft_megatron.errors import EXIT_PREEMPTED, Diverged, UserError
from psft_megatron.evaluation.compare import CompareError
from psft_megatron.evaluation.inputs import EvalInputError

# Each bad-input error and the builtin base callers may still catch it by.
BAD_INPUT_ERRORS = {
    ConfigError: ValueError, FieldError: ValueError, ConversionError: ValueError, DataError: ValueError,
    TemplateError: ValueError, TokenizerError: ValueError, EvalInputError: ValueError, CompareError: ValueError,
    CacheError: RuntimeError, CacheMissingError: RuntimeError, StaleCacheError: RuntimeError,
}


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _raises(error: BaseException):
    def body() -> int:
        raise error
    return body


@pytest.mark.parametrize("cls", sorted(BAD_INPUT_ERRORS, key=lambda c: c.__name__))
def test_every_bad_input_error_is_a_user_error_and_keeps_its_builtin_base(cls):
    assert issubclass(cls, UserError) and issubclass(cls, BAD_INPUT_ERRORS[cls])


@pytest.mark.slow  # imports megatron-core (the checkpoint and training modules build models)
def test_the_trainers_errors_are_user_errors_or_divergence():
    from psft_megatron.checkpoint.model_checkpoint import CheckpointError
    from psft_megatron.training.data_setup import DataSetupError
    from psft_megatron.training.guards import TrainingDiverged
    from psft_megatron.training.stopping import EXIT_PREEMPTED as stopping_status

    assert issubclass(CheckpointError, UserError) and issubclass(CheckpointError, RuntimeError)
    assert issubclass(DataSetupError, UserError) and issubclass(DataSetupError, RuntimeError)
    assert issubclass(TrainingDiverged, Diverged) and not issubclass(TrainingDiverged, UserError)
    assert stopping_status == EXIT_PREEMPTED == 75


def test_a_user_error_is_one_line_and_exit_2(capsys):
    error = DataError("data/train.jsonl", 7, "response", "malformed", "malformed JSON:\n  unexpected end")
    assert run_command(_raises(error)) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: data/train.jsonl, line 7, field 'response': malformed JSON: unexpected end " \
                           "(malformed)\n"
    assert captured.out == ""


def test_divergence_is_exit_3_and_preemption_75(capsys):
    assert run_command(_raises(Diverged("training diverged: 3 consecutive non-finite steps"))) == 3
    assert capsys.readouterr().err == "error: training diverged: 3 consecutive non-finite steps\n"
    assert run_command(lambda: EXIT_PREEMPTED) == 75
    assert run_command(lambda: None) == 0 and run_command(lambda: 0) == 0
    assert capsys.readouterr().err == ""


def test_a_commands_own_user_errors_and_a_bug(capsys):
    missing = FileNotFoundError(2, "No such file or directory", "out/x")
    assert run_command(_raises(missing), user_errors=(OSError,)) == 2
    assert capsys.readouterr().err == "error: [Errno 2] No such file or directory: 'out/x'\n"
    with pytest.raises(FileNotFoundError):  # not declared by this command: a bug, Python's traceback and 1
        run_command(_raises(missing))
    with pytest.raises(KeyError):
        run_command(_raises(KeyError("step")), user_errors=(OSError,))
    assert "error:" not in capsys.readouterr().err


def test_each_torchrun_worker_says_its_rank(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert run_command(_raises(UserError("bad recipe: x"))) == 2
    assert capsys.readouterr().err == "error: bad recipe: x\n"  # one process told the job's size: no rank
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run_command(_raises(UserError("bad recipe: x"))) == 2
    assert capsys.readouterr().err == "error: [rank 3] bad recipe: x\n"
