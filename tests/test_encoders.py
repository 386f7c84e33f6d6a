"""Tests of dpg_jax.encoders against recorded PyTorch outputs and PIL.

Fixtures: tests/fixtures/encoders (see tests/fixtures/make_encoder_fixtures.py).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from dpg_jax import encoders

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'encoders')
DINO_DIR = os.path.join(FIXTURES, 'dino_hf')
DINO_PTH = os.path.join(FIXTURES, 'dino_original.pth')
CLIP_DIR = os.path.join(FIXTURES, 'clip_hf')
PARITY_ATOL = 1e-4


@pytest.fixture(scope='module')
def rec():
  return dict(np.load(os.path.join(FIXTURES, 'outputs.npz')))


@pytest.fixture(scope='module')
def dino():
  encoder, params = encoders.load_dino(DINO_DIR, config_key='dpg.dino_model')
  # One jitted function per module for the whole file: compiles dominate.
  return encoder, params, jax.jit(encoder.embed)


@pytest.fixture(scope='module')
def clip():
  encoder, params = encoders.load_clip(CLIP_DIR, config_key='eval.clip_model')
  return encoder, params, jax.jit(encoder.image_features)


def _pixels(lowres):
  # Same inputs as the recording: low-res noise repeated 8x (NHWC here).
  return np.repeat(np.repeat(lowres, 8, axis=1), 8, axis=2)


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


# --- Parity with PyTorch -----------------------------------------------------
def test_dino_matches_torch(dino, rec):
  encoder, params, embed = dino
  cls = embed(params, _pixels(rec['dino_lowres']))
  assert cls.shape == (2, encoder.embed_dim) and cls.dtype == jnp.float32
  assert _max_abs(cls, rec['dino_cls']) < PARITY_ATOL


def test_dino_forces_layer_norm_eps(dino):
  encoder = dino[0]
  with open(os.path.join(DINO_DIR, 'config.json')) as f:
    assert '1e-12' in f.read()  # the fixture config mimics the hub's
  assert encoder.config.layer_norm_eps == 1e-6
  assert encoder.module.config.layer_norm_eps == 1e-6
  assert 'pooler' not in encoder.init_shapes()


def test_original_dino_checkpoint(dino, rec):
  encoder, params = encoders.load_dino(DINO_PTH, num_heads=2)
  hf_encoder, hf_params, embed = dino
  keys = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
          'patch_size', 'image_size', 'layer_norm_eps', 'hidden_act', 'qkv_bias')
  assert ({k: getattr(encoder.config, k) for k in keys} ==
          {k: getattr(hf_encoder.config, k) for k in keys})
  # Same weights as the HF directory, leaf for leaf (so the same module applies).
  jax.tree.map(np.testing.assert_array_equal, params, hf_params)
  cls = embed(params, _pixels(rec['dino_lowres']))
  assert _max_abs(cls, rec['dino_cls']) < PARITY_ATOL


def test_clip_matches_torch(clip, rec):
  encoder, params, image_features = clip
  ids = encoder.tokenize(list(rec['prompts']))
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, rec['clip_input_ids'])
  text = jax.jit(encoder.text_features)(params, ids)
  image = image_features(params, _pixels(rec['clip_lowres']))
  assert text.shape == (3, encoder.embed_dim) and image.shape == (2, encoder.embed_dim)
  assert _max_abs(text, rec['clip_text_features']) < PARITY_ATOL
  assert _max_abs(image, rec['clip_image_features']) < PARITY_ATOL


def test_end_to_end_uint8_vs_pil_pipeline(dino, clip, rec):
  # JAX preprocessing vs PIL (uint8 intermediates): measured ~0.1% drift.
  images = rec['e2e_uint8']
  d = dino[2](dino[1], jax.jit(encoders.preprocess_dino)(images))
  c = clip[2](clip[1], jax.jit(encoders.preprocess_clip)(images))
  for got, want in ((d, rec['e2e_dino_cls']), (c, rec['e2e_clip_image_features'])):
    assert _max_abs(got, want) < 0.01 * float(np.max(np.abs(want)))
    assert np.all(np.diag(np.asarray(encoders.cosine_similarity(got, want))) > 0.999)


# --- Preprocessing vs PIL ----------------------------------------------------
def _pil_reference(image_uint8, resize, crop, mean, std):
  """torchvision Resize(resize, BICUBIC) + CenterCrop(crop) + Normalize."""
  img = Image.fromarray(image_uint8)
  w, h = img.size
  new_w, new_h = (int(resize * w / h), resize) if h <= w else (resize, int(resize * h / w))
  img = img.resize((new_w, new_h), Image.BICUBIC)
  top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
  x = np.asarray(img, np.float32)[top:top + crop, left:left + crop] / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _smooth_images(rng, n, h, w):
  base = rng.uniform(0, 255, (n, h // 8 + 1, w // 8 + 1, 3))
  x = jax.image.resize(base, (n, h, w, 3), 'linear') + rng.normal(0, 8, (n, h, w, 3))
  return np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8)


# Tolerance in [0, 1] pixel units (before dividing by std). PIL rounds and
# clips to uint8 after each separable pass, JAX stays in float until the end:
# ~1/255 max away from saturation, up to ~2.4/255 where the first pass clips.
PIL_MAX_ABS = 3.0 / 255
PIL_MEAN_ABS = 0.5 / 255


@pytest.mark.parametrize('kind', ['dino', 'clip'])
@pytest.mark.parametrize('hw', [(300, 410), (120, 100)])  # shrink / enlarge
def test_preprocess_matches_pil(kind, hw):
  fn, resize, mean, std = {
      'dino': (encoders.preprocess_dino, 256, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD),
      'clip': (encoders.preprocess_clip, 224, encoders.CLIP_MEAN, encoders.CLIP_STD),
  }[kind]
  images = _smooth_images(np.random.default_rng(hw[0]), 2, *hw)
  got = np.asarray(jax.jit(fn)(images))
  want = np.stack([_pil_reference(im, resize, 224, mean, std) for im in images])
  assert got.shape == want.shape == (2, 224, 224, 3)
  err = np.abs(got - want) * np.asarray(std, np.float32)  # back to [0, 1] units
  assert err.max() < PIL_MAX_ABS, err.max() * 255
  assert err.mean() < PIL_MEAN_ABS, err.mean() * 255


@pytest.mark.parametrize('kind', ['dino', 'clip'])
def test_preprocess_follows_the_models_input_size(kind):
  """A 64-px encoder (the toy world's) gets the same transform at its size:
  DINO resizes to 64 / 0.875 = 73 and crops 64, CLIP resizes and crops 64."""
  fn, resize, mean, std = {
      'dino': (encoders.preprocess_dino, 73, encoders.IMAGENET_MEAN, encoders.IMAGENET_STD),
      'clip': (encoders.preprocess_clip, 64, encoders.CLIP_MEAN, encoders.CLIP_STD),
  }[kind]
  images = _smooth_images(np.random.default_rng(1), 2, 96, 80)
  want = np.stack([_pil_reference(im, resize, 64, mean, std) for im in images])
  err = np.abs(np.asarray(fn(images, 64)) - want) * np.asarray(std, np.float32)
  assert err.max() < PIL_MAX_ABS, err.max() * 255
  config = encoders.dino_vits16_config(hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64,
                                       patch_size=8, image_size=64)
  if kind == 'dino':
    got = encoders.DinoEncoder(config).preprocess(images)
    np.testing.assert_allclose(got, fn(images, 64), atol=1e-6)
  assert encoders.dino_resize(224) == 256 and encoders.dino_resize(64) == 73


def test_preprocess_float_and_uint8_agree():
  images = _smooth_images(np.random.default_rng(0), 1, 256, 256)
  a = encoders.preprocess_dino(images)
  b = encoders.preprocess_dino(encoders.uint8_to_float(images))
  np.testing.assert_allclose(a, b, atol=1e-5)
  np.testing.assert_array_equal(encoders.float_to_uint8(encoders.uint8_to_float(images)), images)
  # Out-of-range floats (unclipped VAE decodes) are clipped like uint8 saving.
  c = encoders.preprocess_clip(jnp.full((1, 224, 224, 3), 3.0))
  np.testing.assert_allclose(c[0, 0, 0], (1 - np.asarray(encoders.CLIP_MEAN)) /
                             np.asarray(encoders.CLIP_STD), rtol=1e-6)


# --- Similarities ------------------------------------------------------------
def test_cosine_similarity():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32)
  np.testing.assert_allclose(jnp.diag(encoders.cosine_similarity(x, x)), 1.0, atol=1e-6)
  np.testing.assert_allclose(encoders.paired_cosine_similarity(x, 2.5 * x), 1.0, atol=1e-6)
  e = jnp.eye(4)
  np.testing.assert_allclose(encoders.cosine_similarity(e, e), np.eye(4), atol=1e-7)
  np.testing.assert_allclose(encoders.cosine_similarity(e[:1], -e[:1]), [[-1.0]], atol=1e-7)
  assert float(encoders.mean_cosine_similarity(e[:2], e[:2])) == pytest.approx(0.5)
  assert encoders.cosine_similarity(x, x[:2]).shape == (3, 2)


# --- Tiny builders (flax msgpack path) ----------------------------------------
def test_build_tiny_dino_and_clip(tmp_path):
  d = encoders.build_tiny_dino(str(tmp_path / 'dino'))
  mtime = os.path.getmtime(os.path.join(d, 'flax_model.msgpack'))
  assert encoders.build_tiny_dino(str(tmp_path / 'dino')) == d  # idempotent
  assert os.path.getmtime(os.path.join(d, 'flax_model.msgpack')) == mtime
  assert [p.name for p in tmp_path.iterdir()] == ['dino']  # no temp dirs left
  encoder, params = encoders.load_dino(d)
  # eval_shape: the loaded tree fits the module, without compiling it.
  out = jax.eval_shape(encoder.embed_images, params, np.zeros((1, 64, 64, 3), np.uint8))
  assert out.shape == (1, 32)
  encoder, params = encoders.load_dino(d, dtype='bfloat16')  # compute dtype only
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}
  out = jax.eval_shape(encoder.embed, params, np.zeros((2, 224, 224, 3), np.float32))
  assert out.shape == (2, 32) and out.dtype == jnp.float32

  c = encoders.build_tiny_clip(str(tmp_path / 'clip'))
  encoder, params = encoders.load_clip(c)
  ids = encoder.tokenize(['a photo of a dog'])
  assert ids.shape == (1, 77)
  assert jax.eval_shape(encoder.text_features, params, ids).shape == (1, encoder.embed_dim)
  img = jax.eval_shape(encoder.embed_images, params, -np.ones((1, 224, 224, 3), np.float32))
  assert img.shape == (1, encoder.embed_dim)
  assert float(params['logit_scale']) == pytest.approx(encoder.config.logit_scale_init_value)


# --- Errors ------------------------------------------------------------------
def test_missing_path(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match=r"nope'.*config key 'dpg\.dino_model'"):
    encoders.load_dino(missing, config_key='dpg.dino_model')
  with pytest.raises(FileNotFoundError, match=r"nope'.*config key 'eval\.clip_model'"):
    encoders.load_clip(missing, config_key='eval.clip_model')


def test_missing_weights(tmp_path):
  d = tmp_path / 'noweights'
  d.mkdir()
  (d / 'config.json').write_text(open(os.path.join(DINO_DIR, 'config.json')).read())
  with pytest.raises(FileNotFoundError, match=r"noweights'.*'dpg\.dino_model'.*no weights"):
    encoders.load_dino(str(d), config_key='dpg.dino_model')
  with pytest.raises(FileNotFoundError, match='no config.json'):
    encoders.load_dino(str(tmp_path), config_key='dpg.dino_model')


def test_unknown_format(tmp_path):
  f = tmp_path / 'model.onnx'
  f.write_bytes(b'\0')
  with pytest.raises(ValueError, match=r"model\.onnx'.*'dpg\.dino_model'.*unknown format"):
    encoders.load_dino(str(f), config_key='dpg.dino_model')
  with pytest.raises(ValueError, match=r"clip_hf'.*'eval\.clip'.*not a ViT"):
    encoders.load_dino(CLIP_DIR, config_key='eval.clip')
  with pytest.raises(ValueError, match='unknown format'):
    encoders.load_clip(DINO_PTH, config_key='eval.clip')
