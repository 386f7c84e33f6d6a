"""Orbax checkpoints of the whole train state (policy, optimiser, critic).

Orbax writes each step into a temporary directory and renames it only once
complete, so a run killed mid-save leaves nothing that `latest_step` returns.
We add guards of our own:
- a state with a NaN/inf never becomes a checkpoint (a diverged run must not
  poison the resume);
- a failed write (disk full) is one error naming the step, the path and the
  bytes free, Orbax's background traceback is not repeated, and its
  temporary directory (never a resume point) is removed at the next start;
- `restore_latest` skips a corrupt or partial newest step (warning, naming it),
  moves it aside, and resumes from the newest intact one.
"""
import errno
import logging as std_logging
import os
import shutil
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dpg_jax import fileio


class NonFiniteError(FloatingPointError):
  """Raised instead of saving a state that holds NaN or inf."""


class CheckpointError(OSError):
  """A checkpoint that cannot be written, or no checkpoint that can be read."""


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree) -> bool:
  return bool(_all_finite(tree))


def _is_disk_full(exc: BaseException) -> bool:
  """ENOSPC anywhere in the chain (Python OSError or a TensorStore message)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if getattr(exc, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(exc)
    if 'No space left on device' in text or 'Disk quota exceeded' in text:
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def _record_disk_full(record: std_logging.LogRecord) -> bool:
  if record.exc_info and record.exc_info[1] is not None and _is_disk_full(record.exc_info[1]):
    return True
  try:
    return 'No space left on device' in record.getMessage()
  except Exception:  # pylint: disable=broad-except
    return False


def _is_out_of_memory(exc: BaseException) -> bool:
  return isinstance(exc, MemoryError) or 'RESOURCE_EXHAUSTED' in str(exc)


def _free_bytes(path: str) -> int | None:
  if not fileio.is_local(path):
    return None  # object stores have no free-space figure
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


class _OrbaxErrors(std_logging.Filter):
  """Orbax logs a background save failure with its full traceback, from several
  threads, and raises it again at the next wait; we raise one line instead.
  While a save is in flight its error records are held (shown once it is
  known not to be a disk-full failure), and after a reported disk-full failure
  the other writers' ENOSPC records are dropped. Other records pass."""

  def __init__(self):
    super().__init__()
    self.holding = False
    self.drop_disk_full = False
    self.held = []

  def filter(self, record):
    if record.levelno < std_logging.ERROR or '/orbax/' not in (record.pathname or ''):
      return True
    if self.drop_disk_full and _record_disk_full(record):
      return False
    if self.holding:
      self.held.append(record)
      return False
    return True


class Checkpointer:
  """`CheckpointManager` over <workdir>/checkpoints with the guards above.

  Each checkpoint holds two items: `state` (the train state) and `meta`
  (JSON: the step and the run's config, compared on resume).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    # A local path or a URL (gs://, file://): Orbax writes through epath.
    self.directory = fileio.normalize(directory)
    self._mgr = ocp.CheckpointManager(
        fileio.path(self.directory),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # Temporary dirs of saves that died (killed, disk full) go at start.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save))
    self._async = async_save
    self._pending = None          # step of the save in flight (async)
    self._pending_bytes = 0       # ... and the bytes of its state
    self._filter = _OrbaxErrors()
    std_logging.getLogger('absl').addFilter(self._filter)

  # -- reading ------------------------------------------------------------------
  def latest_step(self):
    return self._mgr.latest_step()

  def all_steps(self):
    return sorted(self._mgr.all_steps())

  def step_dir(self, step: int) -> str:
    return fileio.join(self.directory, str(int(step)))

  def read_meta(self, step: int) -> dict:
    """The JSON meta of one step (cheap: no arrays are read)."""
    out = self._mgr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out.meta or {})

  def restore(self, step: int, target):
    """Restore into the shapes, dtypes and shardings of `target` (arrays or abstract)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    out = self._mgr.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        meta=ocp.args.JsonRestore()))
    logging.info('Restored step %d from %s', step, self.directory)
    return out.state, dict(out.meta or {})

  def commit_time_ns(self, step: int) -> int:
    """Wall-clock time (ns since the epoch) at which `step` was committed."""
    return int(self._mgr.metadata(int(step)).commit_timestamp_nsecs)

  def restore_subtree(self, step: int, key: str):
    """state[key] of `step` alone, as host numpy arrays (e.g. 'params' to sample
    from: the optimiser and critic states are not read)."""
    # StandardCheckpointHandler cannot restore part of a tree; the PyTree
    # handler reads the same on-disk format and can.
    mgr = ocp.CheckpointManager(
        fileio.path(self.directory), options=ocp.CheckpointManagerOptions(read_only=True),
        item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    try:
      tree = mgr.item_metadata(int(step))['state'].tree
      if key not in tree:
        raise KeyError(f'{self.directory} step {step}: the saved state has no {key!r} '
                       f'(it has {sorted(tree)}).')
      item = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[key])}
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      out = mgr.restore(int(step), args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item, args, partial_restore=True)))
    finally:
      mgr.close()
    logging.info('Restored %s of step %d from %s', key, step, self.directory)
    return out.state[key]

  def latest_meta(self):
    """(step, meta) of the newest step whose meta reads, or (None, None)."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue  # restore_latest names and moves it aside
    return None, None

  def restore_latest(self, target, check_meta=None):
    """(step, state, meta) of the newest intact step, or (None, target, None).

    A step that fails to read (truncated or missing files) is moved to
    <directory>.corrupt/<step> with a warning naming it, so the run goes on from
    the previous one and later saves of that step do not collide with it.
    `check_meta(step, meta)` runs before each restore and may raise (a config
    that does not match is refused before any array is read).
    """
    steps = self.all_steps()
    bad = []
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        bad.append(self._set_aside(step, e))
        continue
      if check_meta is not None:
        check_meta(step, meta)
      try:
        state, meta = self.restore(step, target)
      except Exception as e:  # pylint: disable=broad-except
        if _is_out_of_memory(e):
          raise  # the checkpoint is fine; the device is too small for it
        bad.append(self._set_aside(step, e))
        continue
      return step, state, meta
    if bad:
      raise CheckpointError(
          f'no intact checkpoint in {self.directory}: steps {sorted(steps)} all failed to '
          f'read (moved to {self.directory}.corrupt/). Remove {self.directory} to start '
          'from scratch.')
    return None, target, None

  def _set_aside(self, step: int, exc: BaseException) -> str:
    src = self.step_dir(step)
    dst = fileio.join(self.directory + '.corrupt', f'{step}_{int(time.time())}')
    why = f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'
    if jax.process_index() == 0 and fileio.isdir(src):
      fileio.makedirs(self.directory + '.corrupt')
      fileio.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'dpg_jax:set_aside_{step}')
    self._mgr.reload()
    logging.warning('Checkpoint %s is corrupt or partial (%s); moved it to %s and falling '
                    'back to the previous step.', src, why, dst)
    return dst

  # -- writing ------------------------------------------------------------------
  def save(self, step: int, state, meta: dict | None = None) -> None:
    if not all_finite(state):
      raise NonFiniteError(
          f'step {step}: the train state holds NaN/inf; not writing a checkpoint to '
          f'{self.directory} (the last good one stays the resume point).')
    self.wait()  # a failed earlier save is reported as that save's error
    self._hold_orbax_errors(True)
    self._pending = int(step)
    self._pending_bytes = sum(int(getattr(x, 'nbytes', 0)) for x in jax.tree.leaves(state))
    try:
      self._mgr.save(int(step), args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave(meta or {})))
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from None
    if not self._async:
      self.wait()

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the step the multi-host preemption sync chose."""
    return self._mgr.reached_preemption(int(step))

  def wait(self) -> None:
    """Blocks until the save in flight is written; raises CheckpointError if it failed."""
    if self._pending is None:
      return
    try:
      self._mgr.wait_until_finished()
      self._mgr.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._failed(e) from None
    self._pending = None
    for record in self._hold_orbax_errors(False):  # logged by a save that still succeeded: show them
      std_logging.getLogger('absl').handle(record)

  def _failed(self, exc: BaseException) -> CheckpointError:
    """One CheckpointError for a failed write; leaves nothing to resume from."""
    step, self._pending = self._pending, None
    path = self.step_dir(step)
    # Orbax may surface a follow-on error (its clean-up of the half-written
    # directory racing the other writers) instead of the ENOSPC: the held
    # records and the free space tell too. Decided while still holding, so no
    # writer's record slips out in between.
    free = _free_bytes(self.directory)
    disk_full = (_is_disk_full(exc) or any(_record_disk_full(r) for r in self._filter.held)
                 or (free is not None and free < self._pending_bytes))
    self._filter.drop_disk_full |= disk_full
    held = self._hold_orbax_errors(False)
    # Its temporary directory is never listed as a step; other writers of it
    # may still run, so it is removed at the next start (cleanup_tmp_directories).
    self._mgr.reload()
    if disk_full:
      return CheckpointError(
          f'checkpoint of step {step} to {path} failed: no space left on device '
          f'({"unknown" if free is None else f"{free:,}"} bytes free, the state is '
          f'{self._pending_bytes:,} bytes); nothing was kept of it, the resume point is '
          f'step {self.latest_step()}. Free space or point --workdir elsewhere.')
    for record in held:  # not a known cause: keep Orbax's traceback, once
      std_logging.getLogger('absl').handle(record)
    return CheckpointError(
        f'checkpoint of step {step} to {path} failed ({type(exc).__name__}: '
        f'{str(exc).splitlines()[0][:300] if str(exc) else ""}); the resume point is '
        f'step {self.latest_step()}.')

  def _hold_orbax_errors(self, on: bool) -> list:
    """Starts holding Orbax's error records, or stops and returns those held."""
    self._filter.holding = on
    held, self._filter.held = self._filter.held, []
    return held

  def close(self) -> None:
    """Waits for the save in flight (raising if it failed), then releases Orbax."""
    try:
      self.wait()
    finally:
      # Orbax starts a thread at construction that cleans up temporary dirs of
      # killed saves, and its close() does not wait for it: a run that stops
      # right after start-up (a user error) would die in it at interpreter exit.
      await_cleanup = getattr(self._mgr, '_maybe_await_cleanup_tmp_directory', None)
      if await_cleanup is not None:
        await_cleanup()
      self._mgr.close()
      std_logging.getLogger('absl').removeFilter(self._filter)
