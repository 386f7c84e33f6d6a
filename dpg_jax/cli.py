"""What every command-line entry point (main, evaluate, bench) shares."""
import os
import sys

from absl import logging


def config_repo_on_path(argv=None) -> None:
  """Config files do `from configs import default`: make the repo holding the
  config file importable whatever the current directory is (called at import
  time, before absl parses --config)."""
  for arg in sys.argv if argv is None else argv:
    if arg.startswith('--config='):
      cfg = os.path.abspath(arg.split('=', 1)[1].split(':', 1)[0])
      sys.path.insert(0, os.path.dirname(os.path.dirname(cfg)))


class _QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of Orbax/TFDS (dozens of lines per checkpoint)."""

  def filter(self, record):
    noisy = '/orbax/' in record.pathname or '/tensorflow_datasets/' in record.pathname
    return record.levelno >= logging.logging.WARNING or not noisy


def quiet_logging() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Keep TF (if some dependency imports it) quiet and off the accelerator.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
