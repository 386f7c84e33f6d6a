"""The toy DINO and the toy CLIP: their shapes, training losses, data and measures.

Both are transformers ViTs at 64 px (patch 8: 64 tokens + [CLS]) in the
layouts `dpg_jax.encoders` loads, so the DINO reward, the CLIP rewards and the
DreamBench metrics run on them through the same code as on the real models.

* Toy DINO: instance discrimination across views (symmetric InfoNCE on the
  L2-normalised [CLS] embeddings). An instance is one toy object (class, body
  colour, pattern, pattern colour, mark); its views are renders of it in new
  poses, sizes, contexts and company, half of them through the toy VAE (the
  look of generated images). That is the toy world's analogue of DINO's
  multi-crop: what stays the same across views is the object, so the
  embedding keeps the object and drops the scene, which is what DreamBench's
  DINO metric assumes. Batches are groups of an object and its one-attribute
  neighbours (hard negatives), so every attribute matters to the embedding.
* Toy CLIP: the CLIP objective on (scene, caption) pairs, captions redrawn
  every step with a random subset of the attributes named (as the toy SD's
  captions), scenes and their VAE reconstructions alike.

Measured by `dino_retrieval` (nearest-neighbour instance retrieval on held-out
objects and on the toy subjects' photos) and `clip_zero_shot` (class, colour
and context from text prompts alone).
"""
import dataclasses
import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from transformers import CLIPConfig

from dpg_jax import encoders
from dpg_jax.toyworld import model as model_lib
from dpg_jax.toyworld import subjects as subjects_lib
from dpg_jax.toyworld import world

PATCH = 8
# The identity of a toy object: what a personalized model must keep.
IDENTITY = ('cls', 'colour', 'pattern', 'secondary', 'mark')
_CHOICES = {'cls': world.CLASSES, 'colour': world.COLOURS, 'pattern': world.PATTERNS,
            'secondary': world.COLOURS, 'mark': world.MARKS}
_HELD_OUT = frozenset(world.HELD_OUT)


def vit_kwargs(hidden=64, layers=3, heads=2):
  return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              intermediate_size=4 * hidden, patch_size=PATCH, image_size=model_lib.RESOLUTION)


def dino_config(**overrides):
  """transformers ViTConfig of the toy DINO (DINO's eps 1e-6, no dropout)."""
  return encoders.dino_vits16_config(**{**vit_kwargs(), **overrides})


def clip_config(tokenizer, *, max_length=32, **vision_overrides) -> CLIPConfig:
  """CLIPConfig of the toy CLIP: a ViT like the toy DINO and a 2-layer text tower."""
  vocab = tokenizer.get_vocab()
  eos, bos = vocab['<|endoftext|>'], vocab['<|startoftext|>']
  text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
              eos_token_id=eos, bos_token_id=bos, pad_token_id=eos, hidden_act='quick_gelu')
  vision = dict(vit_kwargs(), hidden_act='quick_gelu', **vision_overrides)
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def init_params(encoder, seed: int):
  """Trainable params of a toy encoder: the transformers init, compiled once."""
  size = encoder.image_size
  px = jnp.zeros((1, size, size, 3), jnp.float32)
  if isinstance(encoder, encoders.ClipEncoder):
    ids = jnp.zeros((1, encoder.max_length), jnp.int32)
    pos = jnp.arange(encoder.max_length)[None]
    fn = lambda r: encoder.module.init(r, ids, px, jnp.ones_like(ids), pos)['params']
  else:
    fn = lambda r: encoder.module.init(r, px)['params']
  return jax.jit(fn)(jax.random.PRNGKey(seed))


# --------------------------------------------------------------------------- #
# Data: objects, their neighbours and their views
# --------------------------------------------------------------------------- #
def _valid(identity) -> bool:
  return (identity['secondary'] != identity['colour']
          and (identity['cls'], identity['colour'], identity['pattern']) not in _HELD_OUT)


def random_identity(rng) -> dict:
  while True:
    ident = {k: _CHOICES[k][rng.integers(len(_CHOICES[k]))] for k in IDENTITY}
    if _valid(ident):
      return ident


def neighbour(identity, rng) -> dict:
  """`identity` with one attribute changed (never to a held-out triple)."""
  while True:
    k = IDENTITY[rng.integers(len(IDENTITY))]
    if k == 'secondary' and identity['pattern'] == 'solid':
      continue  # an unseen pattern colour is the same object
    new = dict(identity, **{k: _CHOICES[k][rng.integers(len(_CHOICES[k]))]})
    if new != identity and _valid(new):
      return new


def identity_groups(rng, num_groups: int, group_size: int) -> list[dict]:
  """num_groups x group_size identities: an object, then its one-attribute neighbours."""
  out = []
  for _ in range(num_groups):
    base = random_identity(rng)
    group = [base]
    while len(group) < group_size:
      n = neighbour(base, rng)
      if n not in group:
        group.append(n)
    out += group
  return out


def view(identity, rng) -> world.Scene:
  """A new photo of the object: random pose, size, context and company."""
  pose = world.sample_scene(rng, allow_held_out=True)
  return dataclasses.replace(pose, **identity)


def render_views(identities, num_views: int, seed: int) -> np.ndarray:
  """uint8 [N, V, 64, 64, 3]: `num_views` photos of each identity."""
  out = np.empty((len(identities), num_views, model_lib.RESOLUTION, model_lib.RESOLUTION, 3),
                 np.uint8)
  for i, ident in enumerate(identities):
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xD1, i])
    for v in range(num_views):
      out[i, v] = world.render(view(ident, rng), model_lib.RESOLUTION)
  return out


def held_out_identities(num: int, seed: int) -> list[dict]:
  """Objects of the HELD_OUT triples (never drawn for training), varied secondary / mark."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xE7A1])
  out = []
  for i in range(num):
    cls, colour, pattern = world.HELD_OUT[i % len(world.HELD_OUT)]
    while True:
      secondary = world.COLOURS[rng.integers(len(world.COLOURS))]
      if secondary != colour:
        break
    out.append({'cls': cls, 'colour': colour, 'pattern': pattern, 'secondary': secondary,
                'mark': world.MARKS[rng.integers(len(world.MARKS))]})
  return out


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def info_nce(a, b, scale) -> jnp.ndarray:
  """Symmetric InfoNCE of matching rows of unit vectors a, b [N, D] (CLIP's loss)."""
  logits = scale * a @ b.T
  labels = jnp.arange(a.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def dino_loss(encoder, temperature, params, batch, rng):
  """InfoNCE between two views of each object; batch['views']: [2, N, 64, 64, 3]."""
  del rng
  v = batch['views']
  n = v.shape[1]
  z = encoders.l2_normalize(encoder.embed(params, encoder.preprocess(v.reshape((2 * n,) + v.shape[2:]))))
  a, b = z[:n], z[n:]
  loss = info_nce(a, b, 1.0 / temperature)
  acc = jnp.mean(jnp.argmax(a @ b.T, -1) == jnp.arange(n))
  return loss, {'view_accuracy': acc}


def clip_loss(encoder, params, batch, rng):
  """CLIP's objective on (image, caption) pairs; the learned temperature capped at 100."""
  del rng
  img = encoders.l2_normalize(encoder.image_features(params, encoder.preprocess(batch['images'])))
  txt = encoders.l2_normalize(encoder.text_features(params, batch['ids']))
  scale = jnp.exp(jnp.minimum(params['logit_scale'], jnp.log(100.0)))
  loss = info_nce(img, txt, scale)
  acc = jnp.mean(jnp.argmax(img @ txt.T, -1) == jnp.arange(img.shape[0]))
  return loss, {'pair_accuracy': acc, 'logit_scale': scale}


# --------------------------------------------------------------------------- #
# Measures
# --------------------------------------------------------------------------- #
@functools.partial(jax.jit, static_argnums=0)
def _unit_embeddings(encoder, params, images):
  # One compile per (encoder, batch shape): every measure reuses it.
  return encoders.l2_normalize(encoder.embed_images(params, images))


def embed(encoder, params, images_uint8, batch_size=64) -> np.ndarray:
  """Unit-norm image embeddings [N, D] (DINO [CLS] or CLIP image features)."""
  out = []
  for s in range(0, len(images_uint8), batch_size):
    out.append(np.asarray(_unit_embeddings(encoder, params,
                                           jnp.asarray(images_uint8[s:s + batch_size]))))
  return np.concatenate(out)


def nearest_neighbour_accuracy(query, gallery, query_ids, gallery_ids, exclude_self=False):
  """Fraction of queries whose most similar gallery item has the same id."""
  sim = np.asarray(query) @ np.asarray(gallery).T
  if exclude_self:
    np.fill_diagonal(sim, -np.inf)
  return float(np.mean(np.asarray(gallery_ids)[np.argmax(sim, -1)] == np.asarray(query_ids)))


def dino_retrieval(encoder, params, *, num_identities=120, seed=1, recon_fn=None) -> dict:
  """Instance retrieval of the toy DINO on objects it never trained on.

  held_out: photo 1 of each of `num_identities` held-out objects (10 per
  HELD_OUT triple, so most gallery items differ from the query in one or two
  attributes) against photo 2 of all of them: top-1 accuracy. With `recon_fn`
  also with the queries through the VAE. subjects: each toy subject's photo
  against the other 39 photos of the 8 subjects (leave-one-out), and the mean
  cosine between photos of one subject vs of different subjects.
  """
  ids = held_out_identities(num_identities, seed)
  views = render_views(ids, 2, seed + 1000)
  q, g = embed(encoder, params, views[:, 0]), embed(encoder, params, views[:, 1])
  r = np.arange(len(ids))
  out = {'held_out_top1': nearest_neighbour_accuracy(q, g, r, r),
         'num_identities': num_identities, 'chance': 1 / num_identities}
  if recon_fn is not None:
    qr = embed(encoder, params, recon_fn(views[:, 0]))
    out['held_out_top1_vae'] = nearest_neighbour_accuracy(qr, g, r, r)
  photos = np.concatenate([subjects_lib.photos(s.name) for s in subjects_lib.SUBJECTS])
  owner = np.repeat(np.arange(len(subjects_lib.SUBJECTS)), subjects_lib.NUM_PHOTOS)
  e = embed(encoder, params, photos)
  out['subjects_loo_top1'] = nearest_neighbour_accuracy(e, e, owner, owner, exclude_self=True)
  sim = e @ e.T
  same = (owner[:, None] == owner[None]) & ~np.eye(len(owner), dtype=bool)
  out['subjects_cos_same'] = float(sim[same].mean())
  out['subjects_cos_other'] = float(sim[owner[:, None] != owner[None]].mean())
  return out


def held_out_scenes(num: int, seed: int):
  """(uint8 images, scenes) of HELD_OUT triples in random poses and contexts."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xC11B])
  ids = held_out_identities(num, seed)
  scenes = [view(i, rng) for i in ids]
  return np.stack([world.render(s, model_lib.RESOLUTION) for s in scenes]), scenes


def clip_zero_shot(encoder, params, *, num_scenes=240, seed=1) -> dict:
  """Zero-shot accuracy of the toy CLIP on held-out scenes.

  class: prompts 'a <class>'; colour and context: each value's text embedding
  averaged over the six classes ('a <colour> <class>', 'a <class> <context
  phrase>'), CLIP's prompt ensembling.
  """
  images, scenes = held_out_scenes(num_scenes, seed)
  img = embed(encoder, params, images)
  text = jax.jit(lambda p, ids: encoders.l2_normalize(encoder.text_features(p, ids)))

  def classes(prompts_per_value):
    rows = []
    for prompts in prompts_per_value:
      t = np.asarray(text(params, encoder.tokenize(prompts))).mean(0)
      rows.append(t / np.linalg.norm(t))
    return np.stack(rows)

  tables = {
      'cls': classes([[f'a {c}'] for c in world.CLASSES]),
      'colour': classes([[world.with_articles(f'a {col} {c}') for c in world.CLASSES]
                         for col in world.COLOURS]),
      'context': classes([[f'a {c} {world.CONTEXT_PHRASES[x]}' for c in world.CLASSES]
                          for x in world.CONTEXTS]),
  }
  target = world.label_arrays(scenes)
  out = {h: float(np.mean(np.argmax(img @ t.T, -1) == target[h])) for h, t in tables.items()}
  out['chance'] = {h: 1 / len(t) for h, t in tables.items()}
  out['num_scenes'] = num_scenes
  return out


# --------------------------------------------------------------------------- #
# Writing the HF directories `dpg_jax.encoders` loads
# --------------------------------------------------------------------------- #
def _write_params(out_dir, params):
  with open(os.path.join(out_dir, 'flax_model.msgpack'), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))


def write_dino(out_dir, config, params) -> str:
  os.makedirs(out_dir, exist_ok=True)
  config.architectures = ['ViTModel']
  config.to_json_file(os.path.join(out_dir, 'config.json'))
  _write_params(out_dir, params)
  return out_dir


def write_clip(out_dir, config, tokenizer, params) -> str:
  os.makedirs(out_dir, exist_ok=True)
  config.architectures = ['CLIPModel']
  config.to_json_file(os.path.join(out_dir, 'config.json'))
  tokenizer.save_pretrained(out_dir)
  _write_params(out_dir, params)
  return out_dir
