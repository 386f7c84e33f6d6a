"""Entry point: flags -> config -> library.

  python -m dpg_jax.main --config=configs/tiny.py --workdir=/tmp/dpg_tiny
  python -m dpg_jax.main --config=configs/dreambooth.py --workdir=runs/dog \\
      --config.data.instance_dir=photos/dog --config.learning_rate=2e-6
  python -m dpg_jax.main --mode=sample --config=configs/tiny.py --workdir=/tmp/dpg_tiny \\
      --config.sample.prompts="('a sks toy in the snow',)"
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dpg_jax import cli

cli.config_repo_on_path()

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, samples, export.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to run.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_logging()
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  sharding.setup_runtime(config)
  logging.info('mode=%s workdir=%s\n%s', _MODE.value, _WORKDIR.value, config)
  if _MODE.value == 'train':
    from dpg_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, _WORKDIR.value)
  else:
    from dpg_jax import sample  # pylint: disable=g-import-not-at-top
    sample.sample_and_save(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
