"""The one path layer of every workdir path (etils.epath), and atomic writes.

A workdir may be a local path or a URL: `gs://bucket/run` (Cloud Storage;
needs `gcsfs`, the `[gcs]` extra, as Orbax and TFDS use through epath too) or
`file:///abs/path` (a local directory written exactly as a URL workdir is:
the tests use it to exercise the cloud code path without network).

Local paths keep the POSIX guarantees (temp file + fsync + rename). URL
workdirs differ where object stores do: a write is one whole-object upload
(atomic on close), there is no append (a log is rewritten whole), and files
that libraries must open as local files (the tiny model, instance and class
images, an export being written) are produced in a local staging directory
(`local_dir`) and uploaded (`upload_tree`).
"""
import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from typing import Callable, IO

from etils import epath

_FILE_URL = 'file://'


def is_url(path) -> bool:
  return '://' in os.fspath(path) if not isinstance(path, epath.Path) else '://' in str(path)


def is_local(path) -> bool:
  """A plain local path (POSIX semantics); False for every URL, file:// included."""
  return not is_url(path)


def path(p) -> epath.Path:
  """epath.Path of a local path or URL (file:// maps to the local path)."""
  s = str(p)
  if s.startswith(_FILE_URL):
    s = s[len(_FILE_URL):]
    if not s.startswith('/'):
      raise ValueError(f'{p!r}: a file:// URL needs an absolute path (file:///abs/dir).')
    return epath.Path(s)
  if '://' in s:
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def normalize(p) -> str:
  """The canonical string of a workdir: absolute local path, or the URL as given."""
  s = str(p).rstrip('/') or '/'
  return s if is_url(s) else os.path.abspath(os.path.expanduser(s))


def join(base, *parts) -> str:
  """os.path.join for local paths and URLs alike (no abspath on URLs)."""
  return '/'.join([str(base).rstrip('/'), *[str(x).strip('/') for x in parts]]) if is_url(
      base) else os.path.join(str(base), *map(str, parts))


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p) -> str:
  return path(p).read_text(encoding='utf-8')


def rename(src, dst) -> None:
  path(src).rename(path(dst))


def rmtree(p) -> None:
  q = path(p)
  if q.exists():
    q.rmtree()


def atomic_write(p, write_fn: Callable[[IO], None], *, text: bool = False) -> str:
  """write_fn(f) into `p` so that readers never see half a file.

  Local: a hidden temp file beside `p`, fsync, then rename. URL: the content is
  built in memory and uploaded as one object (object stores commit on close).
  """
  if is_url(p):
    buf = io.StringIO() if text else io.BytesIO()
    write_fn(buf)
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = buf.getvalue()
    if text:
      target.write_text(data, encoding='utf-8')
    else:
      target.write_bytes(data)
    return str(p)
  p = str(p)
  folder = os.path.dirname(os.path.abspath(p))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(p)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w' if text else 'wb', **({'encoding': 'utf-8'} if text else {})) as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide outputs from other users.
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return p


def atomic_write_text(p, content: str) -> str:
  return atomic_write(p, lambda f: f.write(content), text=True)


def local_dir(workdir) -> str:
  """A local directory standing in for `workdir` where files must be local.

  The workdir itself when local; for a URL, a per-URL folder under
  $DPG_JAX_STAGING (default ~/.cache/dpg_jax/staging): inputs regenerated
  deterministically (tiny model, synthetic subject, class images) live there.
  """
  if is_local(workdir):
    return normalize(workdir)
  url = normalize(workdir)
  base = os.environ.get('DPG_JAX_STAGING') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
      'dpg_jax', 'staging')
  slug = url.split('://', 1)[1].replace('/', '_')[-80:]
  folder = os.path.join(base, f'{slug}_{hashlib.sha1(url.encode()).hexdigest()[:10]}')
  os.makedirs(folder, exist_ok=True)
  return folder


def upload_tree(local: str, dest) -> str:
  """Copies the local directory `local` to `dest` (replacing it); returns dest.

  Files first, in a sibling `<dest>.tmp-upload`, then one rename: a reader of
  `dest` never sees half an upload where the store renames directories
  (local, file://); on object stores the rename is per object, and the
  directory's marker file (`model_index.json` for exports) is copied last.
  """
  dest_p = path(dest)
  tmp = dest_p.parent / (dest_p.name + '.tmp-upload')
  if tmp.exists():
    tmp.rmtree()
  files = sorted(os.path.relpath(os.path.join(r, f), local)
                 for r, _, fs in os.walk(local) for f in fs)
  last = [f for f in files if os.path.basename(f) == 'model_index.json']
  for rel in [f for f in files if f not in last] + last:
    out = tmp / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(os.path.join(local, rel), 'rb') as src, out.open('wb') as dst:
      shutil.copyfileobj(src, dst, 1 << 20)
  if dest_p.exists():
    dest_p.rmtree()
  tmp.rename(dest_p)
  return str(dest)


@contextlib.contextmanager
def local_file(p):
  """Yields a local path to write; it ends up at `p` (uploaded for a URL)."""
  if is_local(p):
    os.makedirs(os.path.dirname(os.path.abspath(str(p))), exist_ok=True)
    yield str(p)
    return
  with tempfile.TemporaryDirectory(prefix='dpg_jax_up_') as tmp:
    local = os.path.join(tmp, os.path.basename(str(p)))
    yield local
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local, 'rb') as src, target.open('wb') as dst:
      shutil.copyfileobj(src, dst, 1 << 20)


@contextlib.contextmanager
def staged_dir(workdir):
  """Yields a local stand-in for `workdir` to write whole directories into
  (exports); every top-level folder written there is uploaded to `workdir`."""
  if is_local(workdir):
    yield normalize(workdir)
    return
  with tempfile.TemporaryDirectory(prefix='dpg_jax_stage_') as tmp:
    yield tmp
    for name in sorted(os.listdir(tmp)):
      if os.path.isdir(os.path.join(tmp, name)) and not name.startswith('.'):
        upload_tree(os.path.join(tmp, name), join(workdir, name))
