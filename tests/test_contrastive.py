"""The toy DINO / CLIP: data, losses and measures (dpg_jax/toyworld/contrastive.py).

The shipped encoders' own figures are checked in tests/test_toyworld.py.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpg_jax import encoders
from dpg_jax.toyworld import contrastive
from dpg_jax.toyworld import world


def test_neighbours_differ_in_exactly_one_attribute_and_never_make_a_held_out_object():
  rng = np.random.default_rng(0)
  ids = contrastive.identity_groups(rng, num_groups=50, group_size=4)
  assert len(ids) == 200
  for g in range(50):
    base, *others = ids[4 * g:4 * g + 4]
    assert len({tuple(sorted(i.items())) for i in [base] + others}) == 4
    for n in others:
      changed = [k for k in contrastive.IDENTITY if n[k] != base[k]]
      assert len(changed) == 1, (base, n)
  for i in ids:
    assert (i['cls'], i['colour'], i['pattern']) not in world.HELD_OUT
    assert i['secondary'] != i['colour']
  held = contrastive.held_out_identities(24, seed=1)
  assert [(i['cls'], i['colour'], i['pattern']) for i in held] == list(world.HELD_OUT) * 2


def test_views_show_the_same_object_in_new_scenes():
  ident = {'cls': 'mug', 'colour': 'red', 'pattern': 'dotted', 'secondary': 'white',
           'mark': 'eye'}
  rng = np.random.default_rng(3)
  scenes = [contrastive.view(ident, rng) for _ in range(6)]
  assert all({k: getattr(s, k) for k in contrastive.IDENTITY} == ident for s in scenes)
  assert len({(s.context, s.x, s.y, s.scale) for s in scenes}) == 6
  views = contrastive.render_views([ident], 2, seed=0)
  assert views.shape == (1, 2, 64, 64, 3) and views.dtype == np.uint8
  np.testing.assert_array_equal(views, contrastive.render_views([ident], 2, seed=0))


def test_info_nce_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 3))
  b = a + 0.3 * rng.normal(size=(5, 3))
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  logits = 7.0 * a @ b.T

  def ce(l):
    return np.mean(np.log(np.exp(l).sum(1)) - np.diag(l))

  want = 0.5 * (ce(logits) + ce(logits.T))
  got = contrastive.info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 7.0)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_nearest_neighbour_accuracy():
  e = np.eye(3)
  q = np.stack([e[0], e[1], e[2] * 0.5 + e[0]])
  assert contrastive.nearest_neighbour_accuracy(q, e, [0, 1, 2], [0, 1, 2]) == pytest.approx(2 / 3)
  # Leave-one-out: the item itself never counts as its own neighbour.
  g = np.stack([e[0], e[0], e[1]])
  assert contrastive.nearest_neighbour_accuracy(g, g, [0, 0, 1], [0, 0, 1],
                                                exclude_self=True) == pytest.approx(2 / 3)


SMALL = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  import transformers  # pylint: disable=g-import-not-at-top
  from dpg_jax.toyworld import model as model_lib  # pylint: disable=g-import-not-at-top
  d = str(tmp_path_factory.mktemp('tok'))
  model_lib.write_tokenizer(d)
  return transformers.CLIPTokenizerFast.from_pretrained(d)


def _adam_steps(fn, params, num_steps, lr=3e-3):
  import optax  # pylint: disable=g-import-not-at-top
  tx = optax.adam(lr)

  @jax.jit
  def step(p, o):
    updates, o = tx.update(jax.grad(fn)(p), o, p)
    return optax.apply_updates(p, updates), o

  opt = tx.init(params)
  for _ in range(num_steps):
    params, opt = step(params, opt)
  return params


@pytest.mark.parametrize('kind', ['dino', 'clip'])
def test_the_losses_train_the_towers_they_are_written_for(kind, tokenizer):
  """A few Adam steps on a fixed batch lower each loss (gradients reach the towers)."""
  ident = contrastive.identity_groups(np.random.default_rng(0), 2, 4)
  if kind == 'dino':
    enc = encoders.DinoEncoder(contrastive.dino_config(**SMALL))
    views = contrastive.render_views(ident, 2, seed=0)           # [8, 2, 64, 64, 3]
    batch = {'views': np.moveaxis(views, 1, 0).astype(np.float32) / 127.5 - 1}
    fn = lambda p: contrastive.dino_loss(enc, 0.1, p, batch, None)[0]
  else:
    enc = encoders.ClipEncoder(contrastive.clip_config(tokenizer, **SMALL), tokenizer)
    scenes = [contrastive.view(i, np.random.default_rng(k)) for k, i in enumerate(ident)]
    batch = {'images': np.stack([world.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1,
             'ids': enc.tokenize([world.caption(s) for s in scenes])}
    fn = lambda p: contrastive.clip_loss(enc, p, batch, None)[0]
  params = contrastive.init_params(enc, 0)
  first = float(fn(params))
  last = float(fn(_adam_steps(fn, params, 40)))
  assert last < 0.7 * first, (first, last)


def test_written_directories_load_through_the_encoders(tmp_path, tokenizer):
  dino = encoders.DinoEncoder(contrastive.dino_config(**SMALL))
  params = contrastive.init_params(dino, 1)
  contrastive.write_dino(str(tmp_path / 'dino'), dino.config, params)
  loaded, got = encoders.load_dino(str(tmp_path / 'dino'))
  assert loaded.image_size == 64 and loaded.config.patch_size == contrastive.PATCH
  x = world.render(contrastive.view(contrastive.random_identity(np.random.default_rng(0)),
                                    np.random.default_rng(1)))[None]
  np.testing.assert_allclose(loaded.embed_images(got, x), dino.embed_images(params, x),
                             atol=1e-6)
  clip = encoders.ClipEncoder(contrastive.clip_config(tokenizer, **SMALL), tokenizer)
  cparams = contrastive.init_params(clip, 2)
  contrastive.write_clip(str(tmp_path / 'clip'), clip.config, tokenizer, cparams)
  cl, cgot = encoders.load_clip(str(tmp_path / 'clip'))
  ids = cl.tokenize(['a red star on the grass'])
  assert ids.shape == (1, 32)
  np.testing.assert_allclose(cl.text_features(cgot, ids), clip.text_features(cparams, ids),
                             atol=1e-6)
  np.testing.assert_allclose(cl.embed_images(cgot, x), clip.embed_images(cparams, x), atol=1e-6)
  assert float(cgot['logit_scale']) == pytest.approx(float(cparams['logit_scale']))
