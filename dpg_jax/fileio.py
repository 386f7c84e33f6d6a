"""Atomic file writes: readers (and resumed runs) never see half a file."""
import os
import tempfile
from typing import Callable, IO


def atomic_write(path: str, write_fn: Callable[[IO], None], *, text: bool = False) -> str:
  """write_fn(f) into a hidden temp file beside `path`, fsync, then rename."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w' if text else 'wb', **({'encoding': 'utf-8'} if text else {})) as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide outputs from other users.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def atomic_write_text(path: str, content: str) -> str:
  return atomic_write(path, lambda f: f.write(content), text=True)
