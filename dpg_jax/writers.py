"""Metric and image writers: JSON lines + TensorBoard, from process 0 only.

Both survive a kill: a metrics.jsonl line torn mid-write is dropped on read,
TensorBoard events are flushed at every log step, and a resumed run purges
the events a killed run logged past its checkpoint (no doubled curve points).
"""
import json
import os
import shutil
import tempfile
import time

from absl import logging
import jax
import numpy as np

from dpg_jax import fileio


class MetricWriter:
  """Scalars to <workdir>/metrics.jsonl and TensorBoard events under <workdir>/tb.

  A URL workdir (gs://, file://; see dpg_jax/fileio.py) has no append: the
  JSON lines are rewritten whole at each log step, and the events file is
  written locally and uploaded at each flush.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    """resume_step: rows logged after it by a killed run are dropped (they are redone)."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    self._rows = None             # URL workdirs: every row, rewritten whole
    if self.enabled:
      fileio.makedirs(workdir)
      path = fileio.join(workdir, 'metrics.jsonl')
      self._path = path
      if resume_step is not None and fileio.exists(path):
        keep = [r for r in read_metrics(workdir) if r['step'] <= resume_step]
        fileio.atomic_write_text(path, ''.join(json.dumps(r) + '\n' for r in keep))
      if fileio.is_local(path):
        self._jsonl = open(path, 'a', encoding='utf-8')
      else:
        self._rows = read_metrics(workdir)
      # purge_step: events at steps > resume_step (logged by the killed run
      # after its last checkpoint) are hidden, as they are logged again.
      self._tb = _TensorBoard(fileio.join(workdir, 'tb'),
                              purge_step=None if resume_step is None else int(resume_step) + 1)

  def scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time()}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      row[k] = v
    self._tb.scalars(int(step), row)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(row) + '\n')
      self._jsonl.flush()
    else:
      self._rows.append(row)
      fileio.atomic_write_text(self._path, ''.join(json.dumps(r) + '\n' for r in self._rows))

  def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.image(int(step), tag, np.asarray(image_uint8))

  def flush(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
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
    self._pb = event_pb2
    # A URL logdir: events go to a local file, uploaded whole at each flush.
    self._remote = None if fileio.is_local(logdir) else logdir
    local = logdir if self._remote is None else tempfile.mkdtemp(prefix='dpg_jax_tb_')
    os.makedirs(local, exist_ok=True)
    # The name holds whole seconds only: the suffix keeps two files of the same
    # second apart (a quick resume would overwrite) and in start order, which
    # TensorBoard reads them in.
    self._w = EventsWriter(os.path.join(local, 'events'),
                           filename_suffix=f'.{time.time_ns():020d}')
    if purge_step is not None:
      # TensorBoard drops earlier events at steps >= purge_step (a resumed run).
      self._write(step=purge_step,
                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

  def _write(self, **kw) -> None:
    self._w.write_event(self._pb.Event(wall_time=time.time(), **kw))
    self.flush()

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
    if self._remote is not None:
      local = self._w._file_name  # pylint: disable=protected-access
      with open(local, 'rb') as f:
        data = f.read()
      fileio.atomic_write(fileio.join(self._remote, os.path.basename(local)),
                          lambda out: out.write(data))

  def close(self) -> None:
    self.flush()
    self._w.close()
    if self._remote is not None:
      shutil.rmtree(os.path.dirname(self._w._file_name), ignore_errors=True)  # pylint: disable=protected-access


def read_metrics(workdir: str) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl (for tests, notebooks, the evaluator).

  A line that does not parse (torn by a kill mid-write, or garbled) is dropped
  with one warning, as the evaluation ledger does.
  """
  path = fileio.join(workdir, 'metrics.jsonl')
  if not fileio.exists(path):
    return []
  with fileio.path(path).open('rb') as f:
    text = f.read().decode('utf-8', errors='replace')
  lines = [line for line in text.split('\n') if line.strip()]
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
