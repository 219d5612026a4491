"""The stop policy in this process: a real signal through the real handler stops after the step in
flight, and the test-only self-signal hook fires at its step and nowhere else."""

from __future__ import annotations

import signal

import pytest

from psft_megatron.training.config import TrainingConfig
from psft_megatron.training.stopping import TEST_SIGNAL_ENV, SelfSignalForTests, StopPolicy


def _policy(hook: str | None, **training: object) -> StopPolicy:
    environ = {TEST_SIGNAL_ENV: hook} if hook is not None else {}
    return StopPolicy.from_config(TrainingConfig(**training), start_step=0, environ=environ)


@pytest.mark.parametrize("hook, sig", [("3", signal.SIGTERM), ("3:", signal.SIGTERM), ("3:SIGUSR1", signal.SIGUSR1),
                                       (" 3 : sigusr1 ", signal.SIGUSR1)])
def test_the_hook_sends_the_real_signal_as_its_step_begins(hook, sig):
    policy = _policy(hook)
    assert policy.self_signal == SelfSignalForTests(3, int(sig))
    policy.install_signal_handlers()
    try:
        for step in (1, 2):
            policy.step_begins(step)
            assert not policy.should_stop(step, at_global_batch_boundary=False)
        policy.step_begins(3)  # the handler has run: the flag is set before step 3's work starts
        assert policy.should_stop(3, at_global_batch_boundary=False)
        assert policy.preempted and policy.reason == f"received {sig.name}"
    finally:
        policy.restore_signal_handlers()
    assert signal.getsignal(sig) is not policy._on_signal  # the previous handler is back


def test_without_the_variable_there_is_no_hook_and_the_limits_come_from_the_training_section():
    policy = _policy(None, exit_after_steps=4, exit_duration_minutes=2.0)
    assert policy.self_signal is None
    assert policy.exit_after_steps == 4 and policy.exit_duration_s == 120
    policy.step_begins(1)  # a no-op
    assert not policy.should_stop(3, at_global_batch_boundary=True)
    assert policy.should_stop(4, at_global_batch_boundary=True) and not policy.preempted


@pytest.mark.parametrize("bad", ["0", "x", "3:SIGKILL", "-1:SIGTERM", "3.5"])
def test_a_bad_hook_value_is_refused_when_the_policy_is_built(bad):
    with pytest.raises(ValueError, match=TEST_SIGNAL_ENV):
        _policy(bad)
