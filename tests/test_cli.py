"""The command line: user errors as one line, --help, the console, warnings."""
import io
import logging
import os
import re
import subprocess
import sys
import textwrap
import warnings

from absl import logging as absl_logging
import pytest
import tqdm

from configs import default as default_config
from dpg_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS='cpu')
ENV.pop('DPG_JAX_TRACEBACK', None)
# An absl log line: 'I1201 10:00:37.447567 140371073911680 train.py:427] ...'.
LOG_LINE = re.compile(r'[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')


def _run(module, *args, cwd=REPO):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env=ENV)


def _user_error(module, *args):
  """The error line of a run that must stop on a user error; checks the rest of stderr."""
  out = _run(module, *args)
  lines = out.stderr.splitlines()
  assert out.returncode == cli.USER_ERROR, out.stderr
  assert 'Traceback' not in out.stderr
  assert 'adam_b1' not in out.stderr  # no config dump
  errors = [l for l in lines if l.startswith(f'{module}: error: ')]
  assert len(errors) == 1, out.stderr
  rest = [l for l in lines if l not in errors and not LOG_LINE.match(l)]
  assert len(rest) <= 1, out.stderr  # at most one hint
  return errors[0][len(f'{module}: error: '):]


def _tiny(tmp_path, *args):
  return ('--config=configs/tiny.py', f'--workdir={tmp_path / "w"}') + args


# --------------------------------------------------------------------------- #
# Errors found while parsing flags (no JAX backend, no model)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize('module,args,expected', [
    ('dpg_jax.main', ['--config.data.resolutin=64'],
     'unknown config key data.resolutin (did you mean data.resolution?)'),
    ('dpg_jax.main', ['--config.learning_rat=1e-4'],
     'unknown config key learning_rat (did you mean learning_rate?)'),
    ('dpg_jax.main', ['--config.num_steps=abc'],
     "config key num_steps=abc: invalid literal for int() with base 10: 'abc'"),
    ('dpg_jax.bench', ['--config.dpg.critc.arch=fully_conv'],
     'unknown config key dpg.critc.arch (did you mean dpg.critic.arch?)'),
], ids=['typo_in_section', 'typo_top_level', 'bad_type', 'bench_wrong_section'])
def test_bad_override(module, args, expected, tmp_path):
  base = _tiny(tmp_path) if module == 'dpg_jax.main' else ('--config=configs/tiny.py',)
  assert _user_error(module, *base, *args) == expected
  assert not os.path.exists(tmp_path / 'w')


def test_evaluate_unknown_key(tmp_path):
  msg = _user_error('dpg_jax.evaluate', '--config=configs/eval_tiny.py',
                    f'--workdir={tmp_path}', '--config.train.num_step=3')
  assert msg == 'unknown config key train.num_step (did you mean train.num_steps?)'


def test_missing_config_file_and_flag(tmp_path):
  msg = _user_error('dpg_jax.main', '--config=configs/nope.py', f'--workdir={tmp_path}')
  assert msg == '--config=configs/nope.py: no such file'
  assert _user_error('dpg_jax.main', '--config=configs/tiny.py') == \
      'missing required flag --workdir'


# --------------------------------------------------------------------------- #
# Errors the library raises about the input, before any model load
# --------------------------------------------------------------------------- #
def test_bad_value(tmp_path):
  msg = _user_error('dpg_jax.main', *_tiny(tmp_path, '--config.data.resolution=60'))
  assert msg.startswith('config key data.resolution=60: expected a multiple of 8')


@pytest.mark.parametrize('make', ['missing', 'empty'])
def test_bad_instance_folder(make, tmp_path):
  folder = tmp_path / 'photos'
  if make == 'empty':
    folder.mkdir()
  msg = _user_error('dpg_jax.main', *_tiny(tmp_path, '--config.data.synthetic=False',
                                           f'--config.data.instance_dir={folder}'))
  assert msg.startswith(f"data.instance_dir='{folder}': ")
  assert ('folder does not exist' if make == 'missing' else 'no images found') in msg


def test_missing_weights(tmp_path):
  msg = _user_error('dpg_jax.main', *_tiny(tmp_path, '--config.model.tiny=',
                                           f'--config.model.pretrained={tmp_path / "sd"}'))
  assert msg.startswith(f"model.pretrained='{tmp_path / 'sd'}': {tmp_path / 'sd'} does not exist")


def test_unwritable_workdir(tmp_path):
  (tmp_path / 'file').write_text('x')
  msg = _user_error('dpg_jax.evaluate', '--config=configs/eval_tiny.py',
                    f'--workdir={tmp_path / "file" / "sub"}')
  assert msg.startswith(f'--workdir {tmp_path / "file" / "sub"} is not writable')


# --------------------------------------------------------------------------- #
# What is not a user error keeps its traceback
# --------------------------------------------------------------------------- #
def test_a_bug_keeps_its_traceback(tmp_path):
  script = tmp_path / 'buggy.py'
  script.write_text(textwrap.dedent('''
      from dpg_jax import cli

      def main(argv):
        return {}['missing']  # a bug, not a message

      cli.run(main)
  '''))
  out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=dict(ENV, PYTHONPATH=REPO))
  assert out.returncode == 1
  assert 'Traceback' in out.stderr and "KeyError: 'missing'" in out.stderr


def _compiled_in_package(src: str) -> dict:
  """Functions whose code lives (by filename) in dpg_jax/, as if written there."""
  scope = {'__name__': 'dpg_jax.fake'}
  exec(compile(textwrap.dedent(src), os.path.join(cli._PACKAGE_DIR, 'fake.py'), 'exec'), scope)  # pylint: disable=exec-used,protected-access
  return scope


def _raised(fn, *args):
  try:
    fn(*args)
  except Exception as e:  # pylint: disable=broad-except
    return e
  raise AssertionError('did not raise')


def test_which_errors_are_the_users():
  fns = _compiled_in_package('''
      def message(key):
        raise KeyError(f'config key {key}: the training config has no field')

      def lookup(d):
        return d['absent']

      def divide(x):
        return 1 / x
  ''')
  e = _raised(fns['message'], 'train.foo')
  assert cli.is_user_error(e)
  assert cli.error_message(e) == 'config key train.foo: the training config has no field'
  assert not cli.is_user_error(_raised(fns['lookup'], {}))   # an operation failed: a bug
  assert not cli.is_user_error(_raised(fns['divide'], 0))
  assert not cli.is_user_error(_raised(lambda: int('x')))     # raised outside dpg_jax
  e = _raised(open, '/nonexistent/file')
  assert cli.is_user_error(e)
  assert cli.error_message(e) == "'/nonexistent/file': No such file or directory"


def test_unknown_key_suggestions():
  known = cli.flat_keys(default_config.get_config())
  msg = lambda key: cli.unknown_key_message(key, known)
  assert msg('resolution') == 'unknown config key resolution (did you mean data.resolution?)'
  assert msg('sample.prompt') == 'unknown config key sample.prompt (did you mean sample.prompts?)'
  # Nothing close: the section's keys, not the section itself.
  assert msg('mesh.foo') == ('unknown config key mesh.foo (mesh has data, fsdp, param_sharding, '
                             'rules)')
  assert msg('nosuch.bar') == 'unknown config key nosuch.bar'


# --------------------------------------------------------------------------- #
# --help
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize('module,flags_shown,keys_doc', [
    ('dpg_jax.main', ['--config', '--workdir', '--mode'], 'configs/default.py'),
    ('dpg_jax.evaluate', ['--config', '--workdir'], 'configs/eval_dreambench.py'),
    ('dpg_jax.bench', ['--config', '--shapes', '--steps', '--variants'], 'configs/default.py'),
])
def test_help(module, flags_shown, keys_doc):
  out = _run(module, '--help')
  assert out.returncode == 0, out.stderr
  for flag in flags_shown:
    assert f'  {flag}:' in out.stdout
  assert keys_doc in out.stdout


# --------------------------------------------------------------------------- #
# Console and warnings
# --------------------------------------------------------------------------- #
def _record(level, pathname, msg='m'):
  return logging.LogRecord('absl', level, pathname, 1, msg, None, None)


def test_library_info_is_dropped_ours_and_warnings_kept():
  f = cli._QuietLibraries()  # pylint: disable=protected-access
  lib = '/venv/lib/python3.11/site-packages/orbax/checkpoint/x.py'
  assert not f.filter(_record(logging.INFO, lib))
  assert f.filter(_record(logging.WARNING, lib))
  tfds = '/venv/lib/python3.11/site-packages/tensorflow_datasets/core/features/image_feature.py'
  assert not f.filter(_record(logging.WARNING, tfds, 'OpenCV is not installed. We recommend ...'))
  assert f.filter(_record(logging.INFO, os.path.join(cli._PACKAGE_DIR, 'train.py')))  # pylint: disable=protected-access


def test_log_lines_go_above_the_progress_bar(monkeypatch):
  buf = io.StringIO()
  monkeypatch.setattr(sys, 'stderr', buf)
  handler = absl_logging.ABSLHandler(absl_logging.PythonFormatter())  # as absl installs it
  handler.python_handler.stream = buf
  cli._above_progress_bars(handler)  # pylint: disable=protected-access
  bar = tqdm.tqdm(total=2, file=sys.stderr, ascii=True, ncols=40)
  handler.handle(_record(logging.INFO, __file__, 'hello'))
  bar.close()
  text = buf.getvalue()
  assert text.index('0/2') < text.index('] hello\n')
  # The bar was cleared ('\r') before the line, not appended to ('... ?it/s]I1201 ...').
  assert not re.search(r'it/s\][^\r\n]', text), repr(text)


def test_pinned_libraries_deprecation_notices_are_dropped_others_kept():
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  models.quiet_diffusers()
  notices = {
      'diffusers': 'Flax classes are deprecated and will be removed in Diffusers v0.40.0. We '
                   'recommend migrating to PyTorch classes or pinning your version of Diffusers.',
      'transformers': 'TensorFlow and JAX classes are deprecated and will be removed in '
                      'Transformers v5. We recommend migrating to PyTorch classes or pinning '
                      'your version of Transformers.',
  }
  for library, notice in notices.items():
    # The library's own stream handler (other tests may have added more).
    handlers = [h for h in logging.getLogger(library).handlers
                if isinstance(h, logging.StreamHandler)]
    assert handlers
    bufs = [io.StringIO() for _ in handlers]
    olds = [h.setStream(b) for h, b in zip(handlers, bufs)]
    try:
      logger = logging.getLogger(f'{library}.models.some_flax_module')
      logger.warning(notice)
      logger.warning('a real warning')
    finally:
      for h, old in zip(handlers, olds):
        h.setStream(old)
    assert bufs[0].getvalue() == 'a real warning\n'


def _warn_from(module_name: str):
  code = compile("import warnings\nwarnings.warn('old API', DeprecationWarning)",
                 f'/somewhere/{module_name.replace(".", "/")}.py', 'exec')
  exec(code, {'__name__': module_name})  # pylint: disable=exec-used


def test_our_deprecations_surface_pinned_libraries_are_hidden():
  """Under setup.cfg's filterwarnings (pytest applies them to every test)."""
  with warnings.catch_warnings(record=True) as caught:
    _warn_from('dpg_jax.train')
    _warn_from('tests.test_cli')
    _warn_from('diffusers.models.embeddings_flax')
    _warn_from('transformers.modeling_flax_utils')
  assert [str(w.message) for w in caught] == ['old API', 'old API']


def test_imports_without_dropped_dependencies():
  """Every library module imports without grain and importlib_resources."""
  code = textwrap.dedent('''
      import importlib, pkgutil, sys

      class Block:
        def find_spec(self, name, path=None, target=None):
          if name.split('.')[0] in ('grain', 'importlib_resources'):
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)

      sys.meta_path.insert(0, Block())
      import dpg_jax
      entry_points = {'dpg_jax.main', 'dpg_jax.evaluate', 'dpg_jax.bench'}  # each defines --config
      names = [m.name for m in pkgutil.walk_packages(dpg_jax.__path__, 'dpg_jax.')
               if m.name not in entry_points]
      for name in names:
        importlib.import_module(name)
      print(len(names))
  ''')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=ENV)
  assert out.returncode == 0, out.stderr
  assert int(out.stdout.split()[-1]) >= 20
