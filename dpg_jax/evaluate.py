"""Entry point of the DreamBench evaluation (dpg_jax/evaluation.py).

  python -m dpg_jax.evaluate --config=configs/eval_tiny.py --workdir=/tmp/dpg_eval_tiny
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py --workdir=runs/eval \\
      --config.dataset_dir=/data/dreambooth/dataset --config.images_per_prompt=8

Rerun the same command after a kill: finished (subject, method, prompt) units
are kept and the evaluation continues with the next one.
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

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for runs, images, ledger, results.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/eval_*.py).',
                                lock_config=True)
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
  from dpg_jax import evaluation  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  if config.workdir_compilation_cache and not config.compilation_cache_dir:
    config.compilation_cache_dir = os.path.join(os.path.abspath(_WORKDIR.value), 'xla_cache')
  sharding.setup_runtime(config)
  logging.info('workdir=%s\n%s', _WORKDIR.value, config)
  evaluation.run(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
