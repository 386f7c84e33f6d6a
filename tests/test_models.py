"""Loader, export and module variants of the tiny SD; parity with PyTorch."""
import fnmatch
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from configs import default as default_config
from dpg_jax import export
from dpg_jax import models
from dpg_jax import sample
from dpg_jax import sampling
from dpg_jax import tiny
from dpg_jax import weights

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
PT_DIR = os.path.join(FIXTURES, 'sd_tiny_pt')


@pytest.fixture(scope='module')
def parity():
  return dict(np.load(os.path.join(FIXTURES, 'sd_parity.npz')))


@pytest.fixture(scope='module')
def pt_sd():
  """The recorded PyTorch-format tiny SD (safetensors fp16 + pytorch .bin)."""
  return models.load_stable_diffusion(PT_DIR)


def _maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _inputs():
  rng = np.random.default_rng(0)
  lat = jnp.asarray(rng.standard_normal((1, 4, 8, 8)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((1, 77, 32)), jnp.float32)
  return lat, jnp.full((1,), 500, jnp.int32), ctx


@pytest.fixture(scope='module')
def fp32_ref(tiny_sd):
  """fp32 UNet eps on _inputs() and CLIP states of one prompt (compiled once)."""
  sd, params = tiny_sd
  ids = sd.tokenize(['a photo of sks dog'])
  return (jax.jit(sd.predict)(params['unet'], *_inputs()),
          ids, jax.jit(sd.encode_text)(params['text_encoder'], ids))


# -- parity with the PyTorch reference ------------------------------------------
def test_unet_parity(pt_sd, parity):
  sd, params = pt_sd
  eps = jax.jit(sd.predict)(params['unet'], parity['latents'], parity['timesteps'],
                            parity['context'])
  assert eps.dtype == jnp.float32
  assert _maxdiff(eps, parity['unet_eps']) <= 1e-4


def test_vae_parity(pt_sd, parity):
  sd, params = pt_sd
  mean, std = jax.jit(sd.encode_images)(params['vae'], parity['images'])
  assert _maxdiff(mean, parity['vae_mean']) <= 1e-4
  assert _maxdiff(std, parity['vae_std']) <= 1e-4
  img = jax.jit(sd.decode_latents)(params['vae'], parity['latents'] * sd.scaling_factor)
  assert _maxdiff(img, parity['vae_decoded']) <= 1e-4


def test_text_encoder_parity(pt_sd, parity):
  sd, params = pt_sd
  ids = sd.tokenize(['a photo of sks dog', 'a red cube on the grass'])
  np.testing.assert_array_equal(ids, parity['input_ids'])
  hidden = jax.jit(sd.encode_text)(params['text_encoder'], ids)
  assert _maxdiff(hidden, parity['te_hidden']) <= 1e-4


def test_pt_load_never_inits_eagerly(monkeypatch):
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

  def guard(orig):
    def init_weights(self, rng, *args, **kwargs):
      # Only abstract (jax.eval_shape) calls are allowed: no random weights.
      assert isinstance(rng, jax.core.Tracer), 'eager random init'
      return orig(self, rng, *args, **kwargs)
    return init_weights

  for cls in (FlaxUNet2DConditionModel, FlaxAutoencoderKL, FlaxCLIPTextModel):
    monkeypatch.setattr(cls, 'init_weights', guard(cls.init_weights))
  _, params = models.load_stable_diffusion(PT_DIR, weights_format='auto')
  assert set(params) == {'unet', 'vae', 'text_encoder'}


# -- tiny builder -----------------------------------------------------------------
def test_tiny_sd_layout_and_idempotence(tiny_sd_dir, tiny_sd):
  sd, params = tiny_sd
  assert (sd.vae_scale, sd.latent_channels, sd.max_length) == (8, 4, 77)
  assert sd.unet.config.sample_size == 8 and sd.prediction_type == 'epsilon'
  assert sd.num_train_timesteps == 1000
  np.testing.assert_allclose(float(sd.alphas_cumprod()[-1]), 0.0047, atol=1e-4)  # SD1.4's.
  ids = sd.tokenize(['a photo of sks dog'])
  vocab, _ = tiny.tokenizer_vocab()
  bos, eos = vocab['<|startoftext|>'], vocab['<|endoftext|>']
  # Whole words are single tokens: bos, a, photo, of, sks, dog, eos, pad...
  assert ids.shape == (1, 77) and ids[0, 0] == bos and ids[0, 6] == eos
  assert (ids[0, 6:] == eos).all() and (ids[0, 1:6] < bos).all()
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  mtime = os.path.getmtime(os.path.join(tiny_sd_dir, 'unet', 'diffusion_flax_model.msgpack'))
  assert tiny.build_tiny_sd(tiny_sd_dir) == tiny_sd_dir  # Reused, not rebuilt.
  assert os.path.getmtime(
      os.path.join(tiny_sd_dir, 'unet', 'diffusion_flax_model.msgpack')) == mtime
  with pytest.raises(ValueError, match='seed'):
    tiny.build_tiny_sd(tiny_sd_dir, seed=1)


def test_tiny_sd_deterministic(tmp_path, tiny_sd_dir):
  a = tiny.build_tiny_sd(tmp_path / 'again')
  for comp in ('unet', 'vae'):
    name = os.path.join(comp, 'diffusion_flax_model.msgpack')
    with open(os.path.join(a, name), 'rb') as f1, open(os.path.join(tiny_sd_dir, name), 'rb') as f2:
      assert f1.read() == f2.read()
  assert not [n for n in os.listdir(tmp_path) if n != 'again']  # No temp dirs left.


# -- export -------------------------------------------------------------------------
EXPORT_RUN = {'prompt': 'a photo of sks dog', 'seed': 3, 'num_inference_steps': 4,
              'guidance_scale': 7.5, 'resolution': 64}  # = make_sd_fixtures.EXPORT_RUN
PT_WEIGHTS = {'unet': 'diffusion_pytorch_model', 'vae': 'diffusion_pytorch_model',
              'text_encoder': 'model'}


def _equal_trees(a, b):
  flat = jax.tree.leaves(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()),
                                      a, b))
  return jax.tree.structure(a) == jax.tree.structure(b) and bool(flat) and all(flat)


@pytest.fixture(scope='module')
def ddim_image(tiny_sd):
  """Our sampler's image for EXPORT_RUN (DDIM), float32 in [0, 1]."""
  sd, params = tiny_sd
  r = EXPORT_RUN
  sampler = sampling.Sampler(sd, resolution=r['resolution'], scheduler='ddim',
                             num_inference_steps=r['num_inference_steps'],
                             guidance_scale=r['guidance_scale'], batch_size=1)
  latents = sampling.initial_noise([r['seed']], sampler.latent_shape)
  image = (sampler.sample(params, [r['prompt']], [r['seed']]) + 1) / 2
  return np.asarray(latents), image


def test_save_pipeline_roundtrip(tmp_path, tiny_sd):
  sd, params = tiny_sd
  out = models.save_pipeline(tmp_path / 'export', sd, params)
  models.save_pipeline(out, sd, params)  # Overwrites in place.
  assert sorted(os.listdir(tmp_path)) == ['export']
  sd2, params2 = models.load_stable_diffusion(out)
  assert _equal_trees(params, params2)
  assert sd2.scheduler_config['_class_name'] == 'DDIMScheduler'
  # Same training schedule as the source (DDPM config), so training resumes alike.
  np.testing.assert_array_equal(sd2.alphas_cumprod(), sd.alphas_cumprod())
  with open(os.path.join(out, 'model_index.json')) as f:
    assert json.load(f)['scheduler'] == ['diffusers', 'FlaxDDIMScheduler']


def test_flax_export_generates_like_sampler(tmp_path, tiny_sd, ddim_image):
  from diffusers import FlaxDPMSolverMultistepScheduler, FlaxStableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  from flax.jax_utils import replicate  # pylint: disable=g-import-not-at-top
  from flax.training.common_utils import shard  # pylint: disable=g-import-not-at-top
  sd, params = tiny_sd
  out = models.save_pipeline(tmp_path / 'export', sd, params)
  # Exactly as saved: default scheduler, no overrides.
  pipe, pparams = FlaxStableDiffusionPipeline.from_pretrained(
      out, safety_checker=None, feature_extractor=None)
  assert type(pipe.scheduler).__name__ == 'FlaxDDIMScheduler'
  for comp in ('unet', 'vae', 'text_encoder'):
    assert _equal_trees(dict(pparams[comp]), params[comp]), comp
  latents, want = ddim_image
  r = EXPORT_RUN
  # jit=True: one pmap'd program (over 1 device), compiled once and cached;
  # eager dispatch of the pipeline's ops takes 4x as long on CPU.
  got = pipe(shard(sd.tokenize([r['prompt']])), replicate(pparams),
             jax.random.split(jax.random.PRNGKey(0), 1),
             num_inference_steps=r['num_inference_steps'], height=r['resolution'],
             width=r['resolution'], guidance_scale=r['guidance_scale'],
             latents=shard(latents), jit=True).images[0]
  assert np.asarray(got).shape == want.shape == (1, 64, 64, 3)
  assert float(want.std()) > 0.1  # A non-trivial image.
  # Same computation up to batching (the pipeline concatenates the CFG halves).
  assert _maxdiff(got, want) <= 1e-4
  # Flax class names in model_index.json let users swap the scheduler.
  sched, _ = FlaxDPMSolverMultistepScheduler.from_pretrained(out, subfolder='scheduler')
  pipe2, _ = FlaxStableDiffusionPipeline.from_pretrained(
      out, scheduler=sched, safety_checker=None, feature_extractor=None)
  assert type(pipe2.scheduler).__name__ == 'FlaxDPMSolverMultistepScheduler'


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_torch_export_layout_and_roundtrip(tmp_path, tiny_sd, ddim_image):
  sd, params = tiny_sd
  out = export.save_torch_pipeline(tmp_path / 'export_torch', sd, params, fp16=True)
  # The project's torch-free PyTorch loader reads back the very same params.
  sd2, params2 = models.load_stable_diffusion(out, weights_format='safetensors')
  assert _equal_trees(params, params2)
  assert sd2.scheduler_config['_class_name'] == 'DDIMScheduler'
  with open(os.path.join(out, 'model_index.json')) as f:
    index = json.load(f)
  assert (index['_class_name'], index['unet'], index['scheduler']) == (
      'StableDiffusionPipeline', ['diffusers', 'UNet2DConditionModel'],
      ['diffusers', 'DDIMScheduler'])
  # Key names and shapes of the recorded PyTorch diffusers/transformers models.
  recorded = {'unet': 'unet/diffusion_pytorch_model.safetensors',
              'vae': 'vae/diffusion_pytorch_model.safetensors',
              'text_encoder': 'text_encoder/pytorch_model.bin'}
  for comp, stem in PT_WEIGHTS.items():
    want = {k: v.shape for k, v in weights.read_state_dict(
        os.path.join(PT_DIR, recorded[comp])).items()}
    got = safetensors.numpy.load_file(os.path.join(out, comp, f'{stem}.safetensors'))
    assert {k: v.shape for k, v in got.items()} == want, comp
    assert all(v.dtype == np.float32 for v in got.values())
    half = safetensors.numpy.load_file(os.path.join(out, comp, f'{stem}.fp16.safetensors'))
    assert sorted(half) == sorted(got)
    for k, v in half.items():
      assert v.dtype == np.float16
      np.testing.assert_array_equal(v, got[k].astype(np.float16))
    with open(os.path.join(out, comp, 'config.json')) as f:
      cfg = json.load(f)
    assert cfg.get('_class_name', cfg.get('architectures', [''])[0]) == {
        'unet': 'UNet2DConditionModel', 'vae': 'AutoencoderKL',
        'text_encoder': 'CLIPTextModel'}[comp]
    assert 'use_memory_efficient_attention' not in cfg

  # What PyTorch diffusers made of this very export (make_sd_fixtures.py check).
  with open(os.path.join(FIXTURES, 'sd_torch_export.json')) as f:
    record = json.load(f)
  assert record['run'] == EXPORT_RUN
  for rel, digest in record['files'].items():
    assert _sha256(os.path.join(out, rel)) == digest, (
        f'{rel} differs from the recorded export: re-run tests/fixtures/make_sd_fixtures.py '
        'export/check')
  for variant, dtype in (('fp32', 'torch.float32'), ('fp16', 'torch.float16')):
    entry = record[variant]
    assert entry['classes'] == {'vae': 'AutoencoderKL', 'text_encoder': 'CLIPTextModel',
                                'tokenizer': 'CLIPTokenizer', 'unet': 'UNet2DConditionModel',
                                'scheduler': 'DDIMScheduler'}
    for comp, c in entry['components'].items():
      n = len(safetensors.numpy.load_file(os.path.join(out, comp, PT_WEIGHTS[comp]
                                                       + '.safetensors')))
      assert (c['file_keys'], c['model_keys'], c['missing'], c['unexpected'],
              c['dtypes']) == (n, n, [], [], [dtype]), (variant, comp)
  # PyTorch's StableDiffusionPipeline on the export == our DDIM sampler, same
  # latents, to 1e-3 in [0, 1] (a quarter of a uint8 level; measured 3.2e-4):
  # diffusers' Flax GEGLU uses tanh-GELU where PyTorch uses erf, ~1e-4 per step.
  latents, want = ddim_image
  assert hashlib.sha256(latents.tobytes()).hexdigest() == record['latents_sha256']
  torch_image = np.load(os.path.join(FIXTURES, 'sd_torch_export.npz'))['image']
  assert torch_image.shape == want.shape
  assert _maxdiff(torch_image, want) <= 1e-3
  assert float(np.abs(torch_image - want).mean()) <= 1e-4


def test_export_pipeline_formats(tmp_path, tiny_sd):
  sd, params = tiny_sd
  for fmt, dirs in (('flax', ['export']), ('torch', ['export_torch']),
                    ('both', ['export', 'export_torch'])):
    paths = export.export_pipeline(tmp_path / fmt, sd, params, export_format=fmt)
    assert sorted(os.listdir(tmp_path / fmt)) == dirs
    assert paths == [str(tmp_path / fmt / d) for d in dirs]
  unet_files = os.listdir(tmp_path / 'torch' / 'export_torch' / 'unet')
  assert sorted(unet_files) == ['config.json', 'diffusion_pytorch_model.safetensors']  # No fp16.
  with pytest.raises(ValueError, match=r"config key export_format='onnx': expected one of"):
    export.export_pipeline(tmp_path / 'x', sd, params, export_format='onnx')
  config = default_config.get_config()
  export.check_config(config)
  # --mode=sample finds a torch-only export of a workdir.
  _, loaded, info = sample.load_trained(str(tmp_path / 'torch'), config)
  assert info['weights'] == 'export' and info['path'].endswith('export_torch')
  assert _equal_trees(loaded, params)
  config.export_format = 'pytorch'
  with pytest.raises(ValueError, match=r"config key export_format='pytorch'"):
    export.check_config(config)


# -- module variants --------------------------------------------------------------
def test_remat_same_loss_and_grads(tiny_sd_dir, tiny_sd):
  sd, params = tiny_sd
  sd_remat, _ = models.load_stable_diffusion(tiny_sd_dir, remat=True)
  assert sd_remat.remat and type(sd_remat.unet).__name__ == 'RematFlaxUNet2DConditionModel'
  lat, t, ctx = _inputs()

  def loss_and_grad(m):
    loss = lambda p: jnp.mean(jnp.square(m.predict(p, lat, t, ctx) - lat))
    return jax.jit(jax.value_and_grad(loss))(params['unet'])

  l1, g1 = loss_and_grad(sd)
  l2, g2 = loss_and_grad(sd_remat)
  assert abs(float(l1) - float(l2)) <= 1e-5
  assert max(jax.tree.leaves(jax.tree.map(_maxdiff, g1, g2))) <= 1e-5
  assert max(jax.tree.leaves(jax.tree.map(lambda g: float(jnp.abs(g).max()), g1))) > 0


def test_attention_variants_match(tiny_sd_dir, tiny_sd, fp32_ref):
  _, params = tiny_sd
  want = fp32_ref[0]
  for attention in ('memory_efficient', 'split_head_dim'):
    sd_a, _ = models.load_stable_diffusion(tiny_sd_dir, attention=attention)
    assert sd_a.unet.use_memory_efficient_attention == (attention == 'memory_efficient')
    assert sd_a.unet.split_head_dim == (attention == 'split_head_dim')
    got = jax.jit(sd_a.predict)(params['unet'], *_inputs())
    assert _maxdiff(got, want) <= 1e-4, attention


def test_bf16_compute_fp32_params(tiny_sd_dir, fp32_ref):
  want, ids, h32 = fp32_ref
  sd16, params16 = models.load_stable_diffusion(tiny_sd_dir, dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))
  assert sd16.unet.dtype == jnp.bfloat16 and sd16.dtype == 'bfloat16'
  got = jax.jit(sd16.predict)(params16['unet'], *_inputs())
  assert got.dtype == jnp.float32
  assert _maxdiff(got, want) <= 0.05 * float(jnp.abs(want).max())
  h16 = jax.jit(sd16.encode_text)(params16['text_encoder'], ids)
  # Returned as float32 like `predict`, but computed in bf16: every value is
  # exactly representable in bf16.
  assert h16.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(h16),
                                np.asarray(h16.astype(jnp.bfloat16).astype(jnp.float32)))
  assert _maxdiff(h16, h32) <= 0.05 * float(jnp.abs(h32).max())


# -- errors -----------------------------------------------------------------------------
def _copy(src, dst, drop=()):
  shutil.copytree(src, dst)
  for rel in drop:
    p = os.path.join(dst, rel)
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  return str(dst)


def test_error_path_does_not_exist(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"model\.pretrained=.*nope.*does not exist"):
    models.load_stable_diffusion(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match=r"model\.pretrained=.*not a hub id"):
    models.load_stable_diffusion('./no/such/dir')


@pytest.mark.parametrize('component', ['unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'])
def test_error_missing_component(tmp_path, tiny_sd_dir, component):
  path = _copy(tiny_sd_dir, tmp_path / 'sd', drop=[component])
  with pytest.raises(FileNotFoundError,
                     match=rf'model\.pretrained=.*missing component folder .*{component}/'):
    models.load_stable_diffusion(path)


def test_error_no_weights_of_format(tmp_path, tiny_sd_dir):
  with pytest.raises(FileNotFoundError, match=(
      r'model\.pretrained=.*unet has no unet weights in format .safetensors. '
      r'\(model\.weights_format\); looked for diffusion_pytorch_model\.safetensors, '
      r'diffusion_pytorch_model\.safetensors\.index\.json')):
    models.load_stable_diffusion(tiny_sd_dir, weights_format='safetensors')
  path = _copy(tiny_sd_dir, tmp_path / 'sd', drop=['text_encoder/flax_model.msgpack'])
  with pytest.raises(FileNotFoundError, match=(
      r'looked for flax_model\.msgpack, model\.safetensors, .*pytorch_model\.bin')):
    models.load_stable_diffusion(path)


def test_error_bad_options(tiny_sd_dir):
  with pytest.raises(ValueError, match=r'model\.weights_format=.onnx.; expected one of'):
    models.load_stable_diffusion(tiny_sd_dir, weights_format='onnx')
  with pytest.raises(ValueError, match=r'model\.dtype=.float16.'):
    models.load_stable_diffusion(tiny_sd_dir, dtype='float16')
  with pytest.raises(ValueError, match=r'model\.attention=.flash.'):
    models.load_stable_diffusion(tiny_sd_dir, attention='flash')


def test_error_mismatched_weights(tmp_path, tiny_sd_dir):
  # A UNet config that does not fit the stored weights.
  path = _copy(tiny_sd_dir, tmp_path / 'sd')
  cfg_path = os.path.join(path, 'unet', 'config.json')
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg['block_out_channels'] = [32, 96]
  with open(cfg_path, 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r'model\.pretrained=.*diffusion_flax_model\.msgpack '
                     r'does not match the model config:\n.*wrong shape'):
    models.load_stable_diffusion(path)
  # Same for PyTorch weights: a tensor of the wrong shape.
  path = _copy(PT_DIR, tmp_path / 'pt')
  cfg_path = os.path.join(path, 'vae', 'config.json')
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg['latent_channels'] = 8
  with open(cfg_path, 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r'model\.pretrained=.*PyTorch weights in .*vae.* '
                     r'do not match the Flax model:\n.*wrong shape: .*quant_conv'):
    models.load_stable_diffusion(path)


@pytest.mark.parametrize('src,rel,kind', [
    ('pt', 'unet/diffusion_pytorch_model.safetensors', 'safetensors'),
    ('pt', 'text_encoder/pytorch_model.bin', 'PyTorch checkpoint'),
    ('flax', 'vae/diffusion_flax_model.msgpack', 'Flax msgpack'),
])
def test_error_truncated_weights_names_file(tmp_path, tiny_sd_dir, src, rel, kind):
  path = _copy(PT_DIR if src == 'pt' else tiny_sd_dir, tmp_path / 'sd')
  weights_file = os.path.join(path, rel)
  size = os.path.getsize(weights_file)
  with open(weights_file, 'r+b') as f:
    f.truncate(size // 2)  # A download or copy cut short.
  with pytest.raises(ValueError) as e:
    models.load_stable_diffusion(path)
  msg = str(e.value)
  assert '\n' not in msg and weights_file in msg, msg
  assert msg.startswith('model.pretrained=') and 'truncated or corrupt' in msg, msg
  if kind != 'PyTorch checkpoint':  # (A cut zip has no directory: not a zip at all.)
    assert f'corrupt {kind} file' in msg, msg


def test_hub_download_fetches_one_format(monkeypatch, tiny_sd_dir):
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  repo = {'model_index.json', 'unet/config.json', 'unet/diffusion_pytorch_model.bin',
          'unet/diffusion_pytorch_model.safetensors', 'unet/diffusion_flax_model.msgpack',
          'vae/config.json', 'vae/diffusion_pytorch_model.bin',
          'text_encoder/config.json', 'text_encoder/model.safetensors',
          'text_encoder/pytorch_model.bin', 'tokenizer/vocab.json',
          'scheduler/scheduler_config.json'}
  calls = []

  def snapshot_download(repo_id, revision=None, allow_patterns=(), local_files_only=False):
    calls.append((repo_id, revision, sorted(allow_patterns), local_files_only))
    return tiny_sd_dir  # Stands in for the downloaded snapshot.

  monkeypatch.setattr(huggingface_hub, 'list_repo_files', lambda repo_id, revision: sorted(repo))
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
  sd, _ = models.load_stable_diffusion('org/sd-model', revision='flax')
  assert sd.source == tiny_sd_dir
  (repo_id, revision, patterns, offline), = calls
  assert (repo_id, revision, offline) == ('org/sd-model', 'flax', False)
  fetched = {f for f in repo if any(fnmatch.fnmatch(f, p) for p in patterns)}
  assert fetched == repo - {'unet/diffusion_pytorch_model.bin',
                            'unet/diffusion_pytorch_model.safetensors',
                            'text_encoder/pytorch_model.bin'}
