"""What every command-line entry point (main, evaluate, bench) shares.

`run(main)` replaces `absl.app.run(main)`. A user error prints one line (and at
most one hint) to stderr and exits with status 2: a bad or missing flag, a
config file that is not there, an unknown or badly typed config key, any
OSError (a missing file, a folder that cannot be written, a full disk), and
the messages dpg_jax raises about its input (a `raise ValueError(...)`,
`KeyError`, `RuntimeError` or `FloatingPointError` statement in dpg_jax/).
Anything else is a bug and keeps its traceback (status 1), as does every
error under DPG_JAX_TRACEBACK=1.
"""
import difflib
import dis
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections.config_flags import config_flags as _config_flags
import tqdm

USER_ERROR = 2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The types dpg_jax raises with a message for the user (FloatingPointError: a
# run that diverged). Raised by anything else, or by an operation in dpg_jax
# rather than a `raise` statement, they are bugs.
_MESSAGE_TYPES = (ValueError, KeyError, RuntimeError, FloatingPointError)
_HELP_FLAGS = ('help', 'helpshort', 'helpfull', 'helpxml', '?')
# ml_collections' stand-in for a config file that failed to load: it raises
# on first use, far from the flag.
_ERROR_CONFIG = getattr(_config_flags, '_ErrorConfig', ())


def config_repo_on_path(argv=None) -> None:
  """Config files do `from configs import default`: make the repo holding the
  config file importable whatever the current directory is (called at import
  time, before absl parses --config)."""
  for arg in sys.argv if argv is None else argv:
    if arg.startswith('--config='):
      cfg = os.path.abspath(arg.split('=', 1)[1].split(':', 1)[0])
      sys.path.insert(0, os.path.dirname(os.path.dirname(cfg)))


# --------------------------------------------------------------------------- #
# Console
# --------------------------------------------------------------------------- #
class _QuietLibraries(logging.logging.Filter):
  """Libraries speak at WARNING and above; INFO is ours (Orbax, TFDS and JAX
  log dozens of INFO lines per run: backends probed, every checkpoint file)."""
  # Library advice that does not apply here (TFDS: PIL decodes our few photos).
  ADVICE = ('OpenCV is not installed.',)

  def filter(self, record):
    if os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep):
      return True
    return (record.levelno >= logging.logging.WARNING
            and not record.getMessage().startswith(self.ADVICE))


def _above_progress_bars(handler) -> None:
  """Log lines go above tqdm's bar instead of being glued to its end."""
  # absl's handler hands each record to the PythonHandler it wraps.
  handler = getattr(handler, 'python_handler', handler)
  if getattr(handler, '_dpg_jax_bar_safe', False):
    return
  emit = handler.emit

  def bar_safe_emit(record):
    with tqdm.tqdm.external_write_mode(file=sys.stderr):
      emit(record)

  handler.emit = bar_safe_emit
  handler._dpg_jax_bar_safe = True  # pylint: disable=protected-access


def quiet_logging() -> None:
  """The console of a run: our INFO, every library warning except the pinned
  libraries' known deprecation notices. Idempotent."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  _above_progress_bars(handler)
  # Keep TF (if some dependency imports it) quiet and off the accelerator.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  models.quiet_diffusers()


# --------------------------------------------------------------------------- #
# User errors
# --------------------------------------------------------------------------- #
def _raised_by_dpg_jax(exc: BaseException) -> bool:
  """Whether `exc` comes from a `raise` statement in dpg_jax/ (a message we
  wrote), not from an operation there that failed (`d[k]` raises KeyError too)."""
  tb = exc.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  code = tb.tb_frame.f_code
  if not os.path.abspath(code.co_filename).startswith(_PACKAGE_DIR + os.sep):
    return False
  return any(i.offset == tb.tb_lasti and i.opname == 'RAISE_VARARGS'
             for i in dis.get_instructions(code))


def is_user_error(exc: BaseException) -> bool:
  if isinstance(exc, (app.UsageError, flags.Error, OSError)):
    return True
  return isinstance(exc, _MESSAGE_TYPES) and _raised_by_dpg_jax(exc)


def error_message(exc: BaseException) -> str:
  if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
    return exc.args[0]  # str() of a KeyError quotes it
  if isinstance(exc, OSError) and exc.strerror and exc.filename and len(str(exc)) < 200:
    # An OS error ("[Errno 28] No space left on device: 'x'"): name the file first.
    names = repr(exc.filename) + (f' -> {exc.filename2!r}' if exc.filename2 else '')
    return f'{names}: {exc.strerror}'
  return str(exc) or type(exc).__name__


def _prog() -> str:
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  return spec.name if spec is not None else os.path.basename(sys.argv[0])


def _exit(prog: str, message: str, hint: str | None = None):
  """Writes `prog: error: message` (and the hint) to stderr; exits with USER_ERROR."""
  logging.flush()
  lines = message.strip().splitlines() or ['']
  out = [f'{prog}: error: {lines[0]}'] + ['  ' + line for line in lines[1:]]
  if hint:
    out.append(hint)
  sys.stderr.write('\n'.join(out) + '\n')
  sys.exit(USER_ERROR)


# --------------------------------------------------------------------------- #
# Flags and config overrides
# --------------------------------------------------------------------------- #
def flat_keys(config, prefix: str = '') -> list[str]:
  """Every key of a ConfigDict, dotted ('data', 'data.resolution', ...)."""
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, (config_dict.ConfigDict, dict)):
      keys += flat_keys(v, prefix + k + '.')
  return keys


def unknown_key_message(key: str, known: list[str]) -> str:
  """'unknown config key data.foo (...)' with the likeliest intended key."""
  parent, _, leaf = key.rpartition('.')
  prefix = parent + '.' if parent else ''
  children = [k[len(prefix):] for k in known
              if k.startswith(prefix) and '.' not in k[len(prefix):]]
  close = difflib.get_close_matches(leaf, children, n=1, cutoff=0.6)
  if close:  # a typo of a sibling
    return f'unknown config key {key} (did you mean {prefix}{close[0]}?)'
  # The name in another section ('resolution' for 'data.resolution').
  by_leaf = {}
  for k in known:
    by_leaf.setdefault(k.rpartition('.')[2], k)
  close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.8)
  if close:
    return f'unknown config key {key} (did you mean {by_leaf[close[0]]}?)'
  if parent in known:
    return f'unknown config key {key} ({parent} has {", ".join(children)})'
  return f'unknown config key {key}'


def _args(argv):
  """Command-line arguments before a `--` (absl stops parsing there)."""
  args = argv[1:]
  return args[:args.index('--')] if '--' in args else args


def _flag_value(name: str, argv) -> str | None:
  args = _args(argv)
  for i, arg in enumerate(args):
    m = re.fullmatch(rf'--?{re.escape(name)}(?:=(.*))?', arg, flags=re.S)
    if m:
      if m.group(1) is not None:
        return m.group(1)
      return args[i + 1] if i + 1 < len(args) else None
  return None


def _override_keys(name: str, argv) -> list[str]:
  """The KEY of each --config.KEY[=VALUE] (and --noconfig.KEY) in argv."""
  keys = []
  for arg in _args(argv):
    m = re.match(rf'--?(?:no)?{re.escape(name)}\.([^=]+)', arg)
    if m:
      keys.append(m.group(1))
  return keys


def _config_file_error(name: str, argv, keys_doc: str):
  """(message, hint) for a --config that cannot be loaded or an override that
  names no config key; None if neither is the problem."""
  value = _flag_value(name, argv)
  if not value or name not in flags.FLAGS:
    return None
  path = value.split(':', 1)[0]
  if not os.path.isfile(path):
    return (f'--{name}={value}: no such file',
            f'Paths are relative to the current directory ({os.getcwd()}); '
            'e.g. --config=configs/tiny.py from the repository root.')
  try:
    config = flags.FLAGS[name].parser.parse(value)
  except Exception:  # pylint: disable=broad-except
    return None  # the file itself is broken: its own traceback says more
  if isinstance(config, _ERROR_CONFIG):
    err = config._error  # pylint: disable=protected-access
    return f'--{name}={value}: cannot load it: {error_message(err)}', None
  known = flat_keys(config)
  for key in _override_keys(name, argv):
    if key not in known:
      return unknown_key_message(key, known), f'The config keys are documented in {keys_doc}.'
  return None


def _flag_error_message(err: flags.Error, name: str) -> str:
  msg = str(err)
  m = re.fullmatch(r'flag --(\S+)=None: Flag --\1 must have a value other than None\.', msg)
  if m:
    return f'missing required flag --{m.group(1)}'
  # 'flag --config.num_steps=abc: invalid literal ...' -> the project's wording.
  return re.sub(rf'^flag --{re.escape(name)}\.', 'config key ', msg)


def _parse_flags(argv, *, prog: str, name: str, keys_doc: str):
  flag_hint = f'Run `python -m {prog} --help` for the flags; config keys: {keys_doc}.'
  try:
    rest = flags.FLAGS(argv)
  except SystemExit as e:
    # absl prints the help and exits 1; asking for help is no error.
    if e.code == 1 and any(a.lstrip('-') in _HELP_FLAGS for a in _args(argv)):
      sys.exit(0)
    raise
  except flags.Error as e:
    problem = _config_file_error(name, argv, keys_doc)
    if problem is not None:
      _exit(prog, *problem)
    _exit(prog, _flag_error_message(e, name), flag_hint)
  except (KeyError, AttributeError, OSError):
    # ml_collections raises these from deep inside flag parsing for an
    # override of a key the (locked) config lacks, or a config it could not load.
    problem = _config_file_error(name, argv, keys_doc)
    if problem is None:
      raise
    _exit(prog, *problem)
  if name in flags.FLAGS and isinstance(flags.FLAGS[name].value, _ERROR_CONFIG):
    problem = _config_file_error(name, argv, keys_doc)
    _exit(prog, *(problem or (f'--{name}: cannot load the config file', None)))
  if len(rest) > 1:
    _exit(prog, f'unexpected arguments {rest[1:]} (flags are --name=value)', flag_hint)
  return rest


def config_source(name: str = 'config') -> str:
  """'configs/tiny.py --config.num_steps=20': the config file and the overrides."""
  flag = flags.FLAGS[name]
  overrides = ' '.join(f'--{name}.{k}={v!r}' for k, v in flag.override_values.items())
  return f'{flag.config_filename} {overrides}'.strip()


def run(main, *, keys_doc: str = 'configs/default.py', config_flag: str = 'config') -> None:
  """`absl.app.run(main)`, with user errors as one line (see the module doc)."""
  prog = _prog()

  def guarded_main(argv):
    quiet_logging()
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if os.environ.get('DPG_JAX_TRACEBACK') or not is_user_error(e):
        raise
      _exit(prog, error_message(e))

  app.run(guarded_main,
          flags_parser=lambda argv: _parse_flags(argv, prog=prog, name=config_flag,
                                                 keys_doc=keys_doc))
