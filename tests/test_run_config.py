"""Resume config checks and the kept config.json of every start."""
import json
import logging
import os

import pytest

from configs import tiny as tiny_config
from dpg_jax import run_config


def _pinned():
  """The tiny config with the values these tests name pinned (not tiny.py's defaults)."""
  c = tiny_config.get_config()
  c.train_text_encoder = True
  c.num_steps, c.log_every, c.checkpoint_every = 300, 10, 100
  c.sample.prompts = ('a photo of {identifier} {class_noun}',
                      'a {identifier} {class_noun} on the beach')
  return c


def test_structural_change_is_refused_listing_keys_and_values():
  old = _pinned()
  new = _pinned()
  new.train_text_encoder = False
  new.data.synthetic = False
  new.data.subject = 'cat'
  new.dpg.rewards = 'dino:1.0'
  new.num_steps = 7                       # safe; not what the error is about
  with pytest.raises(run_config.ConfigMismatchError) as err:
    run_config.check_resume(run_config.config_dict(old), new, where='checkpoint /w/ck/4')
  msg = str(err.value)
  assert msg.startswith('config differs from the one checkpoint /w/ck/4 was trained with')
  for item in ("data.subject: '' -> 'cat'", 'data.synthetic: true -> false',
               "dpg.rewards: 'look_forward:1.0' -> 'dino:1.0'",
               'train_text_encoder: true -> false'):
    assert item in msg, msg
  assert 'num_steps' not in msg and '\n' not in msg


def test_safe_changes_are_allowed_in_one_warning(caplog):
  old = _pinned()
  new = _pinned()
  new.num_steps, new.log_every, new.checkpoint_every = 500, 0, 0
  new.sample.prompts = ('a {identifier} {class_noun} on the moon',)
  new.model.remat = True
  with caplog.at_level(logging.WARNING):
    allowed = run_config.check_resume(run_config.config_dict(old), new, where='ck 3')
  assert allowed == ['checkpoint_every: 100 -> 0', 'log_every: 10 -> 0',
                     'model.remat: false -> true', 'num_steps: 300 -> 500',
                     'sample.prompts: ["a photo of {identifier} {class_noun}", "a {identifier} '
                     '{class_noun} on the beach"] -> ["a {identifier} {class_noun} on the moon"]']
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and warnings[0].startswith('Resuming from ck 3 with config changes')


def test_num_steps_change_notes_a_decaying_schedule():
  old = _pinned()
  old.lr_schedule = 'cosine'
  new = _pinned()
  new.lr_schedule = 'cosine'
  new.num_steps = 600
  (item,) = run_config.check_resume(run_config.config_dict(old), new, where='ck')
  assert item.startswith('num_steps: 300 -> 600') and "lr_schedule='cosine'" in item


def test_unchanged_config_and_missing_stored_config(caplog):
  c = tiny_config.get_config()
  assert run_config.check_resume(run_config.config_dict(c), c, where='ck') == []
  with caplog.at_level(logging.WARNING):
    assert run_config.check_resume(None, c, where='ck 9') == []
  assert 'ck 9 stores no config' in caplog.text


def test_config_json_of_earlier_starts_is_kept(tmp_path):
  w = str(tmp_path)
  c = tiny_config.get_config()
  assert run_config.write_config_json(w, c) is None
  assert run_config.write_config_json(w, c) is None     # same config: nothing to keep
  first = open(os.path.join(w, 'config.json')).read()
  c.num_steps = 10
  assert run_config.write_config_json(w, c) == os.path.join(w, 'config.1.json')
  c.num_steps = 20
  assert run_config.write_config_json(w, c) == os.path.join(w, 'config.2.json')
  assert open(os.path.join(w, 'config.1.json')).read() == first
  assert json.load(open(os.path.join(w, 'config.2.json')))['num_steps'] == 10
  assert json.load(open(os.path.join(w, 'config.json')))['num_steps'] == 20


def test_stored_config_prefers_the_checkpoint_meta(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'seed': 5}))
  assert run_config.stored_config({'step': 1, 'config': {'seed': 1}}, str(tmp_path)) == {'seed': 1}
  assert run_config.stored_config({'step': 1}, str(tmp_path)) == {'seed': 5}
  assert run_config.stored_config({'step': 1}, str(tmp_path / 'none')) is None
