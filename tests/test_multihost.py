"""Multi-host: 2 processes x 4 CPU devices == 1 process x 8; Orbax onto another mesh;
the distributed start-up decision; URL workdirs through the path layer."""
import json
import os
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from dpg_jax import distributed
from dpg_jax import fileio
from tests import test_sharding

REPO = test_sharding.REPO
LAUNCH = os.path.join(REPO, 'launch', 'local_multiprocess.sh')


def _cfg(**kw):
  c = ml_collections.ConfigDict({'distributed': None, 'cluster': {
      'coordinator_address': '', 'num_processes': 0, 'process_id': -1, 'local_device_ids': ''}})
  c.update_from_flattened_dict(kw)
  return c


def test_distributed_starts_when_asked():
  assert distributed.wanted(_cfg(), env={}) == (False, '')
  assert distributed.wanted(_cfg(distributed=False), env={'SLURM_NTASKS': '4',
                                                          'SLURM_PROCID': '0'})[0] is False
  assert distributed.wanted(_cfg(), env={'SLURM_NTASKS': '4', 'SLURM_PROCID': '1'}) == (
      True, 'SLURM job step with 4 tasks')
  assert distributed.wanted(_cfg(), env={'SLURM_NTASKS': '1', 'SLURM_PROCID': '0'})[0] is False
  assert distributed.wanted(_cfg(), env={'TPU_WORKER_HOSTNAMES': 'a,b,c,d'}) == (
      True, 'TPU VM slice of 4 hosts')
  assert distributed.wanted(_cfg(), env={'TPU_WORKER_HOSTNAMES': 'localhost'})[0] is False
  assert distributed.wanted(_cfg(distributed=True), env={})[0] is True
  # Explicit cluster settings: the config wins over the environment; id 0 is an id.
  env = {'DPG_JAX_COORDINATOR': '10.0.0.1:1234', 'DPG_JAX_NUM_PROCESSES': '4',
         'DPG_JAX_PROCESS_ID': '0'}
  assert distributed.cluster_args(_cfg(), env) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 0}
  assert distributed.cluster_args(_cfg(**{'cluster.process_id': 3,
                                          'cluster.local_device_ids': '0,1'}), env) == {
      'coordinator_address': '10.0.0.1:1234', 'num_processes': 4, 'process_id': 3,
      'local_device_ids': [0, 1]}
  assert distributed.wanted(_cfg(), env)[0] is True


def test_coordinator_without_process_count_is_one_line():
  c = _cfg(**{'cluster.coordinator_address': 'host:1234'})
  with pytest.raises(ValueError, match=r"coordinator 'host:1234' given without the process "
                                       r'count and id: set config keys cluster.num_processes'):
    distributed.initialize(c)


def test_path_layer_routes_urls_without_network(tmp_path):
  gs = fileio.path('gs://bucket/run/checkpoints')
  assert str(gs) == 'gs://bucket/run/checkpoints' and not fileio.is_local('gs://bucket/run')
  assert fileio.join('gs://bucket/run/', 'metrics.jsonl') == 'gs://bucket/run/metrics.jsonl'
  assert fileio.normalize('gs://bucket/run/') == 'gs://bucket/run'
  assert str(fileio.path(f'file://{tmp_path}/a')) == f'{tmp_path}/a'
  with pytest.raises(ValueError, match='file:// URL needs an absolute path'):
    fileio.path('file://relative/dir')
  # A URL workdir's files go through the object-store code path (upload, no rename).
  url = f'file://{tmp_path}/w'
  fileio.atomic_write_text(fileio.join(url, 'a', 'x.json'), '{"a": 1}')
  assert json.loads((tmp_path / 'w' / 'a' / 'x.json').read_text()) == {'a': 1}
  local = tmp_path / 'src'
  (local / 'unet').mkdir(parents=True)
  (local / 'unet' / 'w.bin').write_bytes(b'\0' * 10)
  (local / 'model_index.json').write_text('{}')
  fileio.upload_tree(str(local), fileio.join(url, 'export'))
  assert sorted(p.name for p in (tmp_path / 'w' / 'export').iterdir()) == ['model_index.json',
                                                                           'unet']
  assert not (tmp_path / 'w' / 'export.tmp-upload').exists()
  assert fileio.local_dir(url) != str(tmp_path / 'w') and os.path.isdir(fileio.local_dir(url))


_RESHARD_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    from dpg_jax import checkpoint as ckpt_lib, models, sharding, train
    from tests import test_train as tt
    sd, params = models.load_stable_diffusion(sys.argv[1])
    url = 'file://' + sys.argv[2]
    config = tt._config()
    spec = train.make_step_spec(sd, config)
    trainable = train.trainable_params(params, config)
    mesh8 = sharding.make_mesh(1, fsdp=8)
    state, _ = train.create_sharded_state(spec, trainable, jax.random.PRNGKey(0), mesh8, 'fsdp')
    ck = ckpt_lib.Checkpointer(url + '/checkpoints')
    ck.save(1, state, {'step': 1})
    ck.close()
    mesh4 = sharding.make_mesh(2, jax.devices()[:4], fsdp=2)
    abstract, _ = train.abstract_state(spec, trainable, jax.random.PRNGKey(0), mesh4, 'fsdp')
    ck = ckpt_lib.Checkpointer(url + '/checkpoints')
    restored, meta = ck.restore(1, abstract)
    ck.close()
    a, b = jax.tree.leaves(state), jax.tree.leaves(restored)
    print(json.dumps({
        'equal': all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)),
        'saved_devices': sorted({len(x.sharding.device_set) for x in a}),
        'restored_devices': sorted({len(x.sharding.device_set) for x in b}),
        'restored_sharded': sum(not x.sharding.is_fully_replicated for x in b),
        'meta': meta}))
''')


def test_checkpoint_saved_on_8_devices_restores_on_4(tiny_sd_dir, tmp_path):
  """An FSDP state saved from 8 devices (through a file:// URL) restores bit-exact
  into a data=2 x fsdp=2 layout on 4 devices."""
  res = test_sharding.run_script(_RESHARD_SCRIPT, tiny_sd_dir, tmp_path)
  assert res['equal'] and res['meta'] == {'step': 1}, res
  assert res['saved_devices'] == [8] and res['restored_devices'] == [4], res
  assert res['restored_sharded'] > 0
  assert (tmp_path / 'checkpoints' / '1').is_dir()


def _train_args(sd_dir, workdir):
  return ['--config=configs/tiny.py', f'--workdir={workdir}', '--config.model.tiny=',
          f'--config.model.pretrained={sd_dir}', '--config.num_steps=2',
          '--config.batch_size=8', '--config.prior_preservation=False',
          '--config.train_text_encoder=False', '--config.sample.prompts=()',
          '--config.log_every=1', '--config.checkpoint_every=2', '--config.export_format=flax',
          '--config.mesh.param_sharding=fsdp', '--config.compilation_cache_dir=none']


def _launch(n, d, args, tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS=os.environ.get('XLA_FLAGS', '').replace(
      test_sharding.FORCE_8, ''))
  out = subprocess.run(['bash', LAUNCH, '-n', str(n), '-d', str(d), '--', *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-5000:]
  return out


@pytest.mark.slow
def test_two_processes_equal_one_process_with_8_devices(tiny_sd_dir, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed, local coordinator, params
  FSDP-sharded across both) train the same params as 1 process x 8 devices;
  metrics and the export come from process 0 only, the export gathered from
  shards on both processes; the workdir is a file:// URL."""
  one, two = tmp_path / 'one', tmp_path / 'two'
  _launch(1, 8, _train_args(tiny_sd_dir, f'file://{one}'), tmp_path)
  out = _launch(2, 4, _train_args(tiny_sd_dir, f'file://{two}'), tmp_path)
  assert '[1] ' in out.stderr and 'JAX process 1/2, 4 local / 8 global devices' in out.stderr
  from dpg_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  from dpg_jax import writers  # pylint: disable=g-import-not-at-top
  params = []
  for w in (one, two):
    ck = ckpt_lib.Checkpointer(str(w / 'checkpoints'))
    assert ck.all_steps() == [2]
    params.append(ck.restore_subtree(2, 'params'))
    ck.close()
  import jax  # pylint: disable=g-import-not-at-top
  diffs = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params[0]),
                                                       jax.tree.leaves(params[1]))]
  assert max(diffs) < 1e-5, max(diffs)
  rows = [writers.read_metrics(str(w)) for w in (one, two)]
  assert [r['step'] for r in rows[1]] == [1, 2]          # one writer: no doubled rows
  np.testing.assert_allclose([r['loss'] for r in rows[1]], [r['loss'] for r in rows[0]],
                             atol=1e-5)
  exported = [models.load_stable_diffusion(str(w / 'export'))[1]['unet'] for w in (one, two)]
  for a, b in zip(jax.tree.leaves(exported[0]), jax.tree.leaves(exported[1])):
    np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_allclose(jax.tree.leaves(exported[1])[0],
                             jax.tree.leaves(params[1]['unet'])[0], atol=0)


def test_url_workdir_gets_every_output(tiny_sd_dir, tmp_path, monkeypatch):
  """--workdir=file:///... takes the object-store code path (whole-object writes,
  staged export upload, events uploaded at each flush) and every output lands there."""
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  from dpg_jax import writers  # pylint: disable=g-import-not-at-top
  from tests import test_train as tt  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('DPG_JAX_STAGING', str(tmp_path / 'staging'))
  config = tt._config(num_steps=2, export=True, export_format='flax')
  config.model.pretrained = tiny_sd_dir
  config.sample.prompts = ('a {identifier} {class_noun}',)
  config.sample.num_images_per_prompt = 1
  config.sample.num_inference_steps = 2
  w = tmp_path / 'run'
  train.train_and_evaluate(config, f'file://{w}')
  assert sorted(os.listdir(w / 'checkpoints')) == ['2']
  assert [r['step'] for r in writers.read_metrics(f'file://{w}')] == [1, 2]
  assert [r['step'] for r in writers.read_metrics(str(w))] == [1, 2]
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(w / 'tb'))
  assert (w / 'samples' / 'step_000002.png').is_file()
  assert (w / 'export' / 'model_index.json').is_file() and (w / 'config.json').is_file()
  # Local inputs went to the staging dir, nothing to a relative 'file:' folder.
  assert not (tmp_path / 'file:').exists() and not (w / 'instance_images').exists()
  assert os.listdir(tmp_path / 'staging')
  # A resume through the same URL finds the checkpoint.
  config.num_steps = 3
  state = train.train_and_evaluate(config, f'file://{w}')
  assert int(state.step) == 3 and sorted(os.listdir(w / 'checkpoints')) == ['2', '3']
