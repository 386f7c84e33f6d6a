"""The DreamBooth train step and loop: parity, sharding, resume, bad input."""
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny as tiny_config
from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import data as data_lib
from dpg_jax import train
from dpg_jax import writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  """The tiny config with these tests' settings pinned, whatever tiny.py's defaults
  (the tests run it on the tiny random SD, `tiny_sd_dir`)."""
  c = tiny_config.get_config()
  c.data.class_noun = 'toy'
  c.data.instance_prompt = c.data.class_prompt = ''   # 'a photo of ...'
  c.train_text_encoder = True
  c.learning_rate = 1e-4
  c.batch_size = 2
  c.num_steps = 4
  c.log_every = 1
  c.checkpoint_every = 2
  c.sample_every = 0
  c.sample.prompts = ()
  c.export = False
  c.data.num_class_images = 2
  c.data.class_sample_steps = 2
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split('.')
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def _host_batch(sd, config, step=0, n_inst=3):
  rs = np.random.RandomState(0)
  h = config.data.resolution // sd.vae_scale
  lat = lambda n: rs.randn(n, 4, h, h).astype(np.float32)
  latents = data_lib.SubjectLatents(lat(n_inst), np.abs(lat(n_inst)) * .1, lat(4),
                                    np.abs(lat(4)) * .1)
  gb = config.batch_size * config.grad_accum_steps
  b = data_lib.sample_batch(latents, step=step, seed=0, batch_size=gb)
  ids = sd.tokenize(['a photo of sks toy', 'a photo of toy'])
  if config.train_text_encoder:
    b['instance_ids'] = np.repeat(ids[:1], gb, 0)
    b['class_ids'] = np.repeat(ids[1:], gb, 0)
  else:   # frozen text encoder: the step gets embeddings (any fixed array will do)
    ctx = rs.randn(2, sd.max_length, sd.text_encoder.config.hidden_size).astype(np.float32)
    b['instance_context'] = np.repeat(ctx[:1], gb, 0)
    b['class_context'] = np.repeat(ctx[1:], gb, 0)
  return b


def _state(sd, params, config):
  spec = train.make_step_spec(sd, config)
  trainable = {'unet': params['unet']}
  if config.train_text_encoder:
    trainable['text_encoder'] = params['text_encoder']
  return spec, train.init_state(spec, trainable, jax.random.PRNGKey(0))


def test_loss_goes_down_on_a_fixed_batch(tiny_sd):
  sd, params = tiny_sd
  config = _config(learning_rate=3e-4, warmup_steps=0, train_text_encoder=False)
  spec, state = _state(sd, params, config)
  batch = _host_batch(sd, config)
  step = jax.jit(functools.partial(train.train_step, spec))
  # Fixed rng *and* fixed step index: the same noise every time, so the loss
  # measured before each update must fall as the model fits this example.
  losses = []
  for _ in range(20):
    new, m = step(state.replace(step=jnp.zeros((), jnp.int32)), batch, jax.random.PRNGKey(1))
    state = new.replace(step=jnp.zeros((), jnp.int32))
    losses.append(float(m['loss']))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0], losses


def test_grad_accumulation_matches_manual_micro_batches(tiny_sd):
  sd, params = tiny_sd
  config = _config(grad_accum_steps=2, batch_size=1, max_grad_norm=0.0,
                   train_text_encoder=False)
  spec, state = _state(sd, params, config)
  batch = _host_batch(sd, config)
  rng = jax.random.PRNGKey(3)
  new, metrics = jax.jit(functools.partial(train.train_step, spec))(state, batch, rng)

  # Reference: the two micro-batches' grads computed separately, averaged.
  r = jax.random.split(jax.random.fold_in(rng, 0), 3)
  micro = [jax.tree.map(lambda x, i=i: x[i:i + 1], batch) for i in range(2)]
  micro_grads = jax.jit(functools.partial(train._micro_grads, spec))
  outs = [micro_grads(state.params, None, None, m, r[i]) for i, m in enumerate(micro)]
  grads = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][3], outs[1][3])
  updates, _ = spec.optimizer.update(grads, state.opt_state, state.params)
  want = jax.tree.map(lambda p, u: p + u, state.params, updates)
  np.testing.assert_allclose(float(metrics['loss']), float((outs[0][0] + outs[1][0]) / 2),
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_unknown_prediction_type_is_refused(tiny_sd):
  sd, _ = tiny_sd
  with pytest.raises(ValueError, match='prediction_type'):
    train.make_step_spec(sd, _config(prediction_type='sample'))


_SHARDED_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {repo!r})
    from dpg_jax import models, sharding, train
    from tests import test_train as tt
    sd, params = models.load_stable_diffusion({sd_dir!r})
    config = tt._config(batch_size=8, train_text_encoder=False)
    out = {{}}
    for n in (1, 8):
      mesh = sharding.make_mesh(n)
      spec = train.make_step_spec(sd, config)
      trainable = {{'unet': params['unet']}}
      state, sh = train.create_sharded_state(spec, trainable, jax.random.PRNGKey(0), mesh)
      step = train.compile_train_step(spec, mesh, sh)
      rng = sharding.put_global(np.asarray(jax.random.PRNGKey(1)), sharding.replicated(mesh))
      for i in range(2):
        batch = sharding.put_batch(tt._host_batch(sd, config, step=i), mesh)
        state, m = step(state, batch, rng, None)
      assert len(state.params['unet']['conv_in']['kernel'].sharding.device_set) == n
      out[n] = [np.asarray(x).ravel()[:4096].tolist() for x in jax.tree.leaves(state.params)]
      out[str(n) + '_loss'] = float(m['loss'])
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(out[1], out[8]))
    print(json.dumps({{'max_diff': diff, 'loss1': out['1_loss'], 'loss8': out['8_loss'],
                      'devices': jax.device_count()}}))
''')


def test_sharded_step_matches_single_device(tiny_sd_dir, tmp_path):
  """8 forced CPU devices ('data' axis, batch sharded) == 1 device, 2 steps."""
  script = tmp_path / 'sharded.py'
  script.write_text(_SHARDED_SCRIPT.format(repo=REPO, sd_dir=tiny_sd_dir))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8 '
                       '--xla_backend_optimization_level=1')
  out = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res['devices'] == 8
  assert res['max_diff'] < 1e-5, res
  assert abs(res['loss1'] - res['loss8']) < 1e-5, res


def _run(config, workdir, sd_dir):
  config.model.pretrained = sd_dir
  return train.train_and_evaluate(config, str(workdir))


def _restore_params(workdir, step, like):
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
  try:
    state, _ = ck.restore(step, like)
  finally:
    ck.close()
  return state


@pytest.fixture(scope='module')
def full_run(tiny_sd_dir, tmp_path_factory):
  """(final state, workdir) of the uninterrupted 4-step reference run."""
  workdir = tmp_path_factory.mktemp('full')
  return _run(_config(num_steps=4), workdir, tiny_sd_dir), workdir


def _assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for x, y in zip(jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_SIGTERM_SCRIPT = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import jax
    jax.config.update('jax_compilation_cache_dir', {cache!r})
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    from dpg_jax import data as data_lib, train
    from tests import test_train as tt
    sample_batch = data_lib.sample_batch

    def batch_of(latents, *, step, **kw):
      if step == 3:   # a real SIGTERM, mid checkpoint interval, while step 3 is set up
        os.kill(os.getpid(), signal.SIGTERM)
      return sample_batch(latents, step=step, **kw)
    data_lib.sample_batch = batch_of
    config = tt._config(num_steps=4)
    config.model.pretrained = {sd_dir!r}
    train.train_and_evaluate(config, {workdir!r})
    print('NOT STOPPED')
''')


def test_sigterm_saves_the_current_step_and_resume_is_exact(full_run, tiny_sd_dir, tmp_path,
                                                           caplog):
  """SIGTERM between checkpoints (2 and 4): step 3 is saved, exit 143, and the
  rerun equals the uninterrupted run (params and optimiser state, bit-exact)."""
  workdir = tmp_path / 'w'
  script = tmp_path / 'sigterm.py'
  script.write_text(_SIGTERM_SCRIPT.format(
      repo=REPO, sd_dir=tiny_sd_dir, workdir=str(workdir),
      cache=jax.config.jax_compilation_cache_dir))
  out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 128 + 15, out.stderr[-3000:]
  assert 'NOT STOPPED' not in out.stdout and 'Traceback' not in out.stderr
  stopped = [l for l in out.stderr.splitlines() if 'Stopped by SIGTERM' in l]
  assert len(stopped) == 1 and stopped[0].endswith(
      f'Stopped by SIGTERM at step 3: checkpoint saved in {workdir}/checkpoints/3; rerun the '
      'same command to resume.'), out.stderr[-2000:]
  ck = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'))
  assert ck.all_steps() == [2, 3]
  ck.close()
  rows_before = writers.read_metrics(str(workdir))
  assert [r['step'] for r in rows_before] == [1, 2, 3]
  # A hard-killed run may have logged steps past its last checkpoint: they are redone.
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write(json.dumps({'step': 4, 'loss': -1.0}) + '\n')
  # Rerun; cadences changed on the way (safe: allowed, listed in one warning;
  # 0 = only at the end).
  with caplog.at_level('INFO'):
    resumed = _run(_config(num_steps=4, checkpoint_every=0, log_every=0), workdir, tiny_sd_dir)
  full, full_dir = full_run
  _assert_same_state(full, resumed)
  rows = writers.read_metrics(str(workdir))
  assert [r['step'] for r in rows] == [1, 2, 3, 4]   # 1-3 not rerun, 4 not duplicated
  assert rows[:3] == rows_before and rows[3]['loss'] > 0
  # The uninterrupted run's checkpoint is its final state; class images were reused.
  _assert_same_state(full, _restore_params(str(full_dir), 4, full))
  assert sorted(os.listdir(workdir / 'class_images')) == ['class_00000.png', 'class_00001.png']
  warned = [r.getMessage() for r in caplog.records if 'with config changes' in r.getMessage()]
  assert len(warned) == 1 and warned[0].endswith(
      'checkpoint_every: 2 -> 0; log_every: 1 -> 0'), warned
  ck = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'))
  assert ck.all_steps() == [3, 4]
  ck.close()
  summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Finished at')]
  assert len(summary) == 1
  assert summary[0].splitlines()[0] == f'Finished at step 4 (num_steps=4); outputs in {workdir}:'
  for part in (f'checkpoints  {workdir}/checkpoints (steps [3, 4])',
               f'metrics      {workdir}/metrics.jsonl', f'tensorboard --logdir {workdir}/tb',
               'export       off (config.export=False)'):
    assert part in summary[0], summary[0]


def test_structural_config_change_is_refused_before_model_load(tmp_path, monkeypatch):
  from dpg_jax import run_config  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  old = _config()
  ck = ckpt_lib.Checkpointer(str(workdir / 'checkpoints'), async_save=False)
  ck.save(2, {'w': jnp.ones(3)}, {'step': 2, 'config': run_config.config_dict(old)})
  ck.close()
  run_config.write_config_json(str(workdir), old)
  before = (workdir / 'config.json').read_text()

  def boom(*a, **k):
    raise AssertionError('model loaded before the config was checked')
  monkeypatch.setattr(train, 'load_model', boom)
  monkeypatch.setattr(train, 'load_instance_images', boom)
  new = _config(train_text_encoder=False, learning_rate=3e-4, num_steps=9)
  with pytest.raises(run_config.ConfigMismatchError) as err:
    train.train_and_evaluate(new, str(workdir))
  msg = str(err.value)
  assert f'checkpoint {workdir}/checkpoints/2 was trained with' in msg
  assert 'learning_rate: 0.0001 -> 0.0003' in msg and 'train_text_encoder: true -> false' in msg
  assert 'num_steps' not in msg
  assert (workdir / 'config.json').read_text() == before   # a refused start writes nothing
  assert not (workdir / 'config.1.json').exists()


def test_set_up_keeps_only_the_state_and_one_frozen_copy(tiny_sd, tiny_sd_dir, tmp_path):
  """After set-up the device holds the state, the frozen VAE + text encoder once, the rng."""
  gc.collect()
  before = jax.live_arrays()            # held: their ids cannot be reused meanwhile
  known = {id(x) for x in before}
  config = _config(train_text_encoder=False)
  config.model.pretrained = tiny_sd_dir
  run = train.set_up(config, str(tmp_path / 'w'))
  try:
    gc.collect()
    new = [x for x in jax.live_arrays() if id(x) not in known]
    want = jax.tree.leaves(run.state) + jax.tree.leaves(run.frozen_params) + [run.rng]
    nbytes = lambda xs: sum(x.nbytes for x in xs)
    assert {id(x) for x in want} <= {id(x) for x in new}
    # Besides them only constants (a schedule table, PRNG keys: 4 KB here); the
    # loaded UNet (1.6 MB) or a second VAE / text encoder would show.
    extra = [x for x in new if id(x) not in {id(y) for y in want}]
    assert nbytes(extra) <= 8192, [(x.shape, x.dtype) for x in extra][:10]
    _, params = tiny_sd
    assert sorted(run.frozen_params) == ['text_encoder', 'vae']
    assert nbytes(jax.tree.leaves(run.frozen_params)) == nbytes(
        jax.tree.leaves((params['vae'], params['text_encoder'])))
    assert nbytes(jax.tree.leaves(run.state.params)) == nbytes(jax.tree.leaves(params['unet']))
  finally:
    run.checkpointer.close()


def test_switching_subject_never_mixes_photos(tmp_path):
  """instance_images of another source (here a dataset subject) are replaced, not merged."""
  workdir = tmp_path / 'w'
  folder = workdir / 'instance_images'
  folder.mkdir(parents=True)
  Image.new('RGB', (64, 64), 'red').save(folder / 'dog_00.png')
  (folder / '.source.json').write_text(json.dumps({'dataset': 'dreambench', 'subject': 'dog'}))
  images, paths = train.load_instance_images(_config(), str(workdir))
  assert len(paths) == 5 and not any('dog' in os.path.basename(p) for p in paths)
  assert sorted(os.listdir(folder)) == sorted(
      ['.source.json', 'synthetic_subject.json'] + [os.path.basename(p) for p in paths])
  assert json.loads((folder / '.source.json').read_text()) == {'synthetic': True}
  again, _ = train.load_instance_images(_config(), str(workdir))   # same source: reused
  np.testing.assert_array_equal(images, again)


def test_non_finite_run_stops_without_checkpoint(tiny_sd_dir, tmp_path):
  config = _config(num_steps=3, learning_rate=1e30, max_grad_norm=0.0, warmup_steps=0)
  with pytest.raises(ckpt_lib.NonFiniteError, match='not finite; stopping without writing'):
    _run(config, tmp_path / 'nan', tiny_sd_dir)
  ck = ckpt_lib.Checkpointer(str(tmp_path / 'nan' / 'checkpoints'))
  assert ck.latest_step() is None
  ck.close()


def test_zero_steps_exports_the_base_without_compiling(tiny_sd, tiny_sd_dir, tmp_path,
                                                        monkeypatch):
  """num_steps=0 (an evaluation's base-model row): the export is the base itself."""
  def no_compile(*args, **kwargs):
    raise AssertionError('compiled a train step that never runs')
  monkeypatch.setattr(train, 'compile_ahead', no_compile)
  config = _config(num_steps=0, export=True, prior_preservation=False)
  _run(config, tmp_path / 'base', tiny_sd_dir)
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  _, base = tiny_sd
  _, exported = models.load_stable_diffusion(str(tmp_path / 'base' / 'export'))
  for name in ('unet', 'text_encoder'):
    jax.tree.map(np.testing.assert_array_equal, exported[name], base[name])


# --------------------------------------------------------------------------- #
# Bad input: clear errors before any model load or compile.
# --------------------------------------------------------------------------- #
def test_missing_instance_dir_errors_before_model_load(tmp_path, monkeypatch):
  def boom(*a, **k):
    raise AssertionError('model loaded before the data was checked')
  c = _config()
  c.data.synthetic = False
  c.data.instance_dir = str(tmp_path / 'nope')
  c.model.tiny = ''
  c.model.pretrained = str(tmp_path / 'missing_model')
  monkeypatch.setattr(train, 'load_model', boom)
  with pytest.raises(data_lib.DataError, match=r'nope.*data\.instance_dir|data\.instance_dir.*nope'):
    train.train_and_evaluate(c, str(tmp_path / 'w'))


@pytest.mark.parametrize('overrides, message', [
    ({'max_to_keep': 0}, 'config key max_to_keep=0: expected an integer >= 1'),
    ({'checkpoint_every': -1}, r'config key checkpoint_every=-1: expected an integer >= 0 \(0 = only'),
    ({'log_every': -5}, 'config key log_every=-5: expected an integer >= 0'),
    ({'sample_every': -1}, 'config key sample_every=-1: expected an integer >= 0'),
    ({'learning_rate': 0.0}, 'config key learning_rate=0.0: expected a finite number > 0'),
    ({'learning_rate': float('nan')}, 'config key learning_rate=nan: expected a finite'),
    ({'learning_rate': float('inf')}, 'config key learning_rate=inf: expected a finite'),
    ({'sample.prompts': ('a {identifier} {class_noun}', 'a {identifer} dog')},
     r"config key sample.prompts\[1\]='a \{identifer\} dog': unknown placeholder \{identifer\}"),
    ({'data.instance_prompt': 'a photo of {name}'},
     r"config key data.instance_prompt='a photo of \{name\}': unknown placeholder"),
    ({'data.class_prompt': 'a {class_noun'},
     r"config key data.class_prompt='a \{class_noun': .*literal brace"),
])
def test_validate_config_rejects(overrides, message):
  with pytest.raises(ValueError, match=message) as err:
    train.validate_config(_config(**overrides))
  assert '\n' not in str(err.value)


def test_validate_config_messages():
  c = _config()
  c.data.resolution = 60
  with pytest.raises(ValueError, match='data.resolution=60'):
    train.validate_config(c)
  c = _config()
  c.data.instance_dir = '/x'
  with pytest.raises(ValueError, match='exactly one of config keys data.instance_dir'):
    train.validate_config(c)
  c = _config(lr_schedule='exp')
  with pytest.raises(ValueError, match="lr_schedule='exp'"):
    train.validate_config(c)
  c = _config()
  c.sample.scheduler = 'euler'
  with pytest.raises(ValueError, match='sample.scheduler'):
    train.validate_config(c)


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(PermissionError, match='--workdir .*file/sub is not writable'):
    train.check_workdir(str(blocker / 'sub'))


def test_unknown_config_key_is_rejected_by_the_cli(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'dpg_jax.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.learning_rat=1e-4'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode != 0
  assert 'learning_rat' in out.stderr
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_sample_mode_from_export_and_from_checkpoint(tiny_sd_dir, tmp_path):
  """--mode=sample: an exported pipeline and a checkpoint-only workdir agree."""
  from dpg_jax import sample  # pylint: disable=g-import-not-at-top
  config = _config(num_steps=2, export=True)
  _run(config, tmp_path / 'run', tiny_sd_dir)
  config.sample.prompts = ('a {identifier} {class_noun} on the moon',)
  config.sample.num_images_per_prompt = 2
  config.sample.num_inference_steps = 2
  config.sample.output_dir = str(tmp_path / 'from_export')
  out = sample.sample_and_save(config, str(tmp_path / 'run'))
  manifest = json.load(open(os.path.join(out, 'manifest.json')))
  assert [m['prompt'] for m in manifest['images']] == ['a sks toy on the moon'] * 2
  assert [m['seed'] for m in manifest['images']] == [0, 1]
  a = [np.asarray(Image.open(os.path.join(out, m['file']))) for m in manifest['images']]
  assert a[0].shape == (64, 64, 3) and not np.array_equal(a[0], a[1])
  # Same run without its export: base model + trainable weights of the checkpoint.
  shutil.rmtree(tmp_path / 'run' / 'export')
  config.sample.output_dir = str(tmp_path / 'from_ckpt')
  out2 = sample.sample_and_save(config, str(tmp_path / 'run'))
  b = [np.asarray(Image.open(os.path.join(out2, m['file']))) for m in manifest['images']]
  for x, y in zip(a, b):
    assert np.abs(x.astype(int) - y.astype(int)).max() <= 1
  config.sample.source = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='no exported pipeline'):
    sample.sample_and_save(config, str(tmp_path))


def test_compile_ahead_says_when_the_persistent_cache_served_the_step():
  # A program no other run compiled (its constant is new): the first compile
  # writes the cache entry, the second (in-memory caches cleared) loads it.
  c = float(uuid.uuid4().int % 1_000_003)
  step = lambda s, b, r, f: jnp.tanh(s * c + b)
  x = jnp.ones((4,), jnp.float32)
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  try:
    first, second = {}, {}
    compiled, _ = train.compile_ahead(jax.jit(step), x, x, None, None, first)
    jax.clear_caches()
    again, _ = train.compile_ahead(jax.jit(step), x, x, None, None, second)
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', old)
  assert (first['cache_hit'], second['cache_hit']) == (False, True)
  np.testing.assert_array_equal(again(x, x, None, None), compiled(x, x, None, None))
  assert set(first) == {'trace_s', 'xla_compile_s', 'cache_hit'}
