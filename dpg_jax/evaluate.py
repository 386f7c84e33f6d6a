"""Entry point of the DreamBench evaluation (dpg_jax/evaluation/).

  python -m dpg_jax.evaluate --config=configs/eval_tiny.py --workdir=/tmp/dpg_eval_tiny
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py --workdir=runs/eval \\
      --config.dataset_dir=/data/dreambooth/dataset
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py:dreambooth \\
      --workdir=runs/eval_db --config.dataset_dir=/data/dreambooth/dataset

The config's sampling protocols (the DPG authors' is the default, the
DreamBooth paper's is ':dreambooth') are described in configs/eval_dreambench.py.

Rerun the same command after a kill: finished (subject, method, prompt) units
are kept and the evaluation continues with the next one. The keys of an
evaluation config are in configs/eval_dreambench.py (`train.*` overrides every
method's training config, whose keys are in configs/default.py); each method's
resolved training config is written to <workdir>/runs/<method>/<subject>/config.json.
"""
import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from dpg_jax import cli

cli.config_repo_on_path()

_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for runs, images, ledger, results.')
config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/eval_*.py). Override any key with --config.KEY=VALUE; '
    'the keys: configs/eval_dreambench.py.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # cli.run rejects positional arguments
  from dpg_jax import evaluation  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  workdir = train.check_workdir(_WORKDIR.value)  # '--workdir ... is not writable'
  if config.workdir_compilation_cache and not config.compilation_cache_dir:
    config.compilation_cache_dir = os.path.join(workdir, 'xla_cache')
  sharding.setup_runtime(config)
  evaluation.validate_config(config)  # a bad value stops before the summary claims a run
  logging.info('evaluate %s -> %s: methods %s, %d images per prompt',
               cli.config_source(), workdir, ', '.join(config.methods), config.images_per_prompt)
  logging.debug('resolved config:\n%s', config)  # shown with --verbosity=1
  evaluation.run(config, workdir)


if __name__ == '__main__':
  cli.run(main, keys_doc='configs/eval_dreambench.py')
