"""Stop requests (SIGTERM from a scheduler, SIGINT from Ctrl-C) for the loop.

The loop asks `should_stop(step)` after every step; on True it saves the
current step and raises `Preempted`. Two mechanisms:
- one process: our handlers for SIGTERM and SIGINT set a flag (a second signal
  of the same kind gets the previous behaviour: Ctrl-C twice interrupts at once);
- several processes (TPU VMs, multi-node GPU): JAX's preemption service (on
  with `jax.distributed.initialize`) catches SIGTERM on any host and agrees on
  one step for all of them; Orbax's `reached_preemption(step)` reports it, so
  every host saves the same step. Our handlers stay off there: a flag set on
  one host only would stop it alone and hang the others' collectives.

`Preempted` is a SystemExit with code 128 + signal number (143 for SIGTERM,
130 for SIGINT), the shell's code for "killed by that signal": the run is not
finished, so `python train && python evaluate`, SLURM `--dependency=afterok`
and Kubernetes all see an unfinished job, while the state is safely saved;
SLURM requeues preempted jobs by itself, and a batch script can requeue on 143
(`scontrol requeue $SLURM_JOB_ID`). SLURM sends SIGKILL KillWait (default 30 s)
after SIGTERM: the save of the current step must fit in that window.
"""
import signal
import threading

import jax


class Preempted(SystemExit):
  """The run stopped on a signal after saving its current step."""

  def __init__(self, signum: int, step: int, message: str):
    super().__init__(128 + int(signum))
    self.signum, self.step, self.message = int(signum), int(step), message

  def __str__(self):
    return self.message


class StopRequests:
  """Context manager: catches SIGTERM/SIGINT while the loop runs."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    # A second signal of this kind does what it did before we took it over.
    signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)
    self._previous.clear()
    return False

  def should_stop(self, step: int, checkpointer) -> bool:
    """True if a signal arrived (one process) or the hosts' sync point is `step`."""
    if checkpointer.reached_preemption(step):
      self.signum = self.signum or signal.SIGTERM
      return True
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ''
