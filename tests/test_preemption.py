"""Stop requests: our signal handlers (one process) and the multi-host sync point."""
import signal

import jax
import pytest

from dpg_jax import preemption


class _FakeCheckpointer:
  """reached_preemption as Orbax reports it: True on every host at one step."""

  def __init__(self, sync_step=None):
    self.sync_step, self.asked = sync_step, []

  def reached_preemption(self, step):
    self.asked.append(step)
    return step == self.sync_step


# signal.raise_signal, not os.kill(os.getpid(), ...): it raises in this thread,
# so the handler has run when it returns. The test installs Python's own
# Ctrl-C handler first: what a second Ctrl-C does is "what it did before", and
# an earlier test in the same worker can leave another SIGINT handler behind
# (likely an unclosed asyncio runner's; seen twice in cold CI runs).
def test_sigint_sets_the_flag_then_a_second_one_interrupts():
  ck = _FakeCheckpointer()
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with preemption.StopRequests() as stop:
      assert not stop.should_stop(1, ck)
      signal.raise_signal(signal.SIGINT)   # Ctrl-C: no KeyboardInterrupt mid-step
      assert stop.should_stop(2, ck) and stop.name == 'SIGINT'
      with pytest.raises(KeyboardInterrupt):   # Ctrl-C again: interrupt at once
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)
  assert ck.asked == [1, 2]                      # asked every step (the sync point)


def test_sigterm_flag_and_exit_code():
  with preemption.StopRequests() as stop:
    signal.raise_signal(signal.SIGTERM)
    assert stop.should_stop(7, _FakeCheckpointer())
  err = preemption.Preempted(stop.signum, 7, 'Stopped by SIGTERM at step 7')
  assert isinstance(err, SystemExit) and err.code == 143 and str(err).endswith('step 7')
  assert preemption.Preempted(signal.SIGINT, 1, '').code == 130


def test_multi_host_uses_only_the_sync_point(monkeypatch):
  """Several processes: no handlers of ours (JAX's preemption service owns SIGTERM)."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  ck = _FakeCheckpointer(sync_step=5)
  with preemption.StopRequests() as stop:
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert [stop.should_stop(s, ck) for s in range(3, 7)] == [False, False, True, True]
    assert stop.name == 'SIGTERM'
