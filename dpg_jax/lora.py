"""LoRA: rank-r adapters on the attention projections, the base weights frozen.

Each adapted Dense layer y = x W + b becomes y = x W + b + (alpha / r) *
dropout(x) A B, with A [in, r] (Kaiming-uniform, as peft) and B [r, out]
(zeros: training starts from the base model). Targets: the UNet's attention
projections to_q, to_k, to_v, to_out.0 (every attn1 and attn2), and with
`finetune.lora_text_encoder` the CLIP text encoder's q_proj, k_proj, v_proj,
out_proj.

Design: in the step the adapter is added by a Flax method interceptor on the
targeted Dense layers (no fork of diffusers' or transformers' modules; the
frozen kernel is used as it is, so no [in, out] kernel gradient is ever
formed, and dropout on the adapter input works as in peft). For sampling the
adapters are merged once into the kernels (`merge`), so the sampler runs the
plain model at full speed.

Files: `pytorch_lora_weights.safetensors` as diffusers 0.39 + peft write it
(`StableDiffusionPipeline.save_lora_weights`): keys
`unet.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] in torch
layout (`text_encoder.<module>...` likewise), alpha and rank in the
`lora_adapter_metadata` header. `pipe.load_lora_weights(dir)` loads it;
`load_delta` reads it (and the older `.lora.down.weight` / `.lora.up.weight`
naming, with `.alpha` keys) back into our sampler.
"""
import dataclasses
import json
import os
import zlib

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from dpg_jax import weights

WEIGHT_NAME = 'pytorch_lora_weights.safetensors'
UNET_TARGETS = ('to_q', 'to_k', 'to_v', 'to_out_0')
TEXT_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
# How the step forms the adapted layer: 'intercept' adds (alpha/r) x A B to the
# frozen layer's output (the default: no [in, out] kernel gradient, dropout);
# 'merge' builds W + (alpha/r) A B before the apply (same maths, for comparison).
FORMS = ('intercept', 'merge')
# Our component name -> diffusers' key prefix.
_PREFIX = {'unet': 'unet', 'text_encoder': 'text_encoder'}


def validate_config(config) -> None:
  f = config.finetune
  if not isinstance(f.lora_rank, int) or f.lora_rank < 1:
    raise ValueError(f'config key finetune.lora_rank={f.lora_rank!r}: expected an integer >= 1.')
  if not isinstance(f.lora_alpha, (int, float)) or not f.lora_alpha > 0:
    raise ValueError(f'config key finetune.lora_alpha={f.lora_alpha!r}: expected a number > 0.')
  if not isinstance(f.lora_dropout, (int, float)) or not 0.0 <= f.lora_dropout < 1.0:
    raise ValueError(f'config key finetune.lora_dropout={f.lora_dropout!r}: expected '
                     '0 <= dropout < 1.')
  if f.lora_form not in FORMS:
    raise ValueError(f'config key finetune.lora_form={f.lora_form!r}: expected one of {FORMS}.')
  if f.lora_form == 'merge' and f.lora_dropout:
    raise ValueError(f"config key finetune.lora_form='merge' forms W + (alpha/r) A B before the "
                     f'layer, where no dropout of its input exists; lora_dropout='
                     f'{f.lora_dropout} needs lora_form=\'intercept\'.')


def text_in_step(config) -> bool:
  return bool(config.finetune.lora_text_encoder)


def build(config, sd, params):
  f = config.finetune
  components = ('unet', 'text_encoder') if f.lora_text_encoder else ('unet',)
  return sd, params, LoRA(rank=int(f.lora_rank), alpha=float(f.lora_alpha),
                          dropout=float(f.lora_dropout), components=components,
                          form=f.get('lora_form', 'intercept'))


def _is_target(component: str, module_path) -> bool:
  names = UNET_TARGETS if component == 'unet' else TEXT_TARGETS
  return bool(module_path) and module_path[-1] in names and (
      component != 'unet' or (len(module_path) > 1 and module_path[-2] in ('attn1', 'attn2')))


def target_kernels(component: str, params) -> dict:
  """{module path: kernel} of the layers LoRA adapts in params[component]."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(params[component]))
  return {k[:-1]: v for k, v in flat.items() if k[-1] == 'kernel' and _is_target(component, k[:-1])}


def _lookup(tree, path):
  for name in path:
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree if isinstance(tree, dict) and 'lora_a' in tree else None


@dataclasses.dataclass(frozen=True)
class LoRA:
  """The static description of a run's adapters (closed over by the step)."""
  rank: int
  alpha: float
  dropout: float = 0.0
  components: tuple = ('unet',)
  form: str = 'intercept'        # one of FORMS (how the step forms the adapted layer)
  name: str = 'lora'

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def text_in_step(self) -> bool:
    return 'text_encoder' in self.components

  def init_trainable(self, params, rng) -> dict:
    out = {}
    for ci, comp in enumerate(self.components):
      flat = {}
      for i, (path, kernel) in enumerate(sorted(target_kernels(comp, params).items())):
        n_in, n_out = kernel.shape
        bound = 1.0 / np.sqrt(n_in)   # peft: kaiming_uniform_(a=sqrt(5)) on [r, in]
        key = jax.random.fold_in(jax.random.fold_in(rng, ci), i)
        flat[path + ('lora_a',)] = jax.random.uniform(key, (n_in, self.rank), jnp.float32,
                                                      -bound, bound)
        flat[path + ('lora_b',)] = jnp.zeros((self.rank, n_out), jnp.float32)
      out[comp] = traverse_util.unflatten_dict(flat)
    return out

  def frozen_base(self, params) -> dict:
    return {'unet': params['unet'], 'text_encoder': params['text_encoder']}

  def interceptor(self, adapters, rng=None):
    """Flax interceptor adding (alpha/r) dropout(x) A B to every adapted Dense."""
    scale, p = self.scale, self.dropout

    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name != '__call__' or not isinstance(context.module, nn.Dense):
        return out
      ab = _lookup(adapters, context.module.path)
      if ab is None:
        return out
      x = args[0]
      if p > 0.0 and rng is not None:
        key = jax.random.fold_in(rng, zlib.crc32('/'.join(context.module.path).encode()))
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        x = jnp.where(keep, x / (1.0 - p), 0.0).astype(x.dtype)
      a, b = ab['lora_a'].astype(x.dtype), ab['lora_b'].astype(x.dtype)
      return out + (scale * ((x @ a) @ b)).astype(out.dtype)

    return intercept

  def model_fns(self, sd, trainable, base, rng):
    """(encode_text(ids), predict(x_t, t, context)) of the adapted model."""
    if self.form == 'merge':
      merged = self.merge(base, trainable)
      return (lambda ids: sd.encode_text(merged['text_encoder'], ids),
              lambda x, t, c: sd.predict(merged['unet'], x, t, c))

    def encode(ids):
      with nn.intercept_methods(self.interceptor(trainable.get('text_encoder', {}),
                                                 jax.random.fold_in(rng, 1))):
        return sd.encode_text(base['text_encoder'], ids)

    def predict(x, t, context):
      with nn.intercept_methods(self.interceptor(trainable['unet'], jax.random.fold_in(rng, 2))):
        return sd.predict(base['unet'], x, t, context)

    return encode, predict

  def merge(self, params, trainable) -> dict:
    """Full params with W + (alpha/r) A B in every adapted kernel (new arrays there only)."""
    out = dict(params)
    for comp, tree in trainable.items():
      flat = traverse_util.flatten_dict(flax.core.unfreeze(params[comp]))
      adapters = traverse_util.flatten_dict(tree)
      for path, a in adapters.items():
        if path[-1] != 'lora_a':
          continue
        mod = path[:-1]
        a = jnp.asarray(a, jnp.float32)
        b = jnp.asarray(adapters[mod + ('lora_b',)], jnp.float32)
        flat[mod + ('kernel',)] = flat[mod + ('kernel',)] + self.scale * (a @ b)
      out[comp] = traverse_util.unflatten_dict(flat)
    return out

  def describe(self) -> dict:
    return {'rank': self.rank, 'alpha': self.alpha, 'dropout': self.dropout,
            'components': list(self.components)}

  # -- diffusers' file ----------------------------------------------------------
  def state_dict(self, trainable) -> dict:
    """{diffusers key: torch-layout float32 array} of `trainable`."""
    out = {}
    for comp, tree in trainable.items():
      for path, x in traverse_util.flatten_dict(tree).items():
        mod, leaf = path[:-1], path[-1]
        names = [weights._pt_module_name(m) for m in mod] if comp == 'unet' else list(mod)  # pylint: disable=protected-access
        kind = 'lora_A' if leaf == 'lora_a' else 'lora_B'
        out['.'.join([_PREFIX[comp]] + names + [kind, 'weight'])] = np.ascontiguousarray(
            np.asarray(x, np.float32).T)
    return out

  def metadata(self) -> dict:
    meta = {}
    for comp in self.components:
      targets = UNET_TARGETS if comp == 'unet' else TEXT_TARGETS
      # The LoraConfig fields diffusers passes to peft's LoraConfig(**...) on load.
      cfg = {'r': self.rank, 'lora_alpha': self.alpha, 'lora_dropout': self.dropout,
             'target_modules': sorted(t.replace('_0', '.0') for t in targets),
             'rank_pattern': {}, 'alpha_pattern': {}, 'bias': 'none',
             'init_lora_weights': True, 'use_dora': False, 'use_rslora': False,
             'peft_type': 'LORA', 'fan_in_fan_out': False}
      meta.update({f'{_PREFIX[comp]}.{k}': v for k, v in cfg.items()})
    return {'format': 'pt', 'lora_adapter_metadata': json.dumps(meta, indent=2, sort_keys=True)}

  def save_delta(self, out_dir, trainable) -> list:
    safetensors.numpy.save_file(self.state_dict(trainable), os.path.join(out_dir, WEIGHT_NAME),
                                metadata=self.metadata())
    return [WEIGHT_NAME]


# -----------------------------------------------------------------------------
# Reading a LoRA file (ours or one diffusers made).
# -----------------------------------------------------------------------------
def _flax_module_path(comp: str, torch_path: str) -> tuple:
  if comp == 'unet':
    return tuple(weights._diffusers_rename(torch_path).split('.'))  # pylint: disable=protected-access
  return tuple(torch_path.split('.'))


def read_lora_file(path: str):
  """(LoRA, trainable) of a diffusers LoRA safetensors file.

  Accepts peft's `lora_A`/`lora_B` keys and the older `lora.down`/`lora.up`
  naming; alpha from the `lora_adapter_metadata` header, else `.alpha` keys,
  else alpha = rank (scale 1, what diffusers assumes then).
  """
  with safetensors.safe_open(path, framework='numpy') as f:
    meta = f.metadata() or {}
    state = {k: f.get_tensor(k) for k in f.keys()}
  adapter_meta = json.loads(meta.get('lora_adapter_metadata', '{}') or '{}')
  flat, alphas, ranks = {}, {}, set()
  for key, x in state.items():
    comp = key.split('.', 1)[0]
    if comp not in _PREFIX:
      raise ValueError(f'{path}: key {key!r} is neither unet.* nor text_encoder.*.')
    rest = key[len(comp) + 1:]
    if rest.endswith('.alpha'):
      alphas[comp] = float(np.asarray(x))
      continue
    for suffix, leaf in (('.lora_A.weight', 'lora_a'), ('.lora_B.weight', 'lora_b'),
                         ('.lora.down.weight', 'lora_a'), ('.lora.up.weight', 'lora_b')):
      if rest.endswith(suffix):
        mod = _flax_module_path(comp, rest[:-len(suffix)])
        flat[(comp,) + mod + (leaf,)] = np.asarray(x, np.float32).T
        if leaf == 'lora_a':
          ranks.add(x.shape[0])
        break
    else:
      raise ValueError(f'{path}: key {key!r} is not a LoRA weight (lora_A/lora_B or '
                       'lora.down/lora.up).')
  if len(ranks) != 1:
    raise ValueError(f'{path}: expected one LoRA rank, found {sorted(ranks)}.')
  rank = ranks.pop()
  comps = tuple(c for c in ('unet', 'text_encoder') if any(k[0] == c for k in flat))
  alpha_of = {c: float(adapter_meta.get(f'{c}.lora_alpha', alphas.get(c, rank))) for c in comps}
  if len(set(alpha_of.values())) > 1:
    raise ValueError(f'{path}: different alphas per component {alpha_of} are not supported.')
  dropout = float(adapter_meta.get('unet.lora_dropout', 0.0))
  tree = traverse_util.unflatten_dict(flat)
  return LoRA(rank=rank, alpha=next(iter(alpha_of.values())), dropout=dropout,
              components=comps), tree


def check_targets(lora_tree, params, source: str) -> None:
  """Every adapter names a kernel of the base model with matching shapes."""
  for comp, tree in lora_tree.items():
    kernels = traverse_util.flatten_dict(flax.core.unfreeze(params[comp]))
    for path, x in traverse_util.flatten_dict(tree).items():
      kernel = kernels.get(path[:-1] + ('kernel',))
      if kernel is None:
        raise ValueError(f'{source}: {comp} has no layer {"/".join(path[:-1])} for its LoRA.')
      dim = kernel.shape[0] if path[-1] == 'lora_a' else kernel.shape[1]
      if (x.shape[0] if path[-1] == 'lora_a' else x.shape[1]) != dim:
        raise ValueError(f'{source}: LoRA {"/".join(path)} {x.shape} does not fit the '
                         f'kernel {kernel.shape}.')


def load_delta(folder, record, sd, params):
  """(sd, params, LoRA, trainable) of the LoRA file in `folder`."""
  del record  # the file holds rank, alpha and targets
  path = os.path.join(folder, WEIGHT_NAME)
  method, tree = read_lora_file(path)
  check_targets(tree, params, path)
  return sd, params, method, jax.tree.map(jnp.asarray, tree)
