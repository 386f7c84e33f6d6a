"""Train (DreamBooth or DPG) or sample: flags -> config -> library.

  python -m dpg_jax.main --config=configs/tiny.py --workdir=/tmp/dpg_tiny
  python -m dpg_jax.main --config=configs/dreambooth.py --workdir=runs/dog \\
      --config.data.instance_dir=photos/dog --config.learning_rate=2e-6
  python -m dpg_jax.main --mode=sample --config=configs/tiny.py --workdir=/tmp/dpg_tiny \\
      --config.sample.prompts="('a sks toy in the snow',)"

Every config key, with its default and meaning, is in configs/default.py;
override any with --config.KEY=VALUE. The resolved config of a training run is
written to <workdir>/config.json. A bad flag, key, value or path stops with one
line on stderr and exit status 2.
"""
import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from dpg_jax import cli
from dpg_jax import fileio

cli.config_repo_on_path()

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, samples, export.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to run.')
config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py). Override any key with --config.KEY=VALUE; '
    'the keys, their defaults and meaning: configs/default.py.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def summary(config, mode: str, workdir: str) -> str:
  """One line: what this run is (the full config goes to <workdir>/config.json)."""
  workdir = fileio.normalize(workdir)
  head = f'{mode} {cli.config_source()} -> {workdir}'
  if mode == 'sample':
    s = config.sample
    return (f'{head}: {len(s.prompts)} prompts x {s.num_images_per_prompt} images, '
            f'{s.scheduler} {s.num_inference_steps} steps, guidance {s.guidance_scale}, '
            f'from {s.source or workdir}')
  method = f'DPG ({config.dpg.rewards})' if config.dpg.enabled else 'DreamBooth'
  model = f'tiny random SD {config.model.tiny!r}' if config.model.tiny else config.model.pretrained
  return (f'{head}: {method}, {config.num_steps} steps of batch {config.batch_size}, '
          f'{model} ({config.model.dtype}); resolved config in '
          f'{fileio.join(workdir, "config.json")}')


def main(argv):
  del argv  # cli.run rejects positional arguments
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  sharding.setup_runtime(config)
  if _MODE.value == 'train':
    from dpg_jax import train  # pylint: disable=g-import-not-at-top
    train.validate_config(config)  # a bad value stops before the summary claims a run
    logging.info('%s', summary(config, _MODE.value, _WORKDIR.value))
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    from dpg_jax import sample  # pylint: disable=g-import-not-at-top
    logging.info('%s', summary(config, _MODE.value, _WORKDIR.value))
    sample.sample_and_save(config, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
