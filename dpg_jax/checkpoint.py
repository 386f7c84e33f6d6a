"""Orbax checkpoints of the whole train state (policy, optimiser, critic).

Orbax writes each step into a temporary directory and renames it only once
complete, so a run killed mid-save leaves nothing that `latest_step` returns.
We add one guard of our own: a state with a NaN/inf never becomes a checkpoint
(a diverged run must not poison the resume).
"""
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class NonFiniteError(FloatingPointError):
  """Raised instead of saving a state that holds NaN or inf."""


@jax.jit
def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree) -> bool:
  return bool(_all_finite(tree))


class Checkpointer:
  """`CheckpointManager` over <workdir>/checkpoints with a finiteness guard."""

  def __init__(self, directory: str, *, max_to_keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save))

  def latest_step(self):
    return self._mgr.latest_step()

  def all_steps(self):
    return list(self._mgr.all_steps())

  def save(self, step: int, state, meta: dict | None = None) -> None:
    if not all_finite(state):
      raise NonFiniteError(
          f'step {step}: the train state holds NaN/inf; not writing a checkpoint to '
          f'{self.directory} (the last good one stays the resume point).')
    self._mgr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta or {})))

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
        self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
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

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
