"""Custom Diffusion (Kumari et al., CVPR 2023): cross-attention k/v and a new token.

As the authors' code and diffusers' `train_custom_diffusion.py`:
  * trainable: the `attn2.to_k` and `attn2.to_v` kernels of every transformer
    block (`finetune.freeze_model='crossattn_kv'`, the default), plus `to_q`
    and `to_out.0` with 'crossattn' (their recipe for faces); nothing else
    has gradients or optimiser state;
  * modifier tokens (`finetune.modifier_token`, '+'-separated: '<new1>' or
    '<new1>+<new2>') are added to the tokenizer and the text encoder's
    embedding table grows by one row each, initialised from the matching
    initializer token (`finetune.initializer_token`, diffusers' default
    'ktn+pll+ucd'); only those rows train. Instead of masking the gradient
    of the other rows (diffusers), the rows themselves are the trainable
    array and replace the table's lookups of the new ids inside the step:
    the same update, and the optimiser state holds [n, D], not the table;
  * the start token's key and value in cross-attention are detached
    (stop_gradient), as both reference implementations do.

Files (diffusers' formats): `pytorch_custom_diffusion_weights.safetensors`
(`unet.save_attn_procs` keys `<layer>.attn2.processor.to_k_custom_diffusion.
weight`, torch layout) and `<new1>.safetensors` ({'<new1>': [D]}, as
`save_new_embed`). diffusers 0.39 drops the attn1 processors (empty dicts)
from its own safetensors file, so `load_attn_procs` cannot install it; ours
writes them as zero-length tensors, which diffusers reads as those empty
processors. Load in PyTorch with
  pipe.unet.load_attn_procs(dir, weight_name='pytorch_custom_diffusion_weights.safetensors',
                            _pipeline=pipe)   # without _pipeline 0.39 sets nothing
  pipe.load_textual_inversion(dir, weight_name='<new1>.safetensors')
"""
import copy
import dataclasses
import glob
import os

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from dpg_jax import weights

WEIGHT_NAME = 'pytorch_custom_diffusion_weights.safetensors'
FREEZE_MODELS = ('crossattn_kv', 'crossattn')
_EMBED = ('text_model', 'embeddings', 'token_embedding')
_TORCH_NAMES = {'to_k': 'to_k_custom_diffusion', 'to_v': 'to_v_custom_diffusion',
                'to_q': 'to_q_custom_diffusion', 'to_out_0': 'to_out_custom_diffusion.0'}


def parse_tokens(config):
  """(modifier tokens, their initializer tokens) of config.finetune."""
  f = config.finetune
  mods = [t for t in f.modifier_token.split('+')] if f.modifier_token else []
  inits = [t for t in f.initializer_token.split('+')] if f.initializer_token else []
  return mods, inits[:len(mods)]


def validate_config(config) -> None:
  f = config.finetune
  if f.freeze_model not in FREEZE_MODELS:
    raise ValueError(f'config key finetune.freeze_model={f.freeze_model!r}: expected one of '
                     f'{FREEZE_MODELS}.')
  mods, inits = parse_tokens(config)
  if not mods or any(not m or any(c.isspace() for c in m) for m in mods):
    raise ValueError(f'config key finetune.modifier_token={f.modifier_token!r}: expected '
                     "'+'-separated tokens without spaces, e.g. '<new1>' or '<new1>+<new2>'.")
  if len(inits) < len(mods) or any(not t for t in inits):
    raise ValueError(f'config key finetune.initializer_token={f.initializer_token!r}: '
                     f'expected one initializer token per modifier token ({len(mods)}), '
                     "'+'-separated, e.g. 'ktn+pll+ucd'.")
  if config.data.identifier not in mods:
    raise ValueError(f'config key data.identifier={config.data.identifier!r}: Custom '
                     f'Diffusion prompts name the subject by a modifier token; expected one '
                     f'of finetune.modifier_token {mods}.')


def text_in_step(config) -> bool:
  del config
  return True   # the new tokens' rows train: the text encoder runs in the step


def _table(te_params):
  return te_params['text_model']['embeddings']['token_embedding']['embedding']


def _with_table(te_params, table):
  out = flax.core.unfreeze(te_params)
  tm = dict(out['text_model'])
  tm['embeddings'] = dict(tm['embeddings'], token_embedding={'embedding': table})
  return dict(out, text_model=tm)


def grow(sd, params, modifier_tokens, init_rows_fn):
  """(sd, params, first new id): the tokenizer and embedding table with the new tokens.

  init_rows_fn(tokenizer, table) -> [n, D] rows of the new tokens.
  """
  from transformers import FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  tok = copy.deepcopy(sd.tokenizer)
  table = _table(params['text_encoder'])
  v0 = int(table.shape[0])
  for m in modifier_tokens:
    if tok.add_tokens(m) == 0:
      raise ValueError(f'config key finetune.modifier_token: {m!r} is already a token of '
                       f'the tokenizer of {sd.source}; choose a new one, e.g. <new1>.')
  ids = tok.convert_tokens_to_ids(list(modifier_tokens))
  if ids != list(range(v0, v0 + len(modifier_tokens))):
    raise ValueError(f'{sd.source}: the tokenizer gave the new tokens ids {ids}, but the text '
                     f'encoder embeds {v0} tokens; expected ids {v0}... (tokenizer and text '
                     'encoder of different models?)')
  rows = jnp.asarray(init_rows_fn(tok, table), jnp.float32)
  te_config = copy.deepcopy(sd.text_encoder.config)
  te_config.vocab_size = v0 + len(modifier_tokens)
  te = FlaxCLIPTextModel(te_config, dtype=sd.text_encoder.dtype, _do_init=False)
  params = dict(params, text_encoder=_with_table(params['text_encoder'],
                                                 jnp.concatenate([table, rows])))
  return dataclasses.replace(sd, text_encoder=te, tokenizer=tok), params, v0


def build(config, sd, params):
  mods, inits = parse_tokens(config)

  def init_rows(tok, table):
    ids = []
    for m, init in zip(mods, inits):
      got = tok.encode(init, add_special_tokens=False)
      if len(got) != 1:
        raise ValueError(f'config key finetune.initializer_token: {init!r} (for {m!r}) is '
                         f'{len(got)} tokens of the tokenizer of {sd.source}; expected a '
                         'single token.')
      ids.append(got[0])
    return jnp.asarray(table)[jnp.asarray(ids)]

  sd, params, first = grow(sd, params, mods, init_rows)
  return sd, params, CustomDiffusion(modifier_tokens=tuple(mods), first_new_id=first,
                                     freeze_model=config.finetune.freeze_model)


@dataclasses.dataclass(frozen=True)
class CustomDiffusion:
  """The static description of a Custom Diffusion run (closed over by the step)."""
  modifier_tokens: tuple
  first_new_id: int
  freeze_model: str = 'crossattn_kv'
  name: str = 'custom_diffusion'
  text_in_step: bool = True

  @property
  def trained_layers(self) -> tuple:
    return ('to_k', 'to_v') + (('to_q', 'to_out_0') if self.freeze_model == 'crossattn' else ())

  def is_selected(self, path) -> bool:
    """Whether UNet leaf `path` (flat key) trains."""
    return len(path) >= 3 and path[-3] == 'attn2' and path[-2] in self.trained_layers

  def init_trainable(self, params, rng) -> dict:
    del rng
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params['unet']))
    unet = {k: jnp.copy(v) for k, v in flat.items() if self.is_selected(k)}
    return {'unet': traverse_util.unflatten_dict(unet),
            'token_embedding': jnp.copy(_table(params['text_encoder'])[self.first_new_id:])}

  def frozen_base(self, params) -> dict:
    return {'unet': params['unet'], 'text_encoder': params['text_encoder']}

  def _unet(self, base_unet, trained):
    flat = traverse_util.flatten_dict(flax.core.unfreeze(base_unet))
    flat.update(traverse_util.flatten_dict(trained))
    return traverse_util.unflatten_dict(flat)

  def embed_interceptor(self, rows):
    """The new ids' embeddings come from `rows` (trainable), the rest from the table."""
    first, n = self.first_new_id, rows.shape[0]

    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name != '__call__' or tuple(context.module.path) != _EMBED:
        return out
      ids = args[0]
      new = rows[jnp.clip(ids - first, 0, n - 1)].astype(out.dtype)
      return jnp.where((ids >= first)[..., None], new, out)

    return intercept

  @staticmethod
  def detach_start_token(next_fun, args, kwargs, context):
    """Cross-attention k/v of the start token carry no gradient (as the authors)."""
    out = next_fun(*args, **kwargs)
    path = context.module.path
    if (context.method_name == '__call__' and isinstance(context.module, nn.Dense)
        and len(path) > 1 and path[-2] == 'attn2' and path[-1] in ('to_k', 'to_v')):
      return jnp.concatenate([jax.lax.stop_gradient(out[:, :1]), out[:, 1:]], axis=1)
    return out

  def model_fns(self, sd, trainable, base, rng):
    del rng
    unet = self._unet(base['unet'], trainable['unet'])

    def encode(ids):
      with nn.intercept_methods(self.embed_interceptor(trainable['token_embedding'])):
        return sd.encode_text(base['text_encoder'], ids)

    def predict(x, t, context):
      with nn.intercept_methods(self.detach_start_token):
        return sd.predict(unet, x, t, context)

    return encode, predict

  def merge(self, params, trainable) -> dict:
    table = _table(params['text_encoder'])
    table = jnp.concatenate([jnp.asarray(table)[:self.first_new_id],
                             jnp.asarray(trainable['token_embedding'], jnp.float32)])
    return dict(params, unet=self._unet(params['unet'], trainable['unet']),
                text_encoder=_with_table(params['text_encoder'], table))

  def describe(self) -> dict:
    return {'modifier_tokens': list(self.modifier_tokens), 'freeze_model': self.freeze_model}

  # -- diffusers' files -----------------------------------------------------------
  def state_dict(self, trainable, attn1_layers=()) -> dict:
    """unet.save_attn_procs' keys, torch layout; attn1 processors as empty markers."""
    out = {}
    for path, x in traverse_util.flatten_dict(trainable['unet']).items():
      layer = '.'.join(weights._pt_module_name(m) for m in path[:-2])  # pylint: disable=protected-access
      x = np.asarray(x, np.float32)
      name = _TORCH_NAMES[path[-2]] + ('.weight' if path[-1] == 'kernel' else '.bias')
      out[f'{layer}.processor.{name}'] = np.ascontiguousarray(x.T if x.ndim == 2 else x)
    for layer in attn1_layers:
      out[f'{layer}.processor'] = np.zeros((0,), np.float32)
    return out

  def save_delta(self, out_dir, trainable) -> list:
    attn1 = sorted({'.'.join(weights._pt_module_name(m) for m in path[:-3]) + '.attn1'  # pylint: disable=protected-access
                    for path in traverse_util.flatten_dict(trainable['unet'])})
    safetensors.numpy.save_file(self.state_dict(trainable, attn1),
                                os.path.join(out_dir, WEIGHT_NAME), metadata={'format': 'pt'})
    files = [WEIGHT_NAME]
    rows = np.asarray(trainable['token_embedding'], np.float32)
    for i, tok in enumerate(self.modifier_tokens):
      name = f'{tok}.safetensors'
      safetensors.numpy.save_file({tok: np.ascontiguousarray(rows[i])},
                                  os.path.join(out_dir, name), metadata={'format': 'pt'})
      files.append(name)
    return files


def read_weights(path: str):
  """(freeze_model, UNet trainable tree) of a Custom Diffusion safetensors file."""
  flat, has_q = {}, False
  with safetensors.safe_open(path, framework='numpy') as f:
    for key in f.keys():
      x = f.get_tensor(key)
      if x.size == 0:
        continue   # an attn1 (untrained) processor
      layer, _, name = key.partition('.processor.')
      leaf = 'kernel' if name.endswith('.weight') else 'bias'
      base = name.rsplit('.', 1)[0]
      ours = {v: k for k, v in _TORCH_NAMES.items()}.get(base)
      if not layer or ours is None:
        raise ValueError(f'{path}: key {key!r} is not a Custom Diffusion weight.')
      has_q |= ours == 'to_q'
      mod = tuple(weights._diffusers_rename(layer).split('.')) + (ours,)  # pylint: disable=protected-access
      flat[mod + (leaf,)] = np.asarray(x.T if leaf == 'kernel' else x, np.float32)
  return ('crossattn' if has_q else 'crossattn_kv'), traverse_util.unflatten_dict(flat)


def load_delta(folder, record, sd, params):
  """(sd, params, CustomDiffusion, trainable) of the files in `folder` on base (sd, params)."""
  freeze_model, unet = read_weights(os.path.join(folder, WEIGHT_NAME))
  if record is not None:
    tokens = record['modifier_tokens']
  else:  # a diffusers output folder: every other .safetensors is one learned embedding
    tokens = sorted(os.path.basename(p)[:-len('.safetensors')]
                    for p in glob.glob(os.path.join(folder, '*.safetensors'))
                    if os.path.basename(p) != WEIGHT_NAME)
  rows = []
  for tok in tokens:
    path = os.path.join(folder, f'{tok}.safetensors')
    state = safetensors.numpy.load_file(path)
    if tok not in state:
      raise ValueError(f'{path}: expected the key {tok!r}; found {sorted(state)}.')
    rows.append(np.asarray(state[tok], np.float32).reshape(-1))
  rows = np.stack(rows)
  sd, params, first = grow(sd, params, tokens, lambda tok, table: rows)
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params['unet']))
  for path, x in traverse_util.flatten_dict(unet).items():
    if path not in flat or flat[path].shape != x.shape:
      raise ValueError(f'{folder}: Custom Diffusion weight {"/".join(path)} {x.shape} does not '
                       'fit the base UNet.')
  method = CustomDiffusion(modifier_tokens=tuple(tokens), first_new_id=first,
                           freeze_model=freeze_model)
  return sd, params, method, {'unet': jax.tree.map(jnp.asarray, unet),
                              'token_embedding': jnp.asarray(rows)}
