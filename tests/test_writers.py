"""Metric writers: torn metrics.jsonl lines, TensorBoard flush and purge on resume."""
import glob
import json
import os
import struct

from tensorboardX.proto import event_pb2

from dpg_jax import writers


def _events(workdir):
  """All events of <workdir>/tb in file order (TFRecord framing, crc unchecked)."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tb', 'events.*'))):
    data = open(path, 'rb').read()
    i = 0
    while i + 12 <= len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      ev = event_pb2.Event()
      ev.ParseFromString(data[i + 12:i + 12 + n])
      out.append(ev)
      i += 12 + n + 4
  return out


def _visible_scalar_steps(events):
  """Steps TensorBoard shows: a SessionLog START at step T hides earlier steps >= T."""
  steps = []
  for ev in events:
    if ev.HasField('session_log') and ev.session_log.status == event_pb2.SessionLog.START:
      steps = [s for s in steps if s < ev.step]
    elif ev.HasField('summary') and ev.summary.value:
      steps.append(ev.step)
  return steps


def test_torn_last_line_is_dropped_and_resume_appends_cleanly(tmp_path):
  w = str(tmp_path)
  mw = writers.MetricWriter(w, enabled=True)
  for s in (1, 2, 3):
    mw.scalars(s, {'loss': float(s)})
  mw.close()
  with open(os.path.join(w, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 4, "lo')             # killed mid-write
  assert [r['step'] for r in writers.read_metrics(w)] == [1, 2, 3]
  mw = writers.MetricWriter(w, enabled=True, resume_step=2)
  mw.scalars(3, {'loss': 30.0})
  mw.close()
  rows = writers.read_metrics(w)
  assert [(r['step'], r['loss']) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  lines = open(os.path.join(w, 'metrics.jsonl')).read().splitlines()
  assert [json.loads(l)['step'] for l in lines] == [1, 2, 3]   # the torn line is gone


def test_tensorboard_is_flushed_per_log_step_and_purged_on_resume(tmp_path):
  w = str(tmp_path)
  mw = writers.MetricWriter(w, enabled=True)
  for s in (1, 2, 3, 4):
    mw.scalars(s, {'loss': float(s)})
  # Not closed (a kill): every logged point is already on disk.
  assert _visible_scalar_steps(_events(w)) == [1, 2, 3, 4]
  mw = writers.MetricWriter(w, enabled=True, resume_step=2)   # resumed from checkpoint 2
  for s in (3, 4, 5):
    mw.scalars(s, {'loss': 10.0 * s})
  mw.close()
  assert _visible_scalar_steps(_events(w)) == [1, 2, 3, 4, 5]
