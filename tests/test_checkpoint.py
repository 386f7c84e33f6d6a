"""Checkpointer: corrupt-step fallback, disk-full errors, NaN guard, meta."""
import errno
import glob
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from dpg_jax import checkpoint as ckpt_lib


def _state(v):
  return {'w': jnp.full((64, 64), float(v)), 'b': jnp.arange(3.0) + v}


def _two_steps(directory):
  ck = ckpt_lib.Checkpointer(directory, async_save=False, max_to_keep=3)
  for s in (1, 2):
    ck.save(s, _state(s), {'step': s, 'config': {'seed': s}})
  ck.close()


def _truncate_largest(step_dir):
  f = max((p for p in glob.glob(os.path.join(step_dir, 'state', '**'), recursive=True)
           if os.path.isfile(p)), key=os.path.getsize)
  with open(f, 'r+b') as fh:
    fh.truncate(10)


def _delete_array_data(step_dir):
  for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True):
    os.remove(f)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


@pytest.mark.parametrize('damage', [
    _truncate_largest,
    lambda d: shutil.rmtree(os.path.join(d, 'state')),
    _delete_array_data,
    lambda d: shutil.rmtree(os.path.join(d, 'meta')),
    _empty,
], ids=['truncated', 'no_state', 'no_array_data', 'no_meta', 'empty_dir'])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
  d = str(tmp_path / 'ck')
  _two_steps(d)
  damage(os.path.join(d, '2'))
  ck = ckpt_lib.Checkpointer(d)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ck.restore_latest(_state(0))
  assert step == 1 and meta == {'step': 1, 'config': {'seed': 1}}
  np.testing.assert_array_equal(np.asarray(state['b']), [1.0, 2.0, 3.0])
  warned = [r.getMessage() for r in caplog.records if 'corrupt or partial' in r.getMessage()]
  assert len(warned) == 1 and os.path.join(d, '2') in warned[0]
  # Set aside (not deleted), so step 2 can be written again by the resumed run.
  assert ck.all_steps() == [1]
  assert len(os.listdir(d + '.corrupt')) == 1
  ck.save(2, _state(7), {'step': 2})
  ck.wait()
  assert ck.restore_latest(_state(0))[0] == 2
  ck.close()


def test_no_intact_checkpoint_names_the_directory(tmp_path):
  d = str(tmp_path / 'ck')
  _two_steps(d)
  for s in ('1', '2'):
    _truncate_largest(os.path.join(d, s))
  ck = ckpt_lib.Checkpointer(d)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=f'no intact checkpoint in {d}: steps \\[1, 2\\]'):
    ck.restore_latest(_state(0))
  ck.close()


def test_restore_latest_of_an_empty_directory_returns_the_target(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'ck'))
  target = _state(0)
  assert ck.restore_latest(target) == (None, target, None)
  ck.close()


def test_check_meta_refuses_before_restoring(tmp_path):
  d = str(tmp_path / 'ck')
  _two_steps(d)
  ck = ckpt_lib.Checkpointer(d)
  restored = []
  ck.restore = lambda *a: restored.append(a)

  def refuse(step, meta):
    raise ValueError(f'refused step {step} seed {meta["config"]["seed"]}')
  with pytest.raises(ValueError, match='refused step 2 seed 2'):
    ck.restore_latest(_state(0), check_meta=refuse)
  assert not restored
  ck.close()


def test_disk_full_is_one_error_naming_step_path_and_free_bytes(tmp_path, monkeypatch, caplog):
  """ENOSPC in the async writer: one CheckpointError, nothing half-written kept."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top
  d = str(tmp_path / 'ck')
  ck = ckpt_lib.Checkpointer(d)            # async, as in the loop
  ck.save(1, _state(1), {'step': 1})
  ck.wait()

  async def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')
  # A full disk fails every writer: the JSON meta and the array data.
  monkeypatch.setattr(jh.JsonCheckpointHandler, '_save_fn', disk_full)
  monkeypatch.setattr(serialization, 'async_serialize_from_host', disk_full)
  usage = shutil.disk_usage(d)
  monkeypatch.setattr(ckpt_lib.shutil, 'disk_usage', lambda p: usage._replace(free=4096))
  with caplog.at_level(logging.INFO):
    ck.save(2, _state(2), {'step': 2})     # returns: the write fails in the background
    with pytest.raises(ckpt_lib.CheckpointError) as err:
      ck.save(3, _state(3), {'step': 3})   # ... and is reported here, as step 2's
  msg = str(err.value)
  assert msg == (f'checkpoint of step 2 to {d}/2 failed: no space left on device (4,096 '
                 'bytes free, the state is 16,396 bytes); nothing was kept of it, the resume '
                 'point is step 1. Free space or point --workdir elsewhere.')
  assert '\n' not in msg and err.value.__cause__ is None and err.value.__suppress_context__
  # Orbax's own traceback of the failure is not printed beside ours.
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
  assert ck.all_steps() == [1]             # step 2 is not a resume point
  monkeypatch.undo()
  ck.close()
  ck = ckpt_lib.Checkpointer(d)            # the next start: resumes from step 1
  step, state, _ = ck.restore_latest(_state(0))
  assert step == 1 and float(state['w'][0, 0]) == 1.0
  ck.save(2, _state(2), {'step': 2})       # step 2 again, once there is space
  ck.wait()
  assert sorted(os.listdir(d)) == ['1', '2']   # the failed save's temporary dir is gone
  ck.close()


def test_checkpointer_refuses_nan_state(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'ck'), async_save=False)
  ck.save(1, {'w': jnp.ones((3,))})
  with pytest.raises(ckpt_lib.NonFiniteError, match='NaN/inf'):
    ck.save(2, {'w': jnp.array([1.0, jnp.nan, 0.0])})
  assert ck.all_steps() == [1]
  ck.close()


def test_latest_meta_is_read_without_arrays(tmp_path):
  d = str(tmp_path / 'ck')
  _two_steps(d)
  shutil.rmtree(os.path.join(d, '2', 'state'))   # arrays gone, meta still readable
  ck = ckpt_lib.Checkpointer(d)
  assert ck.latest_meta() == (2, {'step': 2, 'config': {'seed': 2}})
  ck.close()
