"""The `--mode=sample` driver: images for prompts from a trained run.

Source (`sample.source`, default the --workdir): an exported pipeline directory
(diffusers layout), or a workdir. A workdir samples its newest trained state:
the latest checkpoint (the base model of its config with the checkpoint's
trainable weights) if it was committed after `export/` (or `export_torch/`) was written (a resumed
run that has not reached its end yet), else `export/`. The log and
manifest.json say which was used and its training step.

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

from dpg_jax import adapters
from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import fileio
from dpg_jax import models
from dpg_jax import sampling
from dpg_jax import sharding


def _is_pipeline_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'model_index.json'))


def is_export(path: str) -> bool:
  """A full pipeline, or a Custom Diffusion / LoRA delta (dpg_jax/adapters.py)."""
  return _is_pipeline_dir(path) or adapters.is_delta_dir(path)


def _latest_checkpoint(workdir: str):
  """(checkpoints dir, latest step, its commit time in ns), or None."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(ckpt_dir):
    return None
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  try:
    step = ckpt.latest_step()
    return None if step is None else (ckpt.directory, int(step), ckpt.commit_time_ns(step))
  finally:
    ckpt.close()


def newest_trained(source: str) -> dict:
  """The weights `load_trained` reads: {'weights', 'path', 'step'}.

  weights: 'pipeline' (source is one; step unknown, None), 'export' or
  'checkpoint' (the newer of <source>/export and its latest checkpoint).
  An adapter delta (ours or diffusers' LoRA / Custom Diffusion files) counts as
  a pipeline or export; `load_trained` applies it to its base model.
  """
  if not os.path.isdir(source):
    raise FileNotFoundError(f'config key sample.source / --workdir: {source} does not exist.')
  if is_export(source):
    return {'weights': 'pipeline', 'path': source, 'step': None}
  export = os.path.join(source, 'export')
  if not is_export(export):   # export_format='torch' writes only export_torch/
    export = os.path.join(source, 'export_torch')
  latest = _latest_checkpoint(source)
  if is_export(export):
    marker = 'model_index.json' if _is_pipeline_dir(export) else adapters.marker_file(export)
    exported_ns = os.stat(os.path.join(export, marker)).st_mtime_ns
    if latest is None or latest[2] <= exported_ns:
      # Training exports its final state right after checkpointing it: an
      # export newer than the latest checkpoint holds that checkpoint's step.
      return {'weights': 'export', 'path': export,
              'step': None if latest is None else latest[1]}
  if latest is None:
    raise FileNotFoundError(
        f'{source} holds no exported pipeline (model_index.json or export/) and no '
        'finished checkpoint in checkpoints/: train first or point sample.source at a '
        'pipeline.')
  return {'weights': 'checkpoint', 'path': latest[0], 'step': latest[1]}


def load_trained(source: str, config):
  """(sd, params, info) of the newest trained state of `source` (see newest_trained)."""
  info = newest_trained(source)
  if info['weights'] != 'checkpoint' and adapters.is_delta_dir(info['path']):
    sd, params, _ = adapters.load_delta_dir(info['path'],
                                            lambda base: _load_base(base, config, source))
  elif info['weights'] != 'checkpoint':
    sd, params = models.load_stable_diffusion(info['path'], dtype=config.model.dtype,
                                              attention=config.model.attention)
  else:
    from dpg_jax import train  # pylint: disable=g-import-not-at-top
    sd, params = train.load_model(config, source)
    ckpt = ckpt_lib.Checkpointer(info['path'], async_save=False)
    try:
      trained = ckpt.restore_subtree(info['step'], 'params')
    finally:
      ckpt.close()
    sd, params, peft = adapters.build(config, sd, params)
    params = dict(params, **trained) if peft is None else peft.merge(params, trained)
  logging.info('Sampling the %s %s (training step %s)', info['weights'], info['path'],
               _step_text(info['step']))
  return sd, params, info


def _load_base(base, config, source):
  """The base model of a delta: its adapter_config.json's, else the config's."""
  if base is None:
    from dpg_jax import train  # pylint: disable=g-import-not-at-top
    return train.load_model(config, source)
  return models.load_stable_diffusion(
      base['pretrained'], revision=base.get('revision', ''),
      weights_format=base.get('weights_format', 'auto'), dtype=config.model.dtype,
      attention=config.model.attention)


def _step_text(step) -> str:
  return 'unknown' if step is None else str(step)


def _slug(text: str) -> str:
  return re.sub(r'[^a-zA-Z0-9]+', '_', text).strip('_')[:60]


def sample_and_save(config, workdir: str) -> str:
  s = config.sample
  source = s.source or workdir
  if str(source).startswith('file://'):  # the model loaders open local files
    source = str(fileio.path(source))
  # Through the path layer: a gs:// or file:// output dir (or workdir) works as a local one.
  out_dir = fileio.normalize(s.output_dir or fileio.join(workdir, 'samples', 'generated'))
  sd, params, info = load_trained(source, config)
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
  fileio.makedirs(out_dir)
  manifest = []
  for i, (img, prompt, seed) in enumerate(zip(images, all_prompts, seeds)):
    pi = i // s.num_images_per_prompt
    name = f'{pi:03d}_{_slug(prompt)}_{seed}.png'
    sampling.save_images(img[None], out_dir, names=[name])
    manifest.append({'prompt': prompt, 'seed': seed, 'file': name})
  for pi, prompt in enumerate(prompts):
    chunk = images[pi * s.num_images_per_prompt:(pi + 1) * s.num_images_per_prompt]
    sampling.save_grid(chunk, fileio.join(out_dir, f'grid_{pi:03d}_{_slug(prompt)}.png'))
  fileio.atomic_write_text(fileio.join(out_dir, 'manifest.json'), json.dumps(
      {'source': source, 'weights': info['weights'], 'weights_path': info['path'],
       'train_step': info['step'], 'scheduler': s.scheduler, 'steps': s.num_inference_steps,
       'guidance_scale': s.guidance_scale, 'images': manifest}, indent=1))
  logging.info('Wrote %d images of training step %s to %s', len(images),
               _step_text(info['step']), out_dir)
  return out_dir
