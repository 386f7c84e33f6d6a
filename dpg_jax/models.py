"""Stable Diffusion components: the container the rest of dpg_jax codes against.

Conventions used everywhere in dpg_jax:
  * latents are NCHW float [B, 4, h, w], *scaled* by `scaling_factor` unless a
    name says `raw`;
  * images on device are NHWC float in [-1, 1]; on the host NHWC uint8;
  * params are a dict {'unet', 'vae', 'text_encoder'} of fp32 pytrees (master
    weights); modules compute in `dtype`.
"""
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from typing import Any

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpg_jax import weights

Params = Any


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
  """Stateless Flax modules + tokenizer + noise schedule of one SD pipeline."""
  unet: Any             # diffusers FlaxUNet2DConditionModel (linen module)
  vae: Any              # diffusers FlaxAutoencoderKL (linen module)
  text_encoder: Any     # transformers FlaxCLIPTextModel (wrapper; `.module` is linen)
  tokenizer: Any        # transformers CLIPTokenizer
  scheduler_config: dict  # diffusers scheduler config (scheduler/scheduler_config.json)
  source: str = ''      # where it was loaded from (for messages / export)
  dtype: str = 'float32'        # compute dtype of the modules
  remat: bool = False           # UNet blocks wrapped in nn.remat
  attention: str = 'standard'   # one of ATTENTIONS
  remat_policy: str = 'nothing_saveable'  # one of REMAT_POLICIES (with remat)

  # -- static facts ------------------------------------------------------------
  @property
  def scaling_factor(self) -> float:
    return float(getattr(self.vae.config, 'scaling_factor', 0.18215))

  @property
  def vae_scale(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def latent_channels(self) -> int:
    return int(self.unet.config.in_channels)

  @property
  def max_length(self) -> int:
    return int(self.tokenizer.model_max_length)

  @property
  def prediction_type(self) -> str:
    return self.scheduler_config.get('prediction_type', 'epsilon')

  @property
  def num_train_timesteps(self) -> int:
    return int(self.scheduler_config.get('num_train_timesteps', 1000))

  def alphas_cumprod(self) -> jnp.ndarray:
    """abar_t of the training noise schedule, float32 [T]."""
    from diffusers import FlaxDDPMScheduler  # pylint: disable=g-import-not-at-top
    sched = FlaxDDPMScheduler.from_config(self.scheduler_config)
    return jnp.asarray(sched.create_state().common.alphas_cumprod, jnp.float32)

  # -- host helpers --------------------------------------------------------------
  def tokenize(self, prompts) -> np.ndarray:
    """int32 [N, max_length], padded to the model's max length."""
    ids = self.tokenizer(list(prompts), padding='max_length', max_length=self.max_length,
                         truncation=True, return_tensors='np').input_ids
    return np.asarray(ids, np.int32)

  # -- pure functions (jit-able) ------------------------------------------------
  def encode_text(self, te_params, input_ids, train: bool = False):
    """CLIP last hidden state [B, L, D] (what SD's UNet cross-attends to)."""
    # SD1.x conditions on all 77 positions with no attention mask.
    input_ids = jnp.asarray(input_ids, jnp.int32)
    position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    return self.text_encoder.module.apply(
        {'params': te_params}, input_ids, jnp.ones_like(input_ids), position_ids,
        deterministic=not train)[0].astype(jnp.float32)

  def predict(self, unet_params, latents, timesteps, context):
    """UNet output (eps or v) for NCHW latents; returned in float32."""
    with attention_context(self.attention):
      out = self.unet.apply({'params': unet_params}, latents, timesteps, context).sample
    return out.astype(jnp.float32)

  def encode_images(self, vae_params, images):
    """NHWC images in [-1, 1] -> (mean, std) of the raw (unscaled) NCHW latent."""
    dist = self.vae.apply({'params': vae_params}, jnp.transpose(images, (0, 3, 1, 2)),
                          method=self.vae.encode).latent_dist
    to_nchw = lambda x: jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)
    return to_nchw(dist.mean), to_nchw(dist.std)

  def decode_latents(self, vae_params, latents):
    """Scaled NCHW latents -> NHWC images in [-1, 1] (not clipped)."""
    x = self.vae.apply({'params': vae_params}, latents / self.scaling_factor,
                       method=self.vae.decode).sample
    return jnp.transpose(x, (0, 2, 3, 1)).astype(jnp.float32)


# -----------------------------------------------------------------------------
# Loading / saving.
# -----------------------------------------------------------------------------
COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')
WEIGHTS_FORMATS = ('auto', 'flax', 'safetensors', 'pytorch')
# 'dot_product': jax.nn.dot_product_attention (cuDNN flash attention on GPU).
ATTENTIONS = ('standard', 'memory_efficient', 'split_head_dim', 'dot_product')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# Weight files per (library, format), in the order they are looked for.
_WEIGHT_FILES = {
    'diffusers': {
        'flax': ('diffusion_flax_model.msgpack',),
        'safetensors': ('diffusion_pytorch_model.safetensors',
                        'diffusion_pytorch_model.safetensors.index.json'),
        'pytorch': ('diffusion_pytorch_model.bin', 'diffusion_pytorch_model.bin.index.json'),
    },
    'transformers': {
        'flax': ('flax_model.msgpack',),
        'safetensors': ('model.safetensors', 'model.safetensors.index.json'),
        'pytorch': ('pytorch_model.bin', 'pytorch_model.bin.index.json'),
    },
}
_LIBRARY = {'unet': 'diffusers', 'vae': 'diffusers', 'text_encoder': 'transformers'}
_CONFIG_FILES = {'unet': 'config.json', 'vae': 'config.json', 'text_encoder': 'config.json',
                 'tokenizer': 'vocab.json', 'scheduler': 'scheduler_config.json'}
_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*')

MODEL_INDEX = {
    # PyTorch-style names as in SD1.4 (the tiny SD, PyTorch exports); diffusers'
    # Flax loader prepends 'Flax'. Exports name their own scheduler class.
    '_class_name': 'StableDiffusionPipeline',
    'feature_extractor': [None, None],
    'safety_checker': [None, None],
    'scheduler': ['diffusers', 'DDPMScheduler'],
    'text_encoder': ['transformers', 'CLIPTextModel'],
    'tokenizer': ['transformers', 'CLIPTokenizer'],
    'unet': ['diffusers', 'UNet2DConditionModel'],
    'vae': ['diffusers', 'AutoencoderKL'],
}
# Flax exports name the Flax classes, as diffusers' own Flax save_pretrained
# does: with PyTorch names, FlaxStableDiffusionPipeline.from_pretrained checks
# a `scheduler=` override against the PyTorch class and refuses any Flax one.
FLAX_MODEL_INDEX = dict(
    MODEL_INDEX, _class_name='FlaxStableDiffusionPipeline',
    scheduler=['diffusers', 'FlaxDDIMScheduler'],
    text_encoder=['transformers', 'FlaxCLIPTextModel'],
    unet=['diffusers', 'FlaxUNet2DConditionModel'], vae=['diffusers', 'FlaxAutoencoderKL'])

# The scheduler config keys an export keeps from the model's: the training
# noise schedule and the prediction target.
_SCHEDULE_KEYS = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule',
                  'trained_betas', 'prediction_type', 'steps_offset')


class _DropFlaxDeprecation(logging.Filter):
  # What the pinned diffusers 0.39 / transformers 4.57 log about their Flax
  # classes (at import, in every module setup(), i.e. at every trace): we pin
  # them on purpose, so it tells our users nothing and would drown the logs.
  NOTICES = ('Flax classes are deprecated and will be removed in Diffusers',
             'TensorFlow and JAX classes are deprecated and will be removed in Transformers')

  def filter(self, record):
    msg = record.getMessage()
    return not any(notice in msg for notice in self.NOTICES)


def quiet_diffusers():
  """Drops the pinned libraries' Flax deprecation notices, nothing else (idempotent).

  Call it before the first diffusers model import: some are logged at import."""
  from diffusers.utils import logging as dlogging  # pylint: disable=g-import-not-at-top
  from transformers.utils import logging as tlogging  # pylint: disable=g-import-not-at-top
  for library, lib_logging in (('diffusers', dlogging), ('transformers', tlogging)):
    lib_logging.get_logger(library)  # Makes sure its handler exists.
    for h in logging.getLogger(library).handlers:
      if not any(isinstance(f, _DropFlaxDeprecation) for f in h.filters):
        h.addFilter(_DropFlaxDeprecation())


_REMAT_BLOCKS = ('FlaxCrossAttnDownBlock2D', 'FlaxDownBlock2D', 'FlaxUNetMidBlock2DCrossAttn',
                 'FlaxCrossAttnUpBlock2D', 'FlaxUpBlock2D')
_REMAT_LOCK = threading.Lock()
# What each remat'd UNet block keeps from its forward pass for the backward
# (jax.checkpoint_policies): nothing (least memory, most recompute), the
# matmul/conv outputs, or those without batch dims.
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'everything_saveable')


@functools.cache
def _remat_unet_class(policy: str = 'nothing_saveable'):
  """FlaxUNet2DConditionModel whose down/mid/up blocks are nn.remat'd."""
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from diffusers.configuration_utils import flax_register_to_config  # pylint: disable=g-import-not-at-top
  from diffusers.models.unets import unet_2d_condition_flax as unet_mod  # pylint: disable=g-import-not-at-top

  jax_policy = getattr(jax.checkpoint_policies, policy)
  remat_blocks = {n: nn.remat(getattr(unet_mod, n), policy=jax_policy) for n in _REMAT_BLOCKS}

  @flax_register_to_config
  class RematFlaxUNet2DConditionModel(FlaxUNet2DConditionModel):
    """Same module, params and outputs; activations recomputed per block."""

    def setup(self):
      # The parent's setup() instantiates the blocks from its module globals;
      # swapping those for their remat'd versions while it runs avoids copying
      # ~150 lines of diffusers. nn.remat classes subclass the originals, so
      # the isinstance() dispatch in __call__ and parameter names are
      # unchanged. The lock keeps concurrent traces from seeing the swap.
      with _REMAT_LOCK:
        saved = {n: getattr(unet_mod, n) for n in _REMAT_BLOCKS}
        try:
          for n, cls in remat_blocks.items():
            setattr(unet_mod, n, cls)
          super().setup()
        finally:
          for n, cls in saved.items():
            setattr(unet_mod, n, cls)

  return RematFlaxUNet2DConditionModel


def _cudnn_fits(q) -> bool:
  """cuDNN flash attention: GPU, 16-bit, head dim a multiple of 8 up to 128."""
  head_dim = q.shape[-1]
  return (jax.default_backend() == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def attend(q, k, v, scale: float):
  """softmax(q k^T * scale) v for [B, T, heads, head_dim] arrays.

  jax.nn.dot_product_attention: cuDNN's fused flash kernel where it applies,
  XLA's composition elsewhere (CPU, TPU, fp32, SD1.4's 160-wide heads).
  """
  if _cudnn_fits(q):
    try:
      return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')
    except (NotImplementedError, ValueError, RuntimeError) as e:  # shape the kernel refuses
      logging.getLogger(__name__).info('cuDNN attention unavailable (%s); using XLA', e)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='xla')


def _dot_product_attention(next_fun, args, kwargs, context):
  """Flax method interceptor: diffusers' FlaxAttention.__call__ through `attend`.

  Same submodules (to_q/to_k/to_v/to_out_0) and params as diffusers' module;
  only the attention core differs, so no fork of the UNet is needed.
  """
  from diffusers.models.attention_flax import FlaxAttention  # pylint: disable=g-import-not-at-top
  m = context.module
  if context.method_name != '__call__' or not isinstance(m, FlaxAttention):
    return next_fun(*args, **kwargs)
  bound = dict(zip(('hidden_states', 'context', 'deterministic'), args), **kwargs)
  x = bound['hidden_states']
  ctx = x if bound.get('context') is None else bound['context']
  heads = lambda y: y.reshape(y.shape[0], -1, m.heads, m.dim_head)
  out = attend(heads(m.query(x)), heads(m.key(ctx)), heads(m.value(ctx)), m.dim_head ** -0.5)
  out = m.proj_attn(out.reshape(out.shape[0], -1, m.heads * m.dim_head))
  return m.dropout_layer(out, deterministic=bound.get('deterministic', True))


def attention_context(attention: str):
  """Context in which UNet applies use the chosen attention core."""
  if attention == 'dot_product':
    return nn.intercept_methods(_dot_product_attention)
  return contextlib.nullcontext()


def make_unet(unet_config: dict, *, dtype='float32', remat=False, attention='standard',
              remat_policy='nothing_saveable'):
  """The Flax UNet module for a diffusers UNet config (dtype = compute dtype)."""
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  if attention not in ATTENTIONS:
    raise ValueError(f'model.attention={attention!r}; expected one of {ATTENTIONS}.')
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f'model.remat_policy={remat_policy!r}; expected one of {REMAT_POLICIES}.')
  quiet_diffusers()
  unet_cls = _remat_unet_class(remat_policy) if remat else FlaxUNet2DConditionModel
  # The two attention flags crash together in diffusers: one string picks one.
  return unet_cls.from_config(
      dict(unet_config), dtype=DTYPES[dtype] if isinstance(dtype, str) else dtype,
      use_memory_efficient_attention=attention == 'memory_efficient',
      split_head_dim=attention == 'split_head_dim')


def _fail(pretrained, msg, exc=FileNotFoundError):
  return exc(f'model.pretrained={pretrained!r}: {msg}')


def _find_weights(pretrained, folder, component, weights_format):
  """(path, format) of the component's weight file of the requested format."""
  table = _WEIGHT_FILES[_LIBRARY[component]]
  formats = ('flax', 'safetensors', 'pytorch') if weights_format == 'auto' else (weights_format,)
  looked = []
  for fmt in formats:
    for name in table[fmt]:
      looked.append(name)
      if os.path.isfile(os.path.join(folder, name)):
        return os.path.join(folder, name), fmt
  raise _fail(pretrained, f'{folder} has no {component} weights in format '
              f'{weights_format!r} (model.weights_format); looked for {", ".join(looked)}; '
              f'found {sorted(os.listdir(folder))}.')


def _hub_patterns(files, weights_format):
  """allow_patterns for snapshot_download: configs + one weight format each."""
  patterns = ['model_index.json', 'scheduler/scheduler_config.json', 'tokenizer/*']
  for comp, lib in _LIBRARY.items():
    patterns.append(f'{comp}/config.json')
    formats = ('flax', 'safetensors', 'pytorch') if weights_format == 'auto' else (weights_format,)
    for fmt in formats:
      names = _WEIGHT_FILES[lib][fmt]
      if files is None or any(f'{comp}/{n}' in files for n in names):
        patterns += [f'{comp}/{n}' for n in names]
        # Shards named in an index: '<stem>-00001-of-00002.<ext>'.
        patterns += [f'{comp}/{stem}-*.{ext}' for stem, ext in
                     (n[:-len('.index.json')].rsplit('.', 1) for n in names
                      if n.endswith('.index.json'))]
        if files is not None:
          break
  return patterns


def _download(pretrained, revision, weights_format):
  """Local snapshot of hub repo `pretrained` with only the files we need."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  rev = revision or None
  try:
    files = set(huggingface_hub.list_repo_files(pretrained, revision=rev))
  except Exception:  # pylint: disable=broad-except
    files = None  # Offline: take whatever is in the local cache.
  try:
    return huggingface_hub.snapshot_download(
        pretrained, revision=rev, allow_patterns=_hub_patterns(files, weights_format),
        local_files_only=files is None)
  except Exception as e:  # pylint: disable=broad-except
    raise _fail(pretrained, f'not a local directory, and downloading it as a Hugging Face hub '
                f'id (revision={revision!r}, model.revision) failed: {type(e).__name__}: {e}. '
                'Expected a diffusers-layout directory (unet/, vae/, text_encoder/, '
                'tokenizer/, scheduler/) or a hub id like CompVis/stable-diffusion-v1-4.') from e


def _check_tree(pretrained, path, got, shapes):
  """Flat {key: array} of `got`, checked key- and shape-exact against `shapes`."""
  got = traverse_util.flatten_dict(flax.core.unfreeze(got))
  want = traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  missing = sorted('/'.join(k) for k in want.keys() - got.keys())
  unexpected = sorted('/'.join(k) for k in got.keys() - want.keys())
  bad = sorted(f'{"/".join(k)} {np.shape(got[k])} (expected {want[k].shape})'
               for k in want.keys() & got.keys() if tuple(np.shape(got[k])) != want[k].shape)
  if missing or unexpected or bad:
    msg = [f'{path} does not match the model config:']
    for title, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', bad)):
      if items:
        more = ' ...' if len(items) > 10 else ''
        msg.append(f'  {len(items)} {title}: {", ".join(items[:10])}{more}')
    raise _fail(pretrained, '\n'.join(msg), ValueError)
  return got


def _load_params(pretrained, path, fmt, shapes, library):
  """fp32 params tree read from `path`, shaped exactly like `shapes`."""
  if fmt == 'flax':
    with open(path, 'rb') as f:
      data = f.read()
    try:
      tree = flax.serialization.msgpack_restore(data)
    except ValueError as e:  # msgpack's errors (incomplete input, extra data) are ValueErrors.
      raise _fail(pretrained, f'{path}: truncated or corrupt Flax msgpack file '
                  f'({" ".join(str(e).split())}); re-download or re-export it.', ValueError) from e
    del data
    flat = _check_tree(pretrained, path, tree, shapes)
    tree = traverse_util.unflatten_dict(
        {k: np.asarray(v, np.float32) for k, v in flat.items()})
  else:
    # No random init anywhere: shapes come from jax.eval_shape.
    try:
      tree = weights.convert_pt_to_flax(weights.read_state_dict(path), shapes,
                                        library=library, source=path)
    except ValueError as e:
      raise _fail(pretrained, str(e), ValueError) from e
  return jax.tree.map(jnp.asarray, tree)


def _toyworld_base() -> str:
  from dpg_jax.toyworld import weights  # pylint: disable=g-import-not-at-top
  return weights.BASE_DIR


# Models shipped inside the package, by name (a local directory of the same
# name wins; hub ids always contain a '/', so they never collide).
NAMED_MODELS = {'toyworld': _toyworld_base}


def load_stable_diffusion(pretrained, *, revision='', weights_format='auto', dtype='float32',
                          remat=False, attention='standard', remat_policy='nothing_saveable'):
  """Loads an SD1.x/2.x pipeline as (StableDiffusion, params).

  Args:
    pretrained: a local diffusers-layout directory, a hub id, or the name of a
      model shipped in the package ('toyworld': the pretrained toy-world SD).
    revision: hub branch/tag/commit ('' = default branch).
    weights_format: 'auto' (per component: flax msgpack > safetensors >
      pytorch .bin), 'flax', 'safetensors' or 'pytorch'.
    dtype: compute dtype of the modules, 'float32' or 'bfloat16'. Params are
      always returned in float32.
    remat: wrap the UNet's down/mid/up blocks in nn.remat (same outputs and
      gradients, less activation memory).
    attention: 'standard', 'memory_efficient' or 'split_head_dim' (diffusers'
      Flax UNet attention variants) or 'dot_product' (jax.nn.dot_product_attention:
      cuDNN flash attention on GPU in bf16, XLA elsewhere).
    remat_policy: what a remat'd block saves for the backward (REMAT_POLICIES).

  Returns:
    (sd, params) with params = {'unet', 'vae', 'text_encoder'} of fp32 arrays.
  """
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

  pretrained = os.fspath(pretrained)
  if weights_format not in WEIGHTS_FORMATS:
    raise _fail(pretrained, f'model.weights_format={weights_format!r}; expected one of '
                f'{WEIGHTS_FORMATS}.', ValueError)
  if dtype not in DTYPES:
    raise _fail(pretrained, f'model.dtype={dtype!r}; expected one of {tuple(DTYPES)}.',
                ValueError)
  if attention not in ATTENTIONS:
    raise _fail(pretrained, f'model.attention={attention!r}; expected one of {ATTENTIONS}.',
                ValueError)
  if not pretrained:
    raise _fail(pretrained, 'empty; expected a diffusers-layout directory or a hub id.',
                ValueError)

  if os.path.isdir(pretrained):
    root = os.path.abspath(pretrained)
  elif pretrained in NAMED_MODELS:
    root = NAMED_MODELS[pretrained]()
    if not os.path.isdir(root):
      raise _fail(pretrained, f'the shipped model is missing at {root}; rebuild it with '
                  'python -m dpg_jax.toyworld.pretrain (see the README).')
  elif (os.path.exists(pretrained) or os.path.isabs(pretrained)
        or pretrained.startswith(('.', '~')) or not _HUB_ID.fullmatch(pretrained)):
    raise _fail(pretrained, f'{pretrained} does not exist or is not a directory, and is not '
                "a hub id ('org/name'); expected a diffusers-layout directory with "
                f'{", ".join(c + "/" for c in COMPONENTS)}.')
  else:
    root = _download(pretrained, revision, weights_format)

  for comp in COMPONENTS:
    folder = os.path.join(root, comp)
    if not os.path.isdir(folder):
      raise _fail(pretrained, f'missing component folder {folder}/; a diffusers-layout '
                  f'pipeline needs {", ".join(c + "/" for c in COMPONENTS)}.')
    if not os.path.isfile(os.path.join(folder, _CONFIG_FILES[comp])):
      raise _fail(pretrained, f'{folder}/ has no {_CONFIG_FILES[comp]}.')
  files = {c: _find_weights(pretrained, os.path.join(root, c), c, weights_format)
           for c in _LIBRARY}

  quiet_diffusers()
  jdtype = DTYPES[dtype]
  unet = make_unet(FlaxUNet2DConditionModel.load_config(os.path.join(root, 'unet')),
                   dtype=dtype, remat=remat, attention=attention, remat_policy=remat_policy)
  vae = FlaxAutoencoderKL.from_config(
      FlaxAutoencoderKL.load_config(os.path.join(root, 'vae')), dtype=jdtype)
  te = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(root, 'text_encoder')),
                         dtype=jdtype, _do_init=False)
  tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, 'tokenizer'))
  with open(os.path.join(root, 'scheduler', 'scheduler_config.json')) as f:
    scheduler_config = json.load(f)

  key = jax.random.PRNGKey(0)
  shapes = {'unet': weights.flax_shapes(unet.init_weights, key),
            'vae': weights.flax_shapes(vae.init_weights, key),
            'text_encoder': flax.core.unfreeze(te.params_shape_tree)}
  params = {c: _load_params(pretrained, *files[c], shapes[c], _LIBRARY[c]) for c in _LIBRARY}
  sd = StableDiffusion(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer,
                       scheduler_config=scheduler_config, source=root, dtype=dtype,
                       remat=remat, attention=attention, remat_policy=remat_policy)
  return sd, params


def export_scheduler_config(scheduler_config: dict) -> dict:
  """The DDIM scheduler config an export ships, on the model's training schedule.

  DDIM because diffusers' Flax pipeline runs exactly `num_inference_steps`
  scheduler steps: the pinned diffusers' Flax DDPM step crashes on current jax,
  and PNDM (PLMS) has num_inference_steps + 1 timesteps, so the Flax pipeline
  would stop one step short. PyTorch's DDIMScheduler reads the same config.
  """
  keys = _SCHEDULE_KEYS + ('clip_sample', 'set_alpha_to_one')
  return dict({k: scheduler_config[k] for k in keys if k in scheduler_config},
              _class_name='DDIMScheduler')


def replace_dir(out_dir, write_fn) -> str:
  """write_fn(tmp_dir) into a temporary sibling, then rename it to `out_dir`.

  Readers never see a half-written directory; an existing `out_dir` is
  replaced. Returns the absolute `out_dir`.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(out_dir) + '.tmp-', dir=parent)
  try:
    write_fn(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700.
    old = None
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix='.' + os.path.basename(out_dir) + '.old-', dir=parent)
      os.rename(out_dir, os.path.join(old, 'x'))
    os.rename(tmp, out_dir)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def write_json(path, obj):
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2)


def save_pipeline(out_dir, sd: StableDiffusion, params) -> str:
  """Writes (sd, params) in diffusers layout with Flax msgpack weights.

  Loadable by `load_stable_diffusion` and, default DDIM scheduler included
  (`export_scheduler_config`), by `diffusers.FlaxStableDiffusionPipeline.
  from_pretrained(out_dir, safety_checker=None, feature_extractor=None)`.
  Written to a temporary sibling and renamed into place; an existing `out_dir`
  is replaced. Returns `out_dir`.
  """
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

  quiet_diffusers()
  host = lambda tree: jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), tree)

  def write(tmp):
    # Plain diffusers classes and configs: the export must not depend on our
    # remat subclass or on run-time attention flags.
    unet_cfg = dict(sd.unet.config, use_memory_efficient_attention=False, split_head_dim=False)
    FlaxUNet2DConditionModel.from_config(unet_cfg).save_pretrained(
        os.path.join(tmp, 'unet'), params=host(params['unet']))
    FlaxAutoencoderKL.from_config(dict(sd.vae.config)).save_pretrained(
        os.path.join(tmp, 'vae'), params=host(params['vae']))
    FlaxCLIPTextModel(sd.text_encoder.config, _do_init=False).save_pretrained(
        os.path.join(tmp, 'text_encoder'), params=host(params['text_encoder']))
    sd.tokenizer.save_pretrained(os.path.join(tmp, 'tokenizer'))
    os.makedirs(os.path.join(tmp, 'scheduler'))
    write_json(os.path.join(tmp, 'scheduler', 'scheduler_config.json'),
               export_scheduler_config(sd.scheduler_config))
    write_json(os.path.join(tmp, 'model_index.json'), FLAX_MODEL_INDEX)

  return replace_dir(out_dir, write)
