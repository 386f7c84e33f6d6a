"""Loader, export and module variants of the tiny SD; parity with PyTorch."""
import fnmatch
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpg_jax import models
from dpg_jax import tiny

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
def test_save_pipeline_roundtrip(tmp_path, tiny_sd):
  sd, params = tiny_sd
  out = models.save_pipeline(tmp_path / 'export', sd, params)
  models.save_pipeline(out, sd, params)  # Overwrites in place.
  assert sorted(os.listdir(tmp_path)) == ['export']
  sd2, params2 = models.load_stable_diffusion(out)
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), params, params2)))
  assert sd2.scheduler_config['beta_schedule'] == 'scaled_linear'

  from diffusers import FlaxStableDiffusionPipeline  # pylint: disable=g-import-not-at-top
  pipe, pparams = FlaxStableDiffusionPipeline.from_pretrained(
      out, safety_checker=None, feature_extractor=None)
  assert type(pipe.scheduler).__name__ == 'FlaxDDPMScheduler'
  for comp in ('unet', 'vae', 'text_encoder'):
    flat = jax.tree.leaves(jax.tree.map(lambda a, b: bool((np.asarray(a) == b).all()),
                                        dict(pparams[comp]), params[comp]))
    assert flat and all(flat), comp


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
