"""The `--mode=sample` driver: images for prompts from a trained run.

Source (`sample.source`, default the --workdir): an exported pipeline directory
(diffusers layout), or a workdir — its `export/` (or `export_torch/`) if present,
else the base model of its config with the trainable weights of its latest
checkpoint.

  python -m dpg_jax.main --mode=sample --config=configs/tiny.py --workdir=/tmp/dpg_tiny \\
      --config.sample.prompts="('a sks toy on the moon',)" --config.sample.scheduler=dpm_solver

Writes <output_dir>/<prompt index>_<seed>.png, a grid per prompt and
manifest.json (prompt, seed, file) so evaluations can find them.
"""
import json
import os
import re

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from dpg_jax import models
from dpg_jax import sampling
from dpg_jax import sharding


def _is_pipeline_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'model_index.json'))


def load_trained(source: str, config):
  """(sd, params) of a pipeline dir or a training workdir."""
  if not os.path.isdir(source):
    raise FileNotFoundError(f'config key sample.source / --workdir: {source} does not exist.')
  if _is_pipeline_dir(source):
    path = source
  elif _is_pipeline_dir(os.path.join(source, 'export')):
    path = os.path.join(source, 'export')
  elif _is_pipeline_dir(os.path.join(source, 'export_torch')):  # export_format='torch'
    path = os.path.join(source, 'export_torch')
  else:
    path = None
  if path is not None:
    return models.load_stable_diffusion(path, dtype=config.model.dtype,
                                        attention=config.model.attention)
  ckpt_dir = os.path.join(source, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(
        f'{source} holds no exported pipeline (model_index.json or export/) and no '
        'checkpoints/ directory: train first or point sample.source at a pipeline.')
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  sd, params = train.load_model(config, source)
  mgr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
  step = mgr.latest_step()
  if step is None:
    raise FileNotFoundError(f'{ckpt_dir} has no finished checkpoint.')
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  trained = restored.state['params']
  params = dict(params)
  params.update({k: jax.tree.map(np.asarray, v) for k, v in trained.items()})
  logging.info('Loaded trainable weights of step %d from %s', step, ckpt_dir)
  return sd, params


def _slug(text: str) -> str:
  return re.sub(r'[^a-zA-Z0-9]+', '_', text).strip('_')[:60]


def sample_and_save(config, workdir: str) -> str:
  s = config.sample
  source = s.source or workdir
  out_dir = s.output_dir or os.path.join(workdir, 'samples', 'generated')
  sd, params = load_trained(source, config)
  mesh = sharding.make_mesh(config.mesh.data)
  sampler = sampling.Sampler(sd, resolution=config.data.resolution, scheduler=s.scheduler,
                             num_inference_steps=s.num_inference_steps,
                             guidance_scale=s.guidance_scale, batch_size=s.batch_size, mesh=mesh)
  fmt = lambda p: p.format(identifier=config.data.identifier, class_noun=config.data.class_noun)
  prompts = [fmt(p) for p in s.prompts]
  all_prompts = [p for p in prompts for _ in range(s.num_images_per_prompt)]
  seeds = [s.seed + i for i in range(s.num_images_per_prompt)] * len(prompts)
  images = sampler(params, all_prompts, seeds, s.negative_prompt)
  if jax.process_index() != 0:
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  manifest = []
  for i, (img, prompt, seed) in enumerate(zip(images, all_prompts, seeds)):
    pi = i // s.num_images_per_prompt
    name = f'{pi:03d}_{_slug(prompt)}_{seed}.png'
    sampling.save_images(img[None], out_dir, names=[name])
    manifest.append({'prompt': prompt, 'seed': seed, 'file': name})
  for pi, prompt in enumerate(prompts):
    chunk = images[pi * s.num_images_per_prompt:(pi + 1) * s.num_images_per_prompt]
    sampling.save_grid(chunk, os.path.join(out_dir, f'grid_{pi:03d}_{_slug(prompt)}.png'))
  with open(os.path.join(out_dir, 'manifest.json'), 'w') as f:
    json.dump({'source': source, 'scheduler': s.scheduler, 'steps': s.num_inference_steps,
               'guidance_scale': s.guidance_scale, 'images': manifest}, f, indent=1)
  logging.info('Wrote %d images to %s', len(images), out_dir)
  return out_dir
