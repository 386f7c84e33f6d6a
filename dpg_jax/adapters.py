"""Parameter-efficient fine-tuning: what a run trains and how it meets the frozen rest.

`config.finetune.method`:
  full              DreamBooth: the whole UNet (and the text encoder with
                    train_text_encoder). The default; nothing here runs.
  custom_diffusion  Custom Diffusion (dpg_jax/custom_diffusion.py): the
                    cross-attention k/v (optionally q/out) kernels and the
                    embedding rows of new modifier tokens.
  lora              LoRA (dpg_jax/lora.py): rank-r adapters on the attention
                    projections, base weights untouched.

One mechanism for both. A `Method` names its trainable arrays (the train
state's params: the only leaves with gradients and optimiser state) and builds
the step's text-encoder and UNet functions from them plus the frozen base
model. The base reaches the step as its frozen argument `frozen['peft']`
(the very arrays previews and the export use: never donated, never copied per
step). `merge` forms full pipeline params (previews, sampling, evaluation);
the export writes only the delta, in diffusers' file formats, with
`adapter_config.json` naming the base model (`export_delta`), and
`load_delta_dir` applies such a delta (ours or one diffusers made) to the base
again for `--mode=sample` and the evaluation.
"""
import json
import os

import jax

from dpg_jax import models

METHODS = ('full', 'custom_diffusion', 'lora')
ADAPTER_CONFIG = 'adapter_config.json'


def method_name(config) -> str:
  """The config's fine-tuning method ('full' for configs without the group)."""
  return config.finetune.method if 'finetune' in config else 'full'


def _module(name):
  # Imported on demand: each method module imports flax/diffusers pieces.
  if name == 'custom_diffusion':
    from dpg_jax import custom_diffusion  # pylint: disable=g-import-not-at-top
    return custom_diffusion
  from dpg_jax import lora  # pylint: disable=g-import-not-at-top
  return lora


def validate_config(config) -> None:
  """One-line errors for bad config.finetune keys (before any model load)."""
  name = method_name(config)
  if name not in METHODS:
    raise ValueError(f'config key finetune.method={name!r}: expected one of {METHODS}.')
  if name == 'full':
    return
  if config.train_text_encoder:
    hint = (' (finetune.lora_text_encoder=True adds text-encoder adapters)'
            if name == 'lora' else '')
    raise ValueError(f'config key train_text_encoder=True: finetune.method={name!r} trains '
                     f'its own parameters only; set train_text_encoder=False{hint}.')
  _module(name).validate_config(config)


def text_in_step(config) -> bool:
  """Whether the text encoder runs inside the step (the batch carries token ids)."""
  name = method_name(config)
  if name == 'full':
    return bool(config.train_text_encoder)
  return _module(name).text_in_step(config)


def build(config, sd, params):
  """(sd, params, method): the model a run trains; method None for 'full'.

  Custom Diffusion returns a grown tokenizer and embedding table (the new
  tokens' rows start as their initializer tokens' rows).
  """
  name = method_name(config)
  if name == 'full':
    return sd, params, None
  return _module(name).build(config, sd, params)


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# -----------------------------------------------------------------------------
# The delta on disk.
# -----------------------------------------------------------------------------
def base_model_record(config, pretrained: str) -> dict:
  return {'pretrained': os.path.abspath(pretrained) if os.path.isdir(pretrained) else pretrained,
          'revision': config.model.revision, 'weights_format': config.model.weights_format}


def export_delta(out_dir, method, trainable, base: dict) -> str:
  """Writes the delta (diffusers' files) and adapter_config.json into `out_dir`."""
  host = jax.device_get(trainable)

  def write(tmp):
    files = method.save_delta(tmp, host)
    models.write_json(os.path.join(tmp, ADAPTER_CONFIG),
                      {'method': method.name, 'base_model': base, 'files': files,
                       **method.describe()})

  return models.replace_dir(out_dir, write)


def is_delta_dir(path: str) -> bool:
  """An exported delta, or a folder with a diffusers LoRA / Custom Diffusion file."""
  return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) or any(
      os.path.isfile(os.path.join(path, f)) for f in _DIFFUSERS_FILES)


# lora.WEIGHT_NAME, custom_diffusion.WEIGHT_NAME (diffusers' names).
_DIFFUSERS_FILES = ('pytorch_lora_weights.safetensors',
                    'pytorch_custom_diffusion_weights.safetensors')


def marker_file(folder: str) -> str:
  """The file of a delta dir whose time is the export's (written last by export_delta)."""
  for name in (ADAPTER_CONFIG,) + _DIFFUSERS_FILES:
    if os.path.isfile(os.path.join(folder, name)):
      return name
  raise FileNotFoundError(f'{folder} holds no adapter delta.')


def read_adapter_config(folder: str) -> dict | None:
  path = os.path.join(folder, ADAPTER_CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def load_delta_dir(folder: str, load_base):
  """(sd, params, method) with the delta in `folder` applied to its base model.

  load_base(record or None) -> (sd, params): the base of adapter_config.json's
  `base_model`, or (None: a folder of diffusers files without one) the run
  config's model.
  """
  record = read_adapter_config(folder)
  sd, params = load_base(None if record is None else record['base_model'])
  if record is not None:
    name = record['method']
  elif os.path.isfile(os.path.join(folder, _DIFFUSERS_FILES[0])):
    name = 'lora'
  else:
    name = 'custom_diffusion'
  sd, params, method, trainable = _module(name).load_delta(folder, record, sd, params)
  return sd, method.merge(params, trainable), method
