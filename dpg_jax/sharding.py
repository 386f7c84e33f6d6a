"""Device mesh, sharding rules and multi-host plumbing.

Sharding is declared in one place: `PARAM_RULES` maps parameter-path regexes to
a strategy, and every parameter and optimiser slot gets its layout from it. The
mesh has one axis, 'data': batches are split over it; parameters are either
replicated ('replicate', the default and what SD1.4 needs on one accelerator
host) or split over it along their largest divisible dimension ('fsdp', ZeRO-3
style: XLA inserts the all-gathers, memory per device drops by the axis size).
"""
import os
import re
from typing import Any, Sequence

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dpg_jax import host_memory

DATA = 'data'


def setup_runtime(config) -> None:
  """Process-wide policy, set once before any array is created."""
  host_memory.configure()
  if config.get('distributed', False):
    # Multi-host (TPU VM pods, multi-node GPU): coordinator etc. come from the
    # environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS...).
    jax.distributed.initialize()
  # Partitionable threefry: random numbers do not depend on how arrays are sharded.
  jax.config.update('jax_threefry_partitionable', True)
  setting = config.get('compilation_cache_dir', '')
  cache_dir = compilation_cache_dir(setting)
  # An explicit setting wins; the default does not override one set by the
  # environment (JAX_COMPILATION_CACHE_DIR) or by the tests.
  if cache_dir and (setting or not jax.config.jax_compilation_cache_dir):
    # Persistent compile cache: the SD1.4 step compiles once per machine, not per run.
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s)',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)


def compilation_cache_dir(setting: str) -> str:
  """config.compilation_cache_dir: '' = the user's cache dir, 'none' = off."""
  if setting == 'none':
    return ''
  if setting:
    return os.path.expanduser(setting)
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'dpg_jax', 'xla')


def make_mesh(data: int = -1, devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh over `data` devices (-1 = all)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices) if data in (-1, 0, None) else int(data)
  if n < 1 or n > len(devices):
    raise ValueError(f'config key mesh.data={data}: expected -1 or 1..{len(devices)} '
                     f'(devices available: {len(devices)}).')
  return Mesh(np.asarray(devices[:n]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


# (regex on '/'-joined parameter path, strategy). First match wins.
PARAM_RULES = (
    (r'.*', 'replicate'),
)


def _fsdp_spec(shape, axis_size: int) -> P:
  # Split the largest dimension that the axis divides; small or indivisible
  # leaves (biases, norms) stay replicated: their all-gather would cost more.
  if int(np.prod(shape)) < 2 ** 14:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA
      return P(*spec)
  return P()


def _path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '/'.join(parts)


def tree_shardings(mesh: Mesh, tree, strategy: str = 'replicate', rules=PARAM_RULES):
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs).

  `strategy` replaces the catch-all rule ('replicate' | 'fsdp'), so the config
  key mesh.param_sharding chooses the default layout while explicit rules win.
  """
  if strategy not in ('replicate', 'fsdp'):
    raise ValueError(f"config key mesh.param_sharding={strategy!r}: expected 'replicate' or 'fsdp'.")
  rules = tuple((pat, strategy if pat == r'.*' else s) for pat, s in rules)
  axis_size = mesh.shape[DATA]

  def leaf(path, x):
    shape = getattr(x, 'shape', ())
    name = _path_str(path)
    for pat, strat in rules:
      if re.fullmatch(pat, name):
        spec = _fsdp_spec(shape, axis_size) if strat == 'fsdp' and shape else P()
        return NamedSharding(mesh, spec)
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf, tree)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Place a host array that every process holds in full (multi-host safe).

  Each process only materialises the shards its devices own, so the same code
  serves one CPU, one GPU and a TPU pod slice.
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def place(x, sharding: NamedSharding, *, donate: bool = False) -> jax.Array:
  """put_global, but an array already on this process's devices stays there.

  donate=True hands x's buffers over (no copy where the layout matches; x is
  unusable afterwards); otherwise the result is an on-device copy.
  """
  if isinstance(x, jax.Array) and jax.process_count() == 1:
    return jax.device_put(x, sharding, donate=donate, may_alias=None if donate else False)
  return put_global(x, sharding)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Shard a global host batch over 'data' along its leading axis."""
  sharding = batch_sharded(mesh)
  n = mesh.shape[DATA]
  for k, v in batch.items():
    if v.shape[0] % n:
      raise ValueError(f'batch entry {k!r} has leading size {v.shape[0]}, not divisible by '
                       f'the {n} devices of the data axis: set batch_size to a multiple of {n}.')
  return {k: put_global(v, sharding) for k, v in batch.items()}


def put_replicated(tree, mesh: Mesh):
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: put_global(np.asarray(x), sharding), tree)
