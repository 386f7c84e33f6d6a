"""Metric and image writers: JSON lines + TensorBoard, from process 0 only.

Both survive a kill: a metrics.jsonl line torn mid-write is dropped on read,
TensorBoard events are flushed at every log step, and a resumed run purges
the events a killed run logged past its checkpoint (no doubled curve points).
"""
import json
import os
import time

from absl import logging
import jax
import numpy as np

from dpg_jax import fileio


class MetricWriter:
  """Scalars to <workdir>/metrics.jsonl and TensorBoard events under <workdir>/tb."""

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    """resume_step: rows logged after it by a killed run are dropped (they are redone)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      if resume_step is not None and os.path.exists(path):
        keep = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
        fileio.atomic_write_text(path, ''.join(json.dumps(r) + '\n' for r in keep))
      self._jsonl = open(path, 'a', encoding='utf-8')
      # purge_step: events at steps > resume_step (logged by the killed run
      # after its last checkpoint) are hidden, as they are logged again.
      self._tb = _TensorBoard(os.path.join(workdir, 'tb'),
                              purge_step=None if resume_step is None else int(resume_step) + 1)

  def scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time()}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      row[k] = v
    self._tb.scalars(int(step), row)
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()

  def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.image(int(step), tag, np.asarray(image_uint8))

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class _TensorBoard:
  """Synchronous TensorBoard event file: every call is on disk when it returns.

  (tensorboardX's SummaryWriter queues events to a thread and its flush() does
  not drain the queue, so a killed run lost its last points.)
  """

  def __init__(self, logdir: str, purge_step: int | None = None):
    from tensorboardX.event_file_writer import EventsWriter  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    self._pb = event_pb2
    # The name holds whole seconds only: the suffix keeps two files of the same
    # second apart (a quick resume would overwrite) and in start order, which
    # TensorBoard reads them in.
    self._w = EventsWriter(os.path.join(logdir, 'events'),
                           filename_suffix=f'.{time.time_ns():020d}')
    if purge_step is not None:
      # TensorBoard drops earlier events at steps >= purge_step (a resumed run).
      self._write(step=purge_step,
                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

  def _write(self, **kw) -> None:
    self._w.write_event(self._pb.Event(wall_time=time.time(), **kw))
    self._w.flush()

  def scalars(self, step: int, row: dict) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = [summary.scalar(k, v).value[0] for k, v in row.items() if k not in ('step', 'time')]
    self._write(step=step, summary=summary_pb2.Summary(value=values))

  def image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    self._write(step=step, summary=summary.image(tag, image_hwc_uint8, dataformats='HWC'))

  def flush(self) -> None:
    self._w.flush()

  def close(self) -> None:
    self._w.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl (for tests, notebooks, the evaluator).

  A line that does not parse (torn by a kill mid-write, or garbled) is dropped
  with one warning, as the evaluation ledger does.
  """
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  rows, bad = [], 0
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      bad += 1
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int):
      rows.append(row)
    else:
      bad += 1
  if bad:
    logging.warning('%s: dropping %d torn or unreadable line(s).', path, bad)
  return rows


class Chrono:
  """Wall-clock bookkeeping: compile time of the first step, then steps/s."""

  def __init__(self):
    self.compile_s = None
    self._t0 = None
    self._n = 0

  def first_step_done(self, t_start: float) -> None:
    self.compile_s = time.perf_counter() - t_start
    self._t0 = time.perf_counter()
    self._n = 0

  def tick(self) -> None:
    self._n += 1

  def steps_per_sec(self) -> float:
    if self._t0 is None or self._n == 0:
      return float('nan')
    return self._n / max(time.perf_counter() - self._t0, 1e-9)
