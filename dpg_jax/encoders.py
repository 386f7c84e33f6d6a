"""Frozen image/text encoders: DINO ViT-S/16 (reward, metrics) and CLIP ViT-B/32.

Shared by the DINO reward (training) and the DreamBench DINO / CLIP-I / CLIP-T
metrics (evaluation). Everything after loading is a pure, jit-able function of
(params, inputs).

Image convention (as everywhere in dpg_jax): NHWC float in [-1, 1]; uint8
[0, 255] is accepted too (the dtype is static, so this is resolved at trace
time). Preprocessing follows the public DreamBench evaluation code, at the
model's own input size S (`image_size` in its config; 224 for the real ones):
  * DINO: bicubic resize of the shortest side to S / 0.875 (256), center crop S,
    ImageNet mean/std;
  * CLIP: bicubic resize of the shortest side to S (224), center crop S,
    CLIP mean/std.
Resizing is antialiased when downscaling, like PIL's BICUBIC filter.

Weights load WITHOUT torch from a hub id, a local HF directory
(flax_model.msgpack, model.safetensors or pytorch_model.bin) or, for DINO, an
original DINO checkpoint file (`dino_deitsmall16_pretrain.pth`), or by name:
'toyworld' is the toy DINO / CLIP shipped in dpg_jax/toyworld/shipped. Parameters
are always float32; `dtype` is the compute dtype.
"""
import collections
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPConfig
from transformers import CLIPTokenizerFast
from transformers import ViTConfig
from transformers.models.clip import modeling_flax_clip
from transformers.models.vit import modeling_flax_vit

from dpg_jax import tiny
from dpg_jax import weights

Params = Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The original DINO ViTs use LayerNorm(eps=1e-6); the hub's facebook/dino-vits16
# config says 1e-12 (a conversion artefact), so it is overridden on load.
DINO_LAYER_NORM_EPS = 1e-6

# Weight files of a HF directory, in order of preference (msgpack needs no
# layout conversion).
_FLAX_WEIGHTS = 'flax_model.msgpack'
_HF_WEIGHT_FILES = (_FLAX_WEIGHTS, 'model.safetensors', 'pytorch_model.bin')
_PT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


# -----------------------------------------------------------------------------
# Preprocessing (jit-able, batched, NHWC).
# -----------------------------------------------------------------------------
def uint8_to_float(images) -> jnp.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (the dpg_jax image convention)."""
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def float_to_uint8(images) -> np.ndarray:
  """float [-1, 1] -> host uint8 [0, 255] (rounded, clipped)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _to_unit_range(images) -> jnp.ndarray:
  """NHWC uint8 or float [-1, 1] -> float32 [0, 1], clipped.

  Clipping mirrors the reference pipelines, which see images only after they
  were saved as uint8 (e.g. unclipped VAE decodes).
  """
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return jnp.clip((images.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)


def shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) after resizing the shortest side to `size` (torchvision rule)."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def resize_shortest_side(images, size: int) -> jnp.ndarray:
  """Bicubic (Keys a=-0.5) resize of NHWC floats; antialiased when shrinking."""
  b, h, w, c = images.shape
  new_h, new_w = shortest_side_size(h, w, size)
  if (new_h, new_w) == (h, w):
    return images
  # jax.image.resize widens the kernel by the scale factor when downscaling,
  # which is what PIL's BICUBIC filter does.
  return jax.image.resize(images, (b, new_h, new_w, c), 'bicubic', antialias=True)


def center_crop(images, size: int) -> jnp.ndarray:
  """Center crop of NHWC images to size x size (torchvision rounding)."""
  _, h, w, _ = images.shape
  if h < size or w < size:
    raise ValueError(f'Cannot center-crop {h}x{w} images to {size}x{size}.')
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return images[:, top:top + size, left:left + size, :]


def preprocess(images, *, resize: int, crop: int, mean: Sequence[float],
               std: Sequence[float]) -> jnp.ndarray:
  """NHWC uint8 / float [-1, 1] -> normalised float32 [B, crop, crop, 3]."""
  x = _to_unit_range(images)
  x = resize_shortest_side(x, resize)
  # PIL stores the resized image as uint8: bicubic overshoot is clipped.
  x = jnp.clip(x, 0.0, 1.0)
  x = center_crop(x, crop)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std


def dino_resize(image_size: int) -> int:
  """Shortest side before DINO's center crop: 256 for 224 (a 0.875 crop)."""
  return int(round(image_size * 256 / 224))


def preprocess_dino(images, image_size: int = 224) -> jnp.ndarray:
  """DINO eval transform at the model's input size: resize the shortest side to
  dino_resize(image_size) (256 for 224), center crop image_size, ImageNet mean/std."""
  return preprocess(images, resize=dino_resize(image_size), crop=image_size,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD)


def preprocess_clip(images, image_size: int = 224) -> jnp.ndarray:
  """CLIP transform: resize the shortest side to image_size (224), center crop
  image_size, CLIP mean/std."""
  return preprocess(images, resize=image_size, crop=image_size, mean=CLIP_MEAN,
                    std=CLIP_STD)


# -----------------------------------------------------------------------------
# Similarities.
# -----------------------------------------------------------------------------
def l2_normalize(x, axis: int = -1, eps: float = 1e-12) -> jnp.ndarray:
  """x / max(||x||, eps) in float32 (torch.nn.functional.normalize)."""
  x = jnp.asarray(x, jnp.float32)
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norm, eps)


def cosine_similarity(a, b) -> jnp.ndarray:
  """[N, D] x [M, D] -> [N, M] matrix of cosine similarities."""
  return l2_normalize(a) @ l2_normalize(b).T


def paired_cosine_similarity(a, b) -> jnp.ndarray:
  """[N, D] x [N, D] -> [N] cosines of corresponding rows."""
  return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def mean_cosine_similarity(a, b) -> jnp.ndarray:
  """Mean over all (a_i, b_j) pairs: the DreamBench DINO / CLIP-I statistic."""
  return jnp.mean(cosine_similarity(a, b))


# -----------------------------------------------------------------------------
# Encoders.
# -----------------------------------------------------------------------------
class DinoEncoder:
  """DINO ViT (transformers FlaxViTModule, no pooler); embedding = [CLS]."""

  def __init__(self, config: ViTConfig, dtype='float32', source: str = ''):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.source = source
    self.module = modeling_flax_vit.FlaxViTModule(
        config=config, dtype=self.dtype, add_pooling_layer=False)

  @property
  def embed_dim(self) -> int:
    return int(self.config.hidden_size)

  @property
  def image_size(self) -> int:
    return int(self.config.image_size)

  def init_shapes(self) -> Params:
    """Parameter ShapeDtypeStructs (no allocation)."""
    x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return weights.flax_shapes(self._init, x)

  def _init(self, x):
    return self.module.init(jax.random.PRNGKey(0), x)['params']

  def preprocess(self, images) -> jnp.ndarray:
    return preprocess_dino(images, self.image_size)

  def embed(self, params: Params, pixels) -> jnp.ndarray:
    """Preprocessed NHWC pixels [B, S, S, 3] (S = image_size) -> [CLS] float32 [B, D]."""
    hidden = self.module.apply({'params': params}, jnp.asarray(pixels, jnp.float32),
                               deterministic=True, return_dict=False)[0]
    return hidden[:, 0].astype(jnp.float32)

  def embed_images(self, params: Params, images) -> jnp.ndarray:
    """NHWC uint8 / float [-1, 1] images of any size -> [B, D]."""
    return self.embed(params, self.preprocess(images))


class ClipEncoder:
  """CLIP (transformers FlaxCLIPModule): projected image and text features."""

  def __init__(self, config: CLIPConfig, tokenizer, dtype='float32',
               source: str = ''):
    self.config = config
    self.tokenizer = tokenizer
    self.dtype = jnp.dtype(dtype)
    self.source = source
    self.module = modeling_flax_clip.FlaxCLIPModule(config=config, dtype=self.dtype)

  @property
  def embed_dim(self) -> int:
    return int(self.config.projection_dim)

  @property
  def image_size(self) -> int:
    return int(self.config.vision_config.image_size)

  @property
  def max_length(self) -> int:
    return int(min(self.tokenizer.model_max_length,
                   self.config.text_config.max_position_embeddings))

  def init_shapes(self) -> Params:
    """Parameter ShapeDtypeStructs (no allocation)."""
    ids = jnp.zeros((1, self.max_length), jnp.int32)
    pixels = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    return weights.flax_shapes(self._init, ids, pixels)

  def _init(self, ids, pixels):
    return self.module.init(jax.random.PRNGKey(0), ids, pixels, jnp.ones_like(ids),
                            jnp.broadcast_to(jnp.arange(ids.shape[-1]), ids.shape))['params']

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """int32 [N, max_length] token ids, padded/truncated to max_length."""
    if isinstance(prompts, str):
      prompts = [prompts]
    ids = self.tokenizer(list(prompts), padding='max_length', max_length=self.max_length,
                         truncation=True, return_tensors='np').input_ids
    return np.asarray(ids, np.int32)

  def preprocess(self, images) -> jnp.ndarray:
    return preprocess_clip(images, self.image_size)

  def image_features(self, params: Params, pixels) -> jnp.ndarray:
    """Preprocessed NHWC pixels -> projected image features float32 [B, P]."""

    def fn(module, x):
      pooled = module.vision_model(pixel_values=x, deterministic=True)[1]
      return module.visual_projection(pooled)

    out = self.module.apply({'params': params}, jnp.asarray(pixels, jnp.float32), method=fn)
    return out.astype(jnp.float32)

  def embed_images(self, params: Params, images) -> jnp.ndarray:
    """NHWC uint8 / float [-1, 1] images of any size -> [B, P]."""
    return self.image_features(params, self.preprocess(images))

  def text_features(self, params: Params, input_ids) -> jnp.ndarray:
    """int [B, L] token ids -> projected text features float32 [B, P]."""
    # Pooling reads the first EOS position and attention is causal, so the
    # padding after it never matters: no attention mask needed.
    input_ids = jnp.asarray(input_ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)

    def fn(module, ids, pos):
      pooled = module.text_model(input_ids=ids, attention_mask=jnp.ones_like(ids),
                                 position_ids=pos, deterministic=True)[1]
      return module.text_projection(pooled)

    out = self.module.apply({'params': params}, input_ids, positions, method=fn)
    return out.astype(jnp.float32)


# -----------------------------------------------------------------------------
# Locating files.
# -----------------------------------------------------------------------------
def _where(path, config_key) -> str:
  where = f'{path!r}'
  if config_key:
    where += f' (from config key {config_key!r})'
  return where


def _snapshot(repo_id: str, *, what: str, config_key) -> str:
  """Downloads config, tokenizer and ONE weight file of a hub repo."""
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  meta = ['*.json', '*.txt']
  try:
    local = snapshot_download(repo_id, allow_patterns=meta)
    for name in _HF_WEIGHT_FILES:
      if os.path.exists(os.path.join(local, name)):
        return local
      local = snapshot_download(repo_id, allow_patterns=meta + [name])
      if os.path.exists(os.path.join(local, name)):
        return local
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'{what} {_where(repo_id, config_key)} is not a local path and could not be '
        f'fetched from the Hugging Face hub: {type(e).__name__}: {e}') from e
  raise FileNotFoundError(
      f'{what} hub repo {_where(repo_id, config_key)} has none of {_HF_WEIGHT_FILES}.')


def _toyworld_encoder(what: str) -> str:
  from dpg_jax.toyworld import weights as toy_weights  # pylint: disable=g-import-not-at-top
  return toy_weights.DINO_DIR if what == 'DINO model' else toy_weights.CLIP_DIR


# Encoders shipped inside the package, by name -> fn(what) -> directory (as
# models.NAMED_MODELS; a local directory of the same name wins, hub ids always
# contain a '/').
NAMED_ENCODERS = {'toyworld': _toyworld_encoder}


def _resolve(path_or_hub: str, *, what: str, config_key) -> str:
  """Local file or directory for a path, hub id or shipped name; clear errors otherwise."""
  if not path_or_hub:
    raise ValueError(f'{what}: empty path or hub id {_where(path_or_hub, config_key)}.')
  path = os.path.expanduser(str(path_or_hub))
  if os.path.exists(path):
    return path
  if path in NAMED_ENCODERS:
    shipped = NAMED_ENCODERS[path](what)
    if not os.path.isdir(shipped):
      raise FileNotFoundError(
          f'{what} {_where(path, config_key)}: the shipped toy-world encoder is missing at '
          f'{shipped}; rebuild it with python -m dpg_jax.toyworld.pretrain (see the README).')
    return shipped
  if _HUB_ID.match(path) and not path.startswith(('.', '~')):
    return _snapshot(path, what=what, config_key=config_key)
  raise FileNotFoundError(
      f'{what} not found: no such file or directory {_where(path, config_key)}.')


def _hf_weight_file(directory: str, *, what: str, config_key) -> str:
  for name in _HF_WEIGHT_FILES:
    f = os.path.join(directory, name)
    if os.path.isfile(f):
      return f
  raise FileNotFoundError(
      f'{what} directory {_where(directory, config_key)} has no weights: expected one of '
      f'{", ".join(_HF_WEIGHT_FILES)}.')


def _read_config(directory: str, *, what: str, config_key) -> dict:
  f = os.path.join(directory, 'config.json')
  if not os.path.isfile(f):
    raise FileNotFoundError(
        f'{what} directory {_where(directory, config_key)} has no config.json.')
  with open(f) as fh:
    return json.load(fh)


# -----------------------------------------------------------------------------
# Weight conversion (no torch).
# -----------------------------------------------------------------------------
def _flatten(tree) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _match_shapes(tree, shapes, *, source: str) -> Params:
  """Keeps the leaves `shapes` expects (float32), erroring on any gap."""
  got, want = _flatten(tree), _flatten(shapes)
  # A checkpoint of a model with a head nests the backbone one level down.
  if not set(want) & set(got):
    for top in {k[0] for k in got}:
      sub = {k[1:]: v for k, v in got.items() if k[0] == top}
      if set(want) <= set(sub):
        got = sub
        break
  missing = sorted('/'.join(k) for k in set(want) - set(got))
  if missing:
    raise ValueError(f'Weights {source!r} lack {len(missing)} parameters, e.g. {missing[:5]}.')
  out = {}
  for k, spec in want.items():
    v = np.asarray(got[k])
    if tuple(v.shape) != tuple(spec.shape):
      raise ValueError(f'Weights {source!r}: {"/".join(k)} has shape {v.shape}, '
                       f'expected {tuple(spec.shape)}.')
    out[k] = jnp.asarray(v, jnp.float32)
  dropped = sorted('/'.join(k) for k in set(got) - set(want))
  if dropped:
    logging.info('Ignoring %d unused weights of %s, e.g. %s', len(dropped), source, dropped[:3])
  return flax.traverse_util.unflatten_dict(out)


def _strip_pt_prefix(state: dict, expected_heads: Sequence[str]) -> dict:
  """Drops a model-class prefix ('vit.', 'clip.') if keys carry one."""
  if any(k.startswith(h) for k in state for h in expected_heads):
    return state
  for prefix in ('vit.', 'clip.', 'model.'):
    if any(k.startswith(prefix) for k in state):
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return state


def _load_params(weight_file: str, shapes, *, heads: Sequence[str],
                 pt_state: dict | None = None,
                 defaults: dict[str, float] | None = None) -> Params:
  """Reads a Flax msgpack or a PyTorch state dict into the `shapes` layout.

  `defaults`: top-level scalars the encoders never use (CLIP's logit_scale),
  taken from the checkpoint when present, else set to the given value.
  """
  defaults = defaults or {}
  shapes = flax.core.unfreeze(shapes)
  core_shapes = {k: v for k, v in shapes.items() if k not in defaults}
  if pt_state is None and os.path.basename(weight_file).endswith('.msgpack'):
    with open(weight_file, 'rb') as f:
      state = flax.serialization.msgpack_restore(f.read())
    params = _match_shapes({k: v for k, v in state.items() if k not in defaults}, core_shapes,
                           source=weight_file)
  else:
    if pt_state is None:
      pt_state = weights.read_state_dict(weight_file)
    pt_state = _strip_pt_prefix(pt_state, heads)
    # Drops heads the encoders do not use (e.g. the ViT pooler).
    state = {k: v for k, v in pt_state.items()
             if k.startswith(tuple(heads)) and k not in defaults}
    tree = weights.convert_pt_to_flax(state, core_shapes, library='transformers',
                                      source=weight_file)
    params = _match_shapes(tree, core_shapes, source=weight_file)
    state = pt_state
  for name, value in defaults.items():
    if name in state and np.size(state[name]) == 1:
      value = float(np.asarray(state[name]).reshape(()))
    else:
      logging.warning('%s has no %r; using %g (unused by the features).',
                      weight_file, name, value)
    params[name] = jnp.full(shapes[name].shape, value, jnp.float32)
  return params


# -----------------------------------------------------------------------------
# DINO.
# -----------------------------------------------------------------------------
_VIT_HEADS = ('embeddings.', 'encoder.', 'layernorm.')


def dino_vits16_config(**overrides) -> ViTConfig:
  """Config of the original DINO ViT-S/16 (eps 1e-6)."""
  kw = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
            intermediate_size=1536, patch_size=16, image_size=224, num_channels=3,
            hidden_act='gelu', qkv_bias=True, layer_norm_eps=DINO_LAYER_NORM_EPS,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  kw.update(overrides)
  return ViTConfig(**kw)


def _timm_dino_state(state: dict) -> dict:
  """Backbone of an original DINO checkpoint (plain, or teacher of a full one)."""
  for root in ('teacher.', 'student.', ''):
    sub = {k[len(root):]: v for k, v in state.items() if k.startswith(root)}
    sub = {re.sub(r'^(module\.)?(backbone\.)?', '', k): v for k, v in sub.items()}
    if 'cls_token' in sub and 'pos_embed' in sub:
      return sub
  return {}


def _dino_from_timm(state: dict, num_heads: int | None) -> tuple[ViTConfig, dict]:
  """Original DINO (timm VisionTransformer) keys -> (config, HF ViT state)."""
  hidden = state['cls_token'].shape[-1]
  patch = state['patch_embed.proj.weight'].shape[-1]
  grid = int(round((state['pos_embed'].shape[1] - 1) ** 0.5))
  layers = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
  # Heads are not recorded in the weights; every DINO ViT uses 64-dim heads.
  num_heads = num_heads or max(1, hidden // 64)
  config = dino_vits16_config(
      hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=num_heads,
      intermediate_size=state['blocks.0.mlp.fc1.weight'].shape[0], patch_size=patch,
      image_size=grid * patch)
  out = {
      'embeddings.cls_token': state['cls_token'],
      'embeddings.position_embeddings': state['pos_embed'],
      'embeddings.patch_embeddings.projection.weight': state['patch_embed.proj.weight'],
      'embeddings.patch_embeddings.projection.bias': state['patch_embed.proj.bias'],
      'layernorm.weight': state['norm.weight'],
      'layernorm.bias': state['norm.bias'],
  }
  renames = {'norm1': 'layernorm_before', 'attn.proj': 'attention.output.dense',
             'norm2': 'layernorm_after', 'mlp.fc1': 'intermediate.dense',
             'mlp.fc2': 'output.dense'}
  for i in range(layers):
    src, dst = f'blocks.{i}.', f'encoder.layer.{i}.'
    for a, b in renames.items():
      for p in ('weight', 'bias'):
        out[f'{dst}{b}.{p}'] = state[f'{src}{a}.{p}']
    # timm fuses q, k, v along the output axis in that order.
    for p in ('weight', 'bias'):
      q, k, v = np.split(np.asarray(state[f'{src}attn.qkv.{p}']), 3, axis=0)
      for name, x in zip(('query', 'key', 'value'), (q, k, v)):
        out[f'{dst}attention.attention.{name}.{p}'] = x
  return config, out


def load_dino(path_or_hub: str = 'facebook/dino-vits16', *, dtype='float32',
              config_key: str | None = None,
              num_heads: int | None = None) -> tuple[DinoEncoder, Params]:
  """Loads a DINO ViT as (encoder, float32 params).

  Args:
    path_or_hub: hub id, local HF directory (config.json + flax_model.msgpack /
      model.safetensors / pytorch_model.bin) or an original DINO checkpoint
      file (e.g. dino_deitsmall16_pretrain.pth).
    dtype: compute dtype.
    config_key: the config field `path_or_hub` came from (for error messages).
    num_heads: attention heads of an original checkpoint (default hidden / 64).
  """
  what = 'DINO model'
  path = _resolve(path_or_hub, what=what, config_key=config_key)
  pt_state = None
  if os.path.isdir(path):
    cfg = _read_config(path, what=what, config_key=config_key)
    if cfg.get('model_type', 'vit') not in ('vit', 'dino'):
      raise ValueError(f'{what} {_where(path, config_key)}: model_type '
                       f'{cfg.get("model_type")!r} is not a ViT.')
    config = ViTConfig.from_dict(cfg)
    weight_file = _hf_weight_file(path, what=what, config_key=config_key)
  elif path.endswith(_PT_SUFFIXES):
    state = _timm_dino_state(weights.read_state_dict(path))
    if not state:
      raise ValueError(f'{what} file {_where(path, config_key)} is not an original DINO '
                       'checkpoint (no cls_token / pos_embed); pass a HF directory instead.')
    config, pt_state = _dino_from_timm(state, num_heads)
    weight_file = path
  else:
    raise ValueError(f'{what} {_where(path, config_key)}: unknown format; expected a HF '
                     f'directory or a {"/".join(_PT_SUFFIXES)} file.')
  if config.layer_norm_eps != DINO_LAYER_NORM_EPS:
    logging.info('DINO: overriding layer_norm_eps %g -> %g (original DINO value).',
                 config.layer_norm_eps, DINO_LAYER_NORM_EPS)
    config.layer_norm_eps = DINO_LAYER_NORM_EPS
  encoder = DinoEncoder(config, dtype=dtype, source=str(path_or_hub))
  params = _load_params(weight_file, encoder.init_shapes(), heads=_VIT_HEADS, pt_state=pt_state)
  return encoder, params


# -----------------------------------------------------------------------------
# CLIP.
# -----------------------------------------------------------------------------
_CLIP_HEADS = ('text_model.', 'vision_model.', 'visual_projection.', 'text_projection.',
               'logit_scale')


def load_clip(path_or_hub: str = 'openai/clip-vit-base-patch32', *, dtype='float32',
              config_key: str | None = None) -> tuple[ClipEncoder, Params]:
  """Loads CLIP (config, weights, tokenizer) as (encoder, float32 params).

  Args:
    path_or_hub: hub id or local HF directory (config.json, tokenizer files and
      flax_model.msgpack / model.safetensors / pytorch_model.bin).
    dtype: compute dtype.
    config_key: the config field `path_or_hub` came from (for error messages).
  """
  what = 'CLIP model'
  path = _resolve(path_or_hub, what=what, config_key=config_key)
  if not os.path.isdir(path):
    raise ValueError(f'{what} {_where(path, config_key)}: unknown format; expected a HF '
                     'directory with config.json, tokenizer and weights.')
  cfg = _read_config(path, what=what, config_key=config_key)
  if cfg.get('model_type', 'clip') != 'clip':
    raise ValueError(f'{what} {_where(path, config_key)}: model_type '
                     f'{cfg.get("model_type")!r} is not CLIP.')
  config = CLIPConfig.from_dict(cfg)
  weight_file = _hf_weight_file(path, what=what, config_key=config_key)
  if not any(os.path.isfile(os.path.join(path, f)) for f in ('tokenizer.json', 'vocab.json')):
    raise FileNotFoundError(f'{what} directory {_where(path, config_key)} has no tokenizer '
                            '(tokenizer.json or vocab.json + merges.txt).')
  tokenizer = CLIPTokenizerFast.from_pretrained(path)
  encoder = ClipEncoder(config, tokenizer, dtype=dtype, source=str(path_or_hub))
  params = _load_params(weight_file, encoder.init_shapes(), heads=_CLIP_HEADS,
                        defaults={'logit_scale': config.logit_scale_init_value})
  return encoder, params


# -----------------------------------------------------------------------------
# Tiny random-init variants (tests, demos; no network).
# -----------------------------------------------------------------------------
def tiny_dino_config() -> ViTConfig:
  # Image 224 / patch 16 as the real model, so preprocessing is identical.
  return dino_vits16_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64)


def tiny_clip_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> CLIPConfig:
  text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
              eos_token_id=eos_token_id, bos_token_id=bos_token_id,
              pad_token_id=eos_token_id)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=224, patch_size=32)
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


# Words the tiny BPE learns merges from: DreamBench-like prompts.
_TINY_CORPUS = """
a photo of sks dog. a photo of a dog on the beach in the jungle in the snow
a cat with a city in the background, a backpack on top of pink fabric
a red clock floating on top of water, a robot toy wearing a santa hat
a purple dog in a chef outfit with the eiffel tower in the background
"""


def _learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE on `text` with CLIP's '</w>' end-of-word marker (deterministic)."""
  words = collections.Counter(re.findall(r'[a-z]+', text.lower()))
  vocab = {tuple(w[:-1]) + (w[-1] + '</w>',): n for w, n in words.items()}
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for sym, n in vocab.items():
      for pair in zip(sym, sym[1:]):
        pairs[pair] += n
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))  # ties: lexicographic
    merges.append(best)
    new_vocab = {}
    for sym, n in vocab.items():
      out, i = [], 0
      while i < len(sym):
        if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
          out.append(sym[i] + sym[i + 1])
          i += 2
        else:
          out.append(sym[i])
          i += 1
      new_vocab[tuple(out)] = n
    vocab = new_vocab
  return merges


def write_tiny_clip_tokenizer(out_dir: str, num_merges: int = 64) -> CLIPTokenizerFast:
  """Writes a tiny CLIP BPE tokenizer (vocab layout of the real one) to out_dir."""
  # CLIP's byte -> unicode table, in its canonical order (shared with the tiny SD tokenizer).
  chars = list(tiny.bytes_to_unicode().values())
  merges = _learn_merges(_TINY_CORPUS, num_merges)
  tokens = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges]
  tokens += ['<|startoftext|>', '<|endoftext|>']
  os.makedirs(out_dir, exist_ok=True)
  vocab_file = os.path.join(out_dir, 'vocab.json')
  merges_file = os.path.join(out_dir, 'merges.txt')
  with open(vocab_file, 'w', encoding='utf-8') as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
  with open(merges_file, 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  tok = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file, model_max_length=77)
  tok.save_pretrained(out_dir)
  return tok


def _atomic_build(out_dir: str, build_fn) -> str:
  """Runs build_fn(tmp_dir) and renames tmp_dir to out_dir; no-op if built."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.isfile(os.path.join(out_dir, 'config.json')):
    return out_dir
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(out_dir) + '-', dir=parent)
  try:
    build_fn(tmp)
    try:
      os.rename(tmp, out_dir)
    except OSError:
      # Lost a race with another builder (or a stale empty dir): keep theirs.
      if not os.path.isfile(os.path.join(out_dir, 'config.json')):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _random_params(shapes, seed: int, logit_scale: float = 0.0) -> Params:
  """HF-style random init (N(0, 0.02), LN 1/0, zero bias) filled on the host.

  Filling `eval_shape` leaves with numpy avoids compiling `module.init`.
  """
  rng = np.random.default_rng(seed)

  def init(path, spec):
    name = getattr(path[-1], 'key', str(path[-1]))
    if name == 'scale':
      return np.ones(spec.shape, np.float32)
    if name == 'bias':
      return np.zeros(spec.shape, np.float32)
    if name == 'logit_scale':
      return np.full(spec.shape, logit_scale, np.float32)
    return rng.normal(0.0, 0.02, spec.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(init, flax.core.unfreeze(shapes))


def _write_flax_params(out_dir: str, params) -> None:
  with open(os.path.join(out_dir, _FLAX_WEIGHTS), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(params))


def build_tiny_dino(out_dir: str, seed: int = 0) -> str:
  """Writes a tiny random DINO-like ViT as a HF directory; returns its path."""

  def build(tmp):
    config = tiny_dino_config()
    params = _random_params(DinoEncoder(config).init_shapes(), seed)
    config.architectures = ['ViTModel']
    config.to_json_file(os.path.join(tmp, 'config.json'))
    _write_flax_params(tmp, params)

  return _atomic_build(out_dir, build)


def build_tiny_clip(out_dir: str, seed: int = 0) -> str:
  """Writes a tiny random CLIP (with a tiny BPE tokenizer) as a HF directory."""

  def build(tmp):
    tok = write_tiny_clip_tokenizer(tmp)
    config = tiny_clip_config(len(tok), eos_token_id=tok.eos_token_id,
                              bos_token_id=tok.bos_token_id)
    params = _random_params(ClipEncoder(config, tok).init_shapes(), seed,
                            logit_scale=config.logit_scale_init_value)
    config.architectures = ['CLIPModel']
    config.to_json_file(os.path.join(tmp, 'config.json'))
    _write_flax_params(tmp, params)

  return _atomic_build(out_dir, build)
