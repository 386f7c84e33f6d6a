"""Entry point: flags -> config -> library.

  python -m dpg_jax.main --config=configs/tiny.py --workdir=/tmp/dpg_tiny
  python -m dpg_jax.main --config=configs/dreambooth.py --workdir=runs/dog \\
      --config.data.instance_dir=photos/dog --config.learning_rate=2e-6
  python -m dpg_jax.main --mode=sample --config=configs/tiny.py --workdir=/tmp/dpg_tiny \\
      --config.sample.prompts="('a sks toy in the snow',)"
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Config files do `from configs import default`: make the repo holding the
# config file importable whatever the current directory is.
for _arg in sys.argv:
  if _arg.startswith('--config='):
    _cfg = os.path.abspath(_arg.split('=', 1)[1].split(':', 1)[0])
    sys.path.insert(0, os.path.dirname(os.path.dirname(_cfg)))

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, samples, export.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'sample'], 'What to run.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(logging.logging.Filter):
  """Drop INFO chatter of Orbax/TFDS (dozens of lines per checkpoint)."""

  def filter(self, record):
    noisy = ('/orbax/' in record.pathname or '/tensorflow_datasets/' in record.pathname)
    return record.levelno >= logging.logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Keep TF (if some dependency imports it) off the accelerator.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
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
