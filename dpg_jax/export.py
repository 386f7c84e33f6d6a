"""Exports of a trained pipeline that users load without dpg_jax.

  <workdir>/export/        diffusers layout, Flax msgpack weights
                           (`models.save_pipeline`): FlaxStableDiffusionPipeline.
  <workdir>/export_torch/  diffusers layout, PyTorch safetensors weights (fp32,
                           and with `fp16` also diffusers' variant='fp16' files):
                           StableDiffusionPipeline.from_pretrained(dir), no from_flax.

Both ship the DDIM scheduler of `models.export_scheduler_config`. The PyTorch
export is written with numpy and safetensors only: torch is not needed here.
"""
import os

import diffusers
import jax
import numpy as np
import safetensors.numpy

from dpg_jax import models
from dpg_jax import weights

EXPORT_FORMATS = ('flax', 'torch', 'both')
DIRS = {'flax': 'export', 'torch': 'export_torch'}

# Per component: (library, weights file stem); variant files insert '.fp16'
# before the extension, as diffusers' `variant='fp16'` looks for.
_TORCH_FILES = {'unet': ('diffusers', 'diffusion_pytorch_model'),
                'vae': ('diffusers', 'diffusion_pytorch_model'),
                'text_encoder': ('transformers', 'model')}
_TORCH_CLASSES = {'unet': 'UNet2DConditionModel', 'vae': 'AutoencoderKL'}
# Flax-only UNet options (run-time attention variants) PyTorch does not take.
_FLAX_ONLY_KEYS = ('use_memory_efficient_attention', 'split_head_dim', 'dtype')


def check_config(config):
  """Raises a one-line ValueError for a bad export_format (before any model load)."""
  if config.export_format not in EXPORT_FORMATS:
    raise ValueError(f'config key export_format={config.export_format!r}: expected one of '
                     f'{EXPORT_FORMATS}.')


def _torch_config(module_config, class_name) -> dict:
  cfg = {k: v for k, v in dict(module_config).items()
         if not k.startswith('_') and k not in _FLAX_ONLY_KEYS}
  return dict(cfg, _class_name=class_name, _diffusers_version=diffusers.__version__)


def save_torch_pipeline(out_dir, sd: models.StableDiffusion, params, *, fp16=False) -> str:
  """Writes (sd, params) in diffusers layout with PyTorch safetensors weights.

  fp32 weights always; with `fp16` also `<stem>.fp16.safetensors` beside them
  (load with `variant='fp16', torch_dtype=torch.float16`). Loadable by
  `models.load_stable_diffusion(out_dir, weights_format='safetensors')`.
  Written to a temporary sibling and renamed into place. Returns `out_dir`.
  """
  def write(tmp):
    for comp, (_, stem) in _TORCH_FILES.items():
      # One component at a time: at most one extra copy of the largest (UNet).
      state = weights.convert_flax_to_pt(jax.device_get(params[comp]),
                                         library=_TORCH_FILES[comp][0])
      folder = os.path.join(tmp, comp)
      os.makedirs(folder)
      # transformers refuses safetensors without format metadata.
      safetensors.numpy.save_file(state, os.path.join(folder, f'{stem}.safetensors'),
                                  metadata={'format': 'pt'})
      if fp16:
        safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in state.items()},
                                    os.path.join(folder, f'{stem}.fp16.safetensors'),
                                    metadata={'format': 'pt'})
      del state
      if comp == 'text_encoder':
        te_cfg = sd.text_encoder.config.to_diff_dict()
        te_cfg.update(architectures=['CLIPTextModel'], dtype='float32')
        models.write_json(os.path.join(folder, 'config.json'), te_cfg)
      else:
        models.write_json(os.path.join(folder, 'config.json'),
                          _torch_config(getattr(sd, comp).config, _TORCH_CLASSES[comp]))
    sd.tokenizer.save_pretrained(os.path.join(tmp, 'tokenizer'))
    os.makedirs(os.path.join(tmp, 'scheduler'))
    models.write_json(os.path.join(tmp, 'scheduler', 'scheduler_config.json'),
                      models.export_scheduler_config(sd.scheduler_config))
    models.write_json(os.path.join(tmp, 'model_index.json'),
                      dict(models.MODEL_INDEX, scheduler=['diffusers', 'DDIMScheduler'],
                           _diffusers_version=diffusers.__version__))

  return models.replace_dir(out_dir, write)


def export_paths(workdir, export_format='both') -> list[str]:
  """Where `export_pipeline` writes, in order."""
  kinds = {'flax': ('flax',), 'torch': ('torch',), 'both': ('flax', 'torch')}[export_format]
  return [os.path.join(workdir, DIRS[k]) for k in kinds]


def export_pipeline(workdir, sd: models.StableDiffusion, params, *, export_format='both',
                    fp16=False) -> list[str]:
  """Writes the exports `export_format` asks for under `workdir`; their paths."""
  if export_format not in EXPORT_FORMATS:
    raise ValueError(f'config key export_format={export_format!r}: expected one of '
                     f'{EXPORT_FORMATS}.')
  out = []
  if export_format in ('flax', 'both'):
    out.append(models.save_pipeline(os.path.join(workdir, DIRS['flax']), sd, params))
  if export_format in ('torch', 'both'):
    out.append(save_torch_pipeline(os.path.join(workdir, DIRS['torch']), sd, params, fp16=fp16))
  return out
