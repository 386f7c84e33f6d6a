"""Tests for dpg_jax.sampling (tiny random SD, 64 px, CPU)."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from dpg_jax import sampling

PROMPTS = ['a photo of sks dog', 'a red cube on the beach', 'a cat in the snow']
STEPS = 3
RES = 64


@pytest.fixture(scope='module')
def cfg_sampler(tiny_sd):
  """DDIM + CFG at batch size 2: shared so most tests reuse one compilation."""
  sd, _ = tiny_sd
  return sampling.Sampler(sd, resolution=RES, scheduler='ddim', num_inference_steps=STEPS,
                          guidance_scale=3.0, batch_size=2)


@pytest.fixture(scope='module')
def cfg_images(tiny_sd, cfg_sampler):
  """Float images of PROMPTS with seeds (0, 1, 2): 2 chunks, the last padded."""
  _, params = tiny_sd
  return cfg_sampler.sample(params, PROMPTS, [0, 1, 2])


# -- schedulers ------------------------------------------------------------------
def test_unknown_scheduler_error(tiny_sd):
  with pytest.raises(ValueError, match=r"sample\.scheduler='euler'.*'ddim', 'pndm', 'dpm_solver'"):
    sampling.make_scheduler('euler', {})
  with pytest.raises(ValueError, match=r'sample\.scheduler'):
    sampling.Sampler(tiny_sd[0], resolution=RES, scheduler='lms')


@pytest.mark.parametrize('name', list(sampling.SCHEDULERS))
def test_make_scheduler_reads_config(tiny_sd, name):
  config = dict(tiny_sd[0].scheduler_config, prediction_type='v_prediction')
  sched = sampling.make_scheduler(name, config)
  assert isinstance(sched, sampling.SCHEDULERS[name])
  assert sched.config.prediction_type == 'v_prediction'
  assert sched.config.beta_schedule == 'scaled_linear'
  assert sched.config.num_train_timesteps == config['num_train_timesteps']
  if name == 'pndm':
    assert sched.config.skip_prk_steps
    # PLMS with skipped Runge-Kutta steps: n + 1 timesteps (one repeated), ending at 1.
    state = sched.set_timesteps(sched.create_state(), 4, (1, 4, 8, 8))
    np.testing.assert_array_equal(state.timesteps, [751, 501, 501, 251, 1])


def test_initial_noise_depends_only_on_seed():
  noise = np.asarray(sampling.initial_noise(np.array([7, 3, 7]), (4, 8, 8)))
  ref = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8)))
  np.testing.assert_array_equal(noise[1], ref)
  np.testing.assert_array_equal(noise[0], noise[2])
  assert np.abs(noise[0] - noise[1]).mean() > 0.5


# -- numpy references of the three solvers on a toy model ------------------------
# A stand-in for the SD components the Sampler calls, cheap to compile and
# easy to restate in numpy: the Sampler's loop (timesteps, CFG mix, scheduler
# state, PNDM's repeated step, DPM-Solver's order switches) is compared with
# the solvers written out below from their papers.
class _ToySD:
  vae_scale = 8
  latent_channels = 4
  unet = type('Unet', (), {'config': type('Cfg', (), {'block_out_channels': (32, 64)})})
  scheduler_config = {'_class_name': 'DDPMScheduler', 'beta_start': 0.00085, 'beta_end': 0.012,
                      'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000,
                      'prediction_type': 'epsilon', 'clip_sample': False,
                      'set_alpha_to_one': False, 'steps_offset': 1}

  @staticmethod
  def tokenize(prompts):
    return np.array([[len(p), sum(map(ord, p)) % 97, p.count(' ')] for p in prompts], np.int32)

  @staticmethod
  def encode_text(te, ids, xp=jnp):
    return xp.asarray(ids, xp.float32)[..., None] * te['w']          # [N, 3, 2]

  @staticmethod
  def predict(unet, x, t, context, xp=jnp):
    t = xp.asarray(t, xp.float32)[:, None, None, None] / 1000.0
    c = context.mean((1, 2))[:, None, None, None]
    return xp.tanh(unet['a'] * x + unet['b'] * t + 0.02 * c) + 0.1 * x

  @staticmethod
  def decode_latents(vae, latents, xp=jnp):
    img = xp.transpose(latents[:, :3], (0, 2, 3, 1)) * vae['s']
    return xp.repeat(xp.repeat(img, 8, axis=1), 8, axis=2)            # [B, 8h, 8w, 3]


_TOY_PARAMS = {'unet': {'a': np.float32(0.7), 'b': np.float32(-0.5)},
               'vae': {'s': np.float32(0.4)}, 'text_encoder': {'w': np.array([0.3, -0.2],
                                                                          np.float32)}}
_TOY_RES = 32


def _abar():
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas)


def _toy_eps(x, t, cond, uncond, g):
  """Classifier-free guided noise prediction of the toy model, float64."""
  pr = lambda ctx: _ToySD.predict(_TOY_PARAMS['unet'], x, np.full(len(x), t), ctx, xp=np)
  eu, ec = pr(uncond), pr(cond)
  return eu + g * (ec - eu)


def _ddim_reference(x, eps_fn, n):
  """DDIM, eta = 0 (Song et al. Eq. 12), SD's 'leading' timesteps + offset 1."""
  abar, ratio = _abar(), 1000 // n
  for t in np.arange(n)[::-1] * ratio + 1:
    e = eps_fn(x, t)
    a_t, a_prev = abar[t], abar[t - ratio] if t - ratio >= 0 else abar[0]
    x0 = (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t)
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
  return x


def _pndm_step(x, e, t, t_prev, abar):
  """PNDM's transfer (Liu et al. 2022, Eq. 9) from t to t_prev."""
  a_t, a_p = abar[t], abar[t_prev] if t_prev >= 0 else abar[0]
  denom = a_t * np.sqrt(1 - a_p) + np.sqrt(a_t * (1 - a_t) * a_p)
  return np.sqrt(a_p / a_t) * x - (a_p - a_t) * e / denom


def _plms_reference(x, eps_fn, n):
  """PLMS (PNDM with the Runge-Kutta warm-up skipped), as SD pipelines run it.

  The first step is taken twice (Heun-like): x_T -> x_1 with e(x_T), then
  x_T -> x_1 again with the mean of e(x_T) and e(x_1 estimate); later steps
  use the 2-, 3- and 4-step Adams-Bashforth combinations of past e.
  """
  abar, r = _abar(), 1000 // n
  ts = np.arange(n)[::-1] * r + 1
  e0 = eps_fn(x, ts[0])
  x_first = _pndm_step(x, e0, ts[0], ts[0] - r, abar)
  x = _pndm_step(x, (eps_fn(x_first, ts[0] - r) + e0) / 2, ts[0], ts[0] - r, abar)
  ets = [e0]
  for t in ts[1:]:
    ets.append(eps_fn(x, t))
    e = {2: lambda: (3 * ets[-1] - ets[-2]) / 2,
         3: lambda: (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12}.get(
             len(ets), lambda: (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24)()
    x = _pndm_step(x, e, t, t - r, abar)
  return x


def _dpm_solver_reference(x, eps_fn, n):
  """DPM-Solver++(2M), midpoint (Lu et al. 2022, Alg. 2): data prediction,
  first order at the first and (fewer than 15 steps) the last step; the Flax
  scheduler's timesteps linspace(0, 999, n + 1) and final target t = 0."""
  abar = _abar()
  alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
  lam = np.log(alpha) - np.log(sigma)
  ts = np.round(np.linspace(0, 999, n + 1))[::-1][:-1].astype(int)
  prev_x0 = prev_s = None
  for i, s in enumerate(ts):
    t = ts[i + 1] if i + 1 < n else 0
    x0 = (x - sigma[s] * eps_fn(x, s)) / alpha[s]
    h = lam[t] - lam[s]
    d = x0
    if prev_x0 is not None and (i != n - 1 or n >= 15):
      r0 = (lam[s] - lam[prev_s]) / h
      d = x0 + 0.5 * (x0 - prev_x0) / r0
    x = (sigma[t] / sigma[s]) * x - alpha[t] * np.expm1(-h) * d
    prev_x0, prev_s = x0, s
  return x


_REFERENCES = {'ddim': _ddim_reference, 'pndm': _plms_reference,
               'dpm_solver': _dpm_solver_reference}


def _toy_reference(name, prompts, seeds, n, g, negative=''):
  te = _TOY_PARAMS['text_encoder']
  enc = lambda ps: _ToySD.encode_text(te, _ToySD.tokenize(ps), xp=np).astype(np.float64)
  cond, uncond = enc(prompts), np.repeat(enc([negative]), len(prompts), 0)
  h = _TOY_RES // 8
  x = np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(s), (4, h, h)), np.float64)
                for s in seeds])
  x = _REFERENCES[name](x, lambda x, t: _toy_eps(x, t, cond, uncond, g), n)
  return np.clip(_ToySD.decode_latents(_TOY_PARAMS['vae'], x, xp=np), -1.0, 1.0)


@pytest.mark.parametrize('name,steps', [('ddim', 4), ('pndm', 4), ('pndm', 6),
                                        ('dpm_solver', 4), ('dpm_solver', 20)])
def test_solvers_match_numpy_references(name, steps):
  sampler = sampling.Sampler(_ToySD(), resolution=_TOY_RES, scheduler=name,
                             num_inference_steps=steps, guidance_scale=3.0, batch_size=2)
  prompts, seeds = PROMPTS, [0, 1, 2]   # 2 chunks, the last one padded
  got = sampler.sample(_TOY_PARAMS, prompts, seeds, negative_prompt='blue snow')
  want = _toy_reference(name, prompts, seeds, steps, 3.0, negative='blue snow')
  assert got.shape == (3, _TOY_RES, _TOY_RES, 3)
  assert np.abs(want).max() > 0.3 and 0.0 < np.mean(np.abs(want) == 1.0) < 0.5  # informative
  np.testing.assert_allclose(got, want, atol=2e-5)
  # The solvers differ from one another by far more than that tolerance.
  others = [_toy_reference(o, prompts, seeds, steps, 3.0, negative='blue snow')
            for o in _REFERENCES if o != name]
  assert min(np.abs(o - want).max() for o in others) > 1e-2


# -- the same numpy solvers driving the tiny SD: recorded references ---------------
REAL_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                            'sampling_reference.npz')
# scheduler -> (prompts, seeds); all at STEPS steps, guidance 3, 64 px, '' negative.
REAL_CASES = {'ddim': (PROMPTS, [0, 1, 2]), 'pndm': (PROMPTS[:1], [0]),
              'dpm_solver': (PROMPTS[:1], [0])}


def pool(images, k=4):
  """[N, H, W, C] -> [N, H/k, W/k, C] block means (what the fixture stores)."""
  n, h, w, c = images.shape
  return np.asarray(images, np.float64).reshape(n, h // k, k, w // k, k, c).mean((2, 4))


def real_reference(sd, params, name, prompts, seeds, steps=STEPS, g=3.0):
  """Images of the numpy solver `name` driving the tiny SD's UNet, CLIP and VAE."""
  enc, unet = jax.jit(sd.encode_text), jax.jit(sd.predict)
  cond = enc(params['text_encoder'], sd.tokenize(prompts))
  uncond = jnp.broadcast_to(enc(params['text_encoder'], sd.tokenize([''])), cond.shape)

  def eps_fn(x, t):
    x, t = jnp.asarray(x, jnp.float32), jnp.full((len(x),), t, jnp.int32)
    eu, ec = (np.asarray(unet(params['unet'], x, t, c), np.float64) for c in (uncond, cond))
    return eu + g * (ec - eu)

  h = RES // sd.vae_scale
  x = np.stack([np.asarray(jax.random.normal(jax.random.PRNGKey(s), (sd.latent_channels, h, h)),
                           np.float64) for s in seeds])
  x = _REFERENCES[name](x, eps_fn, steps)
  images = jax.jit(sd.decode_latents)(params['vae'], jnp.asarray(x, jnp.float32))
  return np.clip(np.asarray(images, np.float64), -1.0, 1.0)


# -- sampling --------------------------------------------------------------------
@pytest.fixture(scope='module')
def recorded():
  with np.load(REAL_FIXTURE) as f:
    return {k: f[k] for k in f.files}


# Sampler vs the recorded numpy solvers: max |diff| of the 4x4 block means was
# 2e-6 to 3.5e-6 when recorded (float32 XLA vs float64 numpy around the same UNet).
_REAL_ATOL = 1e-4


def test_ddim_matches_numpy_reference(tiny_sd, cfg_sampler, cfg_images, recorded):
  assert cfg_images.shape == (3, RES, RES, 3) and cfg_images.dtype == np.float32
  np.testing.assert_allclose(pool(cfg_images), recorded['ddim'], atol=_REAL_ATOL)
  u8 = cfg_sampler(tiny_sd[1], PROMPTS[:2], [0, 1])
  assert u8.shape == (2, RES, RES, 3) and u8.dtype == np.uint8
  np.testing.assert_array_equal(u8, sampling.to_uint8(cfg_images[:2]))


@pytest.mark.parametrize('name', ['pndm', 'dpm_solver'])
def test_pndm_and_dpm_solver_match_numpy_references(tiny_sd, recorded, name):
  sd, params = tiny_sd
  # Batch size 1: one compile of the smallest program (~15 s cold on 2 cores).
  sampler = sampling.Sampler(sd, resolution=RES, scheduler=name, num_inference_steps=STEPS,
                             guidance_scale=3.0, batch_size=1)
  images = sampler.sample(params, *REAL_CASES[name])
  assert images.shape == (1, RES, RES, 3) and images.dtype == np.float32
  np.testing.assert_allclose(pool(images), recorded[name], atol=_REAL_ATOL)
  # The solvers' images are far apart compared with that tolerance.
  assert min(np.abs(recorded[name] - recorded[o][:1]).max()
             for o in REAL_CASES if o != name) > 20 * _REAL_ATOL


@pytest.mark.slow
def test_recorded_references_are_the_numpy_solvers(tiny_sd, recorded):
  """tests/fixtures/make_sampling_fixtures.py wrote what the numpy solvers give."""
  for name, case in REAL_CASES.items():
    np.testing.assert_allclose(pool(real_reference(*tiny_sd, name, *case)), recorded[name],
                               atol=1e-5, err_msg=name)


def test_seeds(tiny_sd, cfg_sampler, cfg_images):
  _, params = tiny_sd
  same = cfg_sampler.sample(params, [PROMPTS[0]] * 3, [5, 9, 5])
  # Positions 0 and 2 fall in different chunks (and 2 is padded): still identical.
  np.testing.assert_allclose(same[0], same[2], atol=1e-6)
  assert np.abs(same[0] - same[1]).mean() > 0.05
  assert np.abs(same[0] - cfg_images[0]).mean() > 0.05  # seed 5 vs seed 0
  np.testing.assert_array_equal(cfg_sampler(params, [PROMPTS[0]], [5]),
                                cfg_sampler(params, [PROMPTS[0]], [5]))


def test_invariant_to_batch_size_and_padding(tiny_sd, cfg_sampler, cfg_images):
  sd, params = tiny_sd
  # Batch size 4: one chunk, one padding row (vs 2 chunks at batch size 2).
  bs4 = sampling.Sampler(sd, resolution=RES, scheduler='ddim', num_inference_steps=STEPS,
                         guidance_scale=3.0, batch_size=4)
  images = bs4.sample(params, PROMPTS, [0, 1, 2])
  # Not bit-exact: XLA:CPU may pick other matmul blockings for other batch sizes.
  np.testing.assert_allclose(images, cfg_images, atol=1e-5)
  # One prompt alone (1 real row + 1 padding row) and moved to another position.
  alone = cfg_sampler.sample(params, [PROMPTS[2], PROMPTS[1]], [2, 1])
  np.testing.assert_allclose(alone, cfg_images[[2, 1]], atol=1e-5)
  assert cfg_sampler.sample(params, [], []).shape == (0, RES, RES, 3)


def test_negative_prompt_changes_cfg_output(tiny_sd, cfg_sampler, cfg_images):
  neg = cfg_sampler.sample(tiny_sd[1], PROMPTS[:1], [0], negative_prompt='blue snow')
  assert np.abs(neg[0] - cfg_images[0]).mean() > 0.01


@pytest.mark.slow  # two compilations (~25 s on 2 busy cores)
def test_guidance_one_skips_uncond_pass(tiny_sd):
  sd, params = tiny_sd
  kw = dict(resolution=RES, scheduler='ddim', num_inference_steps=STEPS, guidance_scale=1.0,
            batch_size=2)
  plain = sampling.Sampler(sd, **kw)
  assert not plain.do_cfg
  forced = sampling.Sampler(sd, **kw)
  forced.do_cfg = True  # the CFG formula with scale 1, before the first trace
  a = plain.sample(params, PROMPTS[:2], [0, 1])
  b = forced.sample(params, PROMPTS[:2], [0, 1])
  np.testing.assert_allclose(a, b, atol=1e-5)
  # No unconditional pass: the negative prompt cannot matter.
  c = plain.sample(params, PROMPTS[:2], [0, 1], negative_prompt='a cat')
  np.testing.assert_array_equal(a, c)


def test_new_params_do_not_recompile(tiny_sd, cfg_sampler, cfg_images):
  _, params = tiny_sd
  cfg_sampler.sample(params, PROMPTS[:1], [0])  # compiled (by cfg_images) and traced once
  traces, cache = cfg_sampler.trace_count, cfg_sampler._generate_jit._cache_size()
  assert traces == 1 and cache == 1
  # As after a training step: new values, same structure (the UNet is perturbed).
  perturbed = dict(params, unet=jax.tree.map(lambda x: x * 1.05, params['unet']))
  images = cfg_sampler.sample(perturbed, PROMPTS, [0, 1, 2])
  assert np.abs(images - cfg_images).mean() > 1e-3  # params were arguments, not constants
  assert cfg_sampler.trace_count == traces
  assert cfg_sampler._generate_jit._cache_size() == cache


def test_bad_inputs(tiny_sd, cfg_sampler):
  with pytest.raises(ValueError, match='2 prompts but 1 seeds'):
    cfg_sampler.sample(tiny_sd[1], PROMPTS[:2], [0])
  with pytest.raises(ValueError, match='seeds'):
    cfg_sampler.sample(tiny_sd[1], PROMPTS[:1], [-1])
  with pytest.raises(ValueError, match='multiple of 16'):
    sampling.Sampler(tiny_sd[0], resolution=40)


_MESH_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from dpg_jax import models, sampling, sharding
    assert jax.device_count() == 4, jax.devices()
    sd, params = models.load_stable_diffusion(sys.argv[1])
    prompts = ['a photo of sks dog', 'a red cube on the beach', 'a cat in the snow',
               'a dog on the grass', 'a blue sphere']
    seeds = [0, 1, 2, 3, 4]
    kw = dict(resolution=64, num_inference_steps=3, guidance_scale=3.0)
    sharded = sampling.Sampler(sd, batch_size=3, mesh=sharding.make_mesh(), **kw)
    np.save(sys.argv[2], sharded.sample(params, prompts, seeds))
    rep = sharding.replicated(sharded.mesh)
    out = sharded._generate_jit(
        sharded._put_params(params), sharded._put_batch(sd.tokenize(prompts[:4])),
        sharding.put_global(sd.tokenize(['']), rep),
        sharded._put_batch(np.arange(4, dtype=np.uint32)))
    print(json.dumps({
        'batch_size': sharded.batch_size,
        'out_devices': len(out.sharding.device_set),
        'shard_rows': [s.data.shape[0] for s in out.addressable_shards],
    }))
''')


def test_mesh_sharded_matches_single_device(tiny_sd, tiny_sd_dir, cfg_sampler, tmp_path):
  """4 CPU devices: the batch is split over them and the images equal one device's."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4',
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                         os.environ.get('PYTHONPATH', '')]))
  # The tests' persistent compilation cache (tests/conftest.py), for reruns.
  env['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1'
  out = str(tmp_path / 'sharded.npy')
  proc = subprocess.run([sys.executable, '-c', _MESH_SCRIPT, tiny_sd_dir, out], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  assert res['batch_size'] == 4  # 3 rounded up to the 4-device data axis
  assert res['out_devices'] == 4 and res['shard_rows'] == [1, 1, 1, 1]
  # The reference: the one-device sampler (batch 2: other chunking and padding).
  prompts = PROMPTS + ['a dog on the grass', 'a blue sphere']
  want = cfg_sampler.sample(tiny_sd[1], prompts, [0, 1, 2, 3, 4])
  np.testing.assert_allclose(np.load(out), want, atol=1e-5)


# -- image files -------------------------------------------------------------------
def _toy_images(n, h=4, w=6):
  return (np.arange(n * h * w * 3).reshape(n, h, w, 3) % 251).astype(np.uint8)


def test_image_grid_layout():
  images = _toy_images(5)
  grid = sampling.image_grid(images)  # ceil(sqrt(5)) = 3 columns, 2 rows
  assert grid.shape == (8, 18, 3) and grid.dtype == np.uint8
  np.testing.assert_array_equal(grid[4:8, 6:12], images[4])
  np.testing.assert_array_equal(grid[0:4, 12:18], images[2])
  assert not grid[4:8, 12:18].any()  # empty cell
  assert sampling.image_grid(images, ncols=5).shape == (4, 30, 3)
  assert sampling.image_grid(images, ncols=9).shape == (4, 30, 3)
  with pytest.raises(ValueError, match='uint8'):
    sampling.image_grid(images.astype(np.float32))


def test_save_images_and_grid(tmp_path):
  images = _toy_images(3)
  paths = sampling.save_images(images, str(tmp_path / 'out'), 'step_10')
  assert [os.path.basename(p) for p in paths] == [
      'step_10_0000.png', 'step_10_0001.png', 'step_10_0002.png']
  for p, im in zip(paths, images):
    np.testing.assert_array_equal(np.asarray(Image.open(p)), im)
  named = sampling.save_images(images[1:], str(tmp_path / 'out'), names=['x.png', 'y.png'])
  assert [os.path.basename(p) for p in named] == ['x.png', 'y.png']
  np.testing.assert_array_equal(np.asarray(Image.open(named[1])), images[2])
  path = sampling.save_grid(images, str(tmp_path / 'grid.png'), ncols=1)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), sampling.image_grid(images, 1))
  sampling.save_grid(images[:1], path)  # overwrites in place
  np.testing.assert_array_equal(np.asarray(Image.open(path)), images[0])
  assert sorted(os.listdir(tmp_path)) == ['grid.png', 'out']  # no temp files left
