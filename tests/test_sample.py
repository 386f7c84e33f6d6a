"""Tests of dpg_jax.sample: `--mode=sample` samples the newest trained state."""
import json
import logging
import os

import jax
import numpy as np
import pytest

from configs import tiny as tiny_config
from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import models
from dpg_jax import sample

_LEAF = ('conv_in', 'kernel')  # a UNet parameter the fake trainings change


def _unet_leaf(params):
  return np.asarray(params['unet'][_LEAF[0]][_LEAF[1]])


def _scaled_unet(params, factor):
  return jax.tree.map(lambda x: np.asarray(x) * factor, params['unet'])


def _save_checkpoint(workdir, step, unet):
  """What a training run saves, as far as sampling reads it (params + the rest)."""
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    state = {'step': np.int32(step), 'params': {'unet': unet},
             'opt_state': {'mu': jax.tree.map(np.zeros_like, unet)}}
    ckpt.save(step, state, {'step': step})
    ckpt.wait()
  finally:
    ckpt.close()


def _config(tiny_sd_dir):
  c = tiny_config.get_config()
  c.model.pretrained = tiny_sd_dir
  c.data.class_noun = 'toy'
  c.sample.prompts = ('a {identifier} {class_noun} on the moon',)
  c.sample.num_images_per_prompt = 1
  c.sample.num_inference_steps = 1
  c.sample.guidance_scale = 1.0
  c.sample.batch_size = 1
  return c


def test_newest_of_export_and_checkpoint_is_sampled(tmp_path, tiny_sd, tiny_sd_dir):
  sd, base = tiny_sd
  config, workdir = _config(tiny_sd_dir), str(tmp_path / 'run')
  _save_checkpoint(workdir, 2, _scaled_unet(base, 2.0))
  # The end of a run: its final state exported after its last checkpoint.
  models.save_pipeline(os.path.join(workdir, 'export'), sd,
                       dict(base, unet=_scaled_unet(base, 2.0)))
  info = sample.newest_trained(workdir)
  assert info == {'weights': 'export', 'path': os.path.join(workdir, 'export'), 'step': 2}
  _, params, _ = sample.load_trained(workdir, config)
  np.testing.assert_array_equal(_unet_leaf(params), 2.0 * _unet_leaf(base))

  # Resumed with more steps and stopped before the end: the checkpoint is newer.
  _save_checkpoint(workdir, 3, _scaled_unet(base, 3.0))
  info = sample.newest_trained(workdir)
  assert info == {'weights': 'checkpoint', 'path': os.path.join(workdir, 'checkpoints'),
                  'step': 3}
  _, params, _ = sample.load_trained(workdir, config)
  np.testing.assert_array_equal(_unet_leaf(params), 3.0 * _unet_leaf(base))
  # Frozen parts come from the base model.
  np.testing.assert_array_equal(
      jax.tree.leaves(params['vae'])[0], np.asarray(jax.tree.leaves(base['vae'])[0]))

  # A bare pipeline directory has no step to tell.
  assert sample.newest_trained(tiny_sd_dir) == {'weights': 'pipeline', 'path': tiny_sd_dir,
                                                'step': None}
  # Export only (the evaluation deletes checkpoints): step unknown.
  os.rename(os.path.join(workdir, 'checkpoints'), str(tmp_path / 'moved'))
  assert sample.newest_trained(workdir)['step'] is None
  os.rename(os.path.join(workdir, 'export'), str(tmp_path / 'moved_export'))
  with pytest.raises(FileNotFoundError, match='no exported pipeline.*no finished checkpoint'):
    sample.newest_trained(workdir)


def test_sample_logs_and_records_the_step(tmp_path, tiny_sd, tiny_sd_dir, caplog):
  _, base = tiny_sd
  config, workdir = _config(tiny_sd_dir), str(tmp_path / 'run')
  _save_checkpoint(workdir, 5, _scaled_unet(base, 1.5))
  config.sample.output_dir = str(tmp_path / 'out')
  with caplog.at_level(logging.INFO):
    out = sample.sample_and_save(config, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert f'Sampling the checkpoint {ckpt_dir} (training step 5)' in caplog.text
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['weights'] == 'checkpoint' and manifest['train_step'] == 5
  assert manifest['weights_path'] == ckpt_dir
  assert [m['file'] for m in manifest['images']] == ['000_a_sks_toy_on_the_moon_0.png']


def test_sample_writes_through_the_path_layer(tmp_path, tiny_sd, tiny_sd_dir):
  """A file:// workdir (routed as a gs:// one is): the default output dir
  <workdir>/samples/generated, its images and manifest go through dpg_jax/fileio."""
  _, base = tiny_sd
  config, local = _config(tiny_sd_dir), str(tmp_path / 'run')
  _save_checkpoint(local, 4, _scaled_unet(base, 1.5))
  out = sample.sample_and_save(config, f'file://{local}')
  assert out == f'file://{local}/samples/generated'
  folder = os.path.join(local, 'samples', 'generated')
  with open(os.path.join(folder, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['train_step'] == 4 and manifest['source'] == local
  names = [m['file'] for m in manifest['images']]
  assert names == ['000_a_sks_toy_on_the_moon_0.png']
  assert sorted(os.listdir(folder)) == sorted(names + ['grid_000_a_sks_toy_on_the_moon.png',
                                                        'manifest.json'])
