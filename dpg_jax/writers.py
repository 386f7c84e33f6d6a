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
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # purge_step: events at steps > resume_step (logged by the killed run
      # after its last checkpoint) are hidden, as they are logged again.
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'),
                               purge_step=None if resume_step is None else int(resume_step) + 1)

  def scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time()}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      row[k] = v
      self._tb.add_scalar(k, v, int(step))
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    self._tb.flush()  # a killed run keeps every logged point

  def image(self, step: int, tag: str, image_uint8: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, np.asarray(image_uint8), int(step), dataformats='HWC')
      self._tb.flush()

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


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
