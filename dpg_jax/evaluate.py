"""Entry point of the DreamBench evaluation (dpg_jax/evaluation.py).

  python -m dpg_jax.evaluate --config=configs/eval_tiny.py --workdir=/tmp/dpg_eval_tiny
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py --workdir=runs/eval \\
      --config.dataset_dir=/data/dreambooth/dataset
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py:dreambooth \\
      --workdir=runs/eval_db --config.dataset_dir=/data/dreambooth/dataset

The config's sampling protocols (the DPG authors' is the default, the
DreamBooth paper's is ':dreambooth') are described in configs/eval_dreambench.py.

Rerun the same command after a kill: finished (subject, method, prompt) units
are kept and the evaluation continues with the next one.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dpg_jax import cli

cli.config_repo_on_path()

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for runs, images, ledger, results.')
config_flags.DEFINE_config_file('config', None, 'Config file (configs/eval_*.py).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.quiet_logging()
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
