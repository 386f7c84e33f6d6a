"""Device mesh, sharding rules and the host <-> global array plumbing.

The mesh has three named axes, sizes from `config.mesh` (one may be -1: fill):
- 'subject': independent copies of the trainable state, one per subject
  (`dpg_jax/multisubject.py`; size 1 in a single-subject run);
- 'data':    batch rows are split over it; parameters are replicated along it;
- 'fsdp':    batch rows are split over it too, and the large parameters and
  their optimiser slots are split along it (ZeRO-3 style: XLA inserts the
  all-gathers, per-device parameter + optimiser memory drops by its size;
  `batch_split_activations` keeps the activations split by batch rows).

Sharding is declared in one place: `PARAM_RULES` maps regexes over the
'/'-joined path of every leaf of the train state (params, optimiser slots,
critics, any trainable subset such as LoRA `.../lora_down/kernel` or Custom
Diffusion's `.../attn2/to_k/kernel`) to a strategy. Multi-host: every process
holds the same host batch (drawn from the same seed) and places only the rows
its devices own (`put_batch`); arrays a process cannot address are gathered
with `gather_to_host` before anything is written from process 0.
"""
import os
import re
from typing import Any, Callable, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dpg_jax import host_memory

SUBJECT, DATA, FSDP = 'subject', 'data', 'fsdp'
AXES = (SUBJECT, DATA, FSDP)
# Batch rows are split over both: FSDP's devices each take their own rows.
BATCH_AXES = (DATA, FSDP)
STRATEGIES = ('replicate', 'fsdp')

# (regex on the '/'-joined leaf path, strategy); first full match wins. Leaves
# smaller than MIN_SHARD_ELEMENTS, or with no dimension the fsdp axis divides,
# stay replicated whatever the rule: their all-gather costs more than it saves.
PARAM_RULES = (
    (r'(.*/)?(step|count)', 'replicate'),                 # counters
    (r'.*/(bias|scale|target_stats/.*)', 'replicate'),    # biases, norms, critic stats
    # Weight matrices, conv kernels and embeddings of the UNet, the text
    # encoder, the critics and any adapter; Adam's mu/nu follow (same paths).
    (r'.*/(kernel|embedding|weight|lora_(down|up)/[^/]+)', 'fsdp'),
    (r'.*', 'replicate'),
)
MIN_SHARD_ELEMENTS = 2 ** 14


def setup_runtime(config) -> None:
  """Process-wide policy, set once before any array is created."""
  host_memory.configure()
  from dpg_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config)
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


# --------------------------------------------------------------------------- #
# The mesh
# --------------------------------------------------------------------------- #
def mesh_sizes(n_devices: int, *, subject: int = 1, data: int = -1, fsdp: int = 1) -> dict:
  """{'subject', 'data', 'fsdp'} sizes whose product is <= n_devices.

  At most one size may be -1 (or 0): it takes what the others leave. Without a
  -1 the mesh may use fewer devices than there are (the first ones).
  """
  sizes = {SUBJECT: subject, DATA: data, FSDP: fsdp}
  fill = [k for k, v in sizes.items() if v in (-1, 0, None)]
  if len(fill) > 1:
    raise ValueError(f'config keys mesh.{fill[0]} and mesh.{fill[1]} are both -1: at most '
                     'one mesh axis may fill the remaining devices.')
  for k, v in sizes.items():
    if k not in fill and (not isinstance(v, int) or v < 1):
      raise ValueError(f'config key mesh.{k}={v!r}: expected -1 (fill) or an integer >= 1.')
  fixed = int(np.prod([v for k, v in sizes.items() if k not in fill]))
  if fill:
    if n_devices % fixed:
      raise ValueError(f'config keys mesh.*={sizes}: {n_devices} devices are not divisible '
                       f'by the fixed axes\' product {fixed}.')
    sizes[fill[0]] = n_devices // fixed
  if int(np.prod(list(sizes.values()))) > n_devices:
    raise ValueError(f'config keys mesh.*={sizes}: the mesh needs '
                     f'{int(np.prod(list(sizes.values())))} devices, {n_devices} are available.')
  return sizes


def make_mesh(data: int = -1, devices: Sequence[Any] | None = None, *, fsdp: int = 1,
              subject: int = 1) -> Mesh:
  """A ('subject', 'data', 'fsdp') mesh; by default all devices on 'data'."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes(len(devices), subject=subject, data=data, fsdp=fsdp)
  n = int(np.prod(list(sizes.values())))
  shape = tuple(sizes[a] for a in AXES)
  if n == len(devices) and len(devices) > 1 and devices == list(jax.devices()):
    # Topology-aware order: the fsdp axis (most traffic) on the nearest devices.
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    try:
      return Mesh(mesh_utils.create_device_mesh(shape, devices), AXES)
    except (ValueError, NotImplementedError, AssertionError):
      pass  # a shape the topology helper does not support: plain order
  return Mesh(np.asarray(devices[:n]).reshape(shape), AXES)


def mesh_from_config(mesh_config, devices=None, *, subject: int = 1) -> Mesh:
  """The mesh of `config.mesh` ('fsdp' param sharding with the default sizes
  shards over all devices: data=1, fsdp=-1)."""
  data, fsdp = mesh_config.get('data', -1), mesh_config.get('fsdp', 1)
  if mesh_config.get('param_sharding', 'replicate') == 'fsdp' and fsdp == 1 and data == -1:
    data, fsdp = 1, -1
  return make_mesh(data, devices, fsdp=fsdp, subject=subject)


def batch_axis_size(mesh: Mesh) -> int:
  """How many ways a batch is split (data x fsdp)."""
  return int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))


def _batch_axes(mesh: Mesh):
  return tuple(a for a in BATCH_AXES if a in mesh.shape)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, *, subject_axis: bool = False) -> NamedSharding:
  """Leading axis over data x fsdp (with subject_axis: [subject, batch, ...])."""
  spec = (SUBJECT, _batch_axes(mesh)) if subject_axis else (_batch_axes(mesh),)
  return NamedSharding(mesh, P(*spec))


def batch_split_activations(fn: Callable, mesh: Mesh) -> Callable:
  """`fn`, whose Flax module calls keep their arrays split by batch rows.

  With the weights split along 'fsdp', XLA's SPMD partitioner may follow a
  weight's split instead of the batch's: it all-gathers the batch and splits
  activations by channel or head (the whole batch on every device; at SD1.4
  shapes, 512 px, 8 devices: 107.7 GiB of temporaries per device, 20.8 with
  these constraints, 19.6 replicated). Every `__call__` of every module
  inside `fn` gets its array inputs and outputs constrained to [rows over
  data x fsdp, the rest whole], which leaves one layout: each weight is
  all-gathered for its use (ZeRO-3) and its gradient summed over the devices
  and split back. The constraints transpose to the same ones on the backward
  pass. A mesh without an fsdp axis gets `fn` unchanged.
  """
  if mesh.shape.get(FSDP, 1) == 1:
    return fn
  n, axes = batch_axis_size(mesh), _batch_axes(mesh)

  def constrain(x):
    # Leading dims the batch axes do not divide (scalars, a 1-row prompt) are
    # not batch rows: left to the partitioner.
    if isinstance(x, jax.Array) and x.ndim and x.shape[0] % n == 0:
      return jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, P(axes, *[None] * (x.ndim - 1))))
    return x

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    args, kwargs = jax.tree.map(constrain, (args, kwargs))
    return jax.tree.map(constrain, next_fun(*args, **kwargs))

  def wrapped(*args, **kwargs):
    with nn.intercept_methods(interceptor):
      return fn(*args, **kwargs)
  # jit names the program after it (jit_train_step): logs and XLA dumps keep the name.
  wrapped.__name__ = getattr(fn, '__name__', getattr(getattr(fn, 'func', None), '__name__',
                                                     'wrapped'))
  return wrapped


# XLA:CPU's scheduler that minimises live memory, and its convolutions without
# YNNPACK fusions (XLA's own kernels).
_CPU_MEMORY_SCHEDULER = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
_CPU_NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}


def compiler_options(mesh: Mesh, *, wide_convs: bool = False) -> dict | None:
  """XLA options for a step on `mesh`; only XLA:CPU gets any.

  fsdp axis: the memory-minimising scheduler. XLA:CPU's default one starts
  every weight all-gather at the top of the step (they depend on the
  parameters only), so every gathered weight is alive at once: at SD1.4 shapes
  (256 px, 4 devices) 6.79 GiB of temporaries per device instead of 4.13.

  wide_convs (a UNet of SD1.x width, >= 256 channels): the same scheduler,
  which stops XLA computing every transposed kernel of the backward up front,
  and no YNNPACK fusions, whose convolutions are slower than XLA's own at these
  widths. Measured at SD1.4 shapes, 256 px, batch 1+1 (`dpg_jax.bench`, two
  rounds): 13.6 s/step, peak 15.65 GiB as XLA:CPU defaults; 10.5-12.6 s,
  14.89 GiB with both. At the toy sizes YNNPACK is faster (0.042 vs 0.057
  s/step), so narrow models keep the defaults.
  """
  if mesh.devices.flat[0].platform != 'cpu':
    return None
  options = {}
  if mesh.shape.get(FSDP, 1) > 1:
    options.update(xla_cpu_enable_concurrency_optimized_scheduler=False, **_CPU_MEMORY_SCHEDULER)
  if wide_convs:
    options.update(**_CPU_MEMORY_SCHEDULER, **_CPU_NO_YNN)
  return options or None


# --------------------------------------------------------------------------- #
# Rules
# --------------------------------------------------------------------------- #
def param_rules(mesh_config) -> tuple:
  """The rule table of config.mesh: `mesh.rules` ('regex=strategy', tried first)
  then PARAM_RULES; with param_sharding='replicate' everything is replicated."""
  strategy = mesh_config.get('param_sharding', 'replicate')
  if strategy not in STRATEGIES:
    raise ValueError(f"config key mesh.param_sharding={strategy!r}: expected 'replicate' or "
                     "'fsdp'.")
  extra = []
  for i, item in enumerate(mesh_config.get('rules', ())):
    pat, sep, strat = str(item).rpartition('=')
    if not sep or strat not in STRATEGIES:
      raise ValueError(f"config key mesh.rules[{i}]={item!r}: expected 'regex=strategy' with "
                       f'strategy one of {STRATEGIES}.')
    try:
      re.compile(pat)
    except re.error as e:
      raise ValueError(f'config key mesh.rules[{i}]={item!r}: bad regex ({e}).') from None
    extra.append((pat, strat))
  if strategy == 'replicate':
    return tuple(extra) + ((r'.*', 'replicate'),)
  return tuple(extra) + PARAM_RULES


def fsdp_spec(shape, axis_size: int, *, min_elements: int = MIN_SHARD_ELEMENTS,
              lead: tuple = ()) -> P:
  """P() or the spec splitting the largest dimension `axis_size` divides.

  lead: mesh axes of leading dimensions that are not the leaf's own (the
  subject axis of a stacked multi-subject state); they are never split.
  """
  own = tuple(shape)[len(lead):]
  if axis_size > 1 and int(np.prod(own or (1,))) >= min_elements:
    for dim in sorted(range(len(own)), key=lambda d: -own[d]):
      if own[dim] % axis_size == 0:
        spec = [None] * len(own)
        spec[dim] = FSDP
        return P(*lead, *spec)
  return P(*lead)


def path_str(path) -> str:
  parts = []
  for k in path:
    parts.append(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))))
  return '/'.join(parts)


def tree_shardings(mesh: Mesh, tree, rules='replicate', *, subject_axis: bool = False,
                   min_elements: int = MIN_SHARD_ELEMENTS):
  """NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs).

  rules: a rule table (`param_rules`) or a strategy name ('replicate' |
  'fsdp' = PARAM_RULES). subject_axis: every leaf has a leading subject
  dimension, split over the mesh's 'subject' axis.
  """
  if isinstance(rules, str):
    rules = param_rules({'param_sharding': rules})
  axis_size = mesh.shape.get(FSDP, 1)
  lead = (SUBJECT,) if subject_axis else ()

  def leaf(path, x):
    shape = tuple(getattr(x, 'shape', ()))
    name = path_str(path)
    for pat, strat in rules:
      if re.fullmatch(pat, name):
        if strat == 'fsdp':
          return NamedSharding(mesh, fsdp_spec(shape, axis_size, min_elements=min_elements,
                                               lead=lead))
        break
    return NamedSharding(mesh, P(*lead))

  return jax.tree_util.tree_map_with_path(leaf, tree)


def bytes_per_device(tree) -> int:
  """Bytes one device holds of `tree` (arrays or sharded ShapeDtypeStructs), the max."""
  per = {}
  for x in jax.tree.leaves(tree):
    sh = getattr(x, 'sharding', None)
    shape = sh.shard_shape(x.shape) if sh is not None else x.shape
    nbytes = int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    devices = sh.device_set if sh is not None else {None}
    for d in devices:
      per[d] = per.get(d, 0) + nbytes
  return max(per.values()) if per else 0


# --------------------------------------------------------------------------- #
# Host <-> global arrays
# --------------------------------------------------------------------------- #
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


def process_rows(n: int, sharding: NamedSharding) -> slice:
  """The rows [start, stop) of an [n, ...] array this process's devices own.

  With the batch split over data x fsdp and devices in process order (JAX
  orders a multi-host mesh so), each process owns one contiguous block.
  """
  idx = sharding.addressable_devices_indices_map((n,))
  starts = [i[0].start or 0 for i in idx.values()]
  stops = [n if i[0].stop is None else i[0].stop for i in idx.values()]
  lo, hi = min(starts), max(stops)
  covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops)})
  if covered != hi - lo:
    raise ValueError(f'this process owns non-contiguous rows of a batch sharded {sharding.spec} '
                     'on this mesh: put_global the full batch instead.')
  return slice(lo, hi)


def put_process_local(local: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
  """The global [global_rows, ...] array from this process's rows only."""
  local = np.asarray(local)
  return jax.make_array_from_process_local_data(sharding, local,
                                                (global_rows,) + local.shape[1:])


def put_batch(batch: dict, mesh: Mesh, *, subject_axis: bool = False) -> dict:
  """Shard a host batch over data x fsdp along its leading (batch) axis.

  Every process passes the same global batch; each keeps only its own rows
  (`process_rows`) and they are assembled into global arrays without any
  process materialising another's rows on device. subject_axis: entries are
  [subject, batch, ...], the subject axis over the mesh's 'subject' axis.
  """
  sharding = batch_sharded(mesh, subject_axis=subject_axis)
  n = batch_axis_size(mesh)
  dim = 1 if subject_axis else 0
  for k, v in batch.items():
    if v.shape[dim] % n:
      raise ValueError(f'batch entry {k!r} has batch size {v.shape[dim]}, not divisible by '
                       f'the {n} devices of the data x fsdp axes: set batch_size to a '
                       f'multiple of {n}.')
  if subject_axis or jax.process_count() == 1:
    return {k: put_global(v, sharding) for k, v in batch.items()}
  out = {}
  for k, v in batch.items():
    rows = process_rows(v.shape[0], sharding)
    out[k] = put_process_local(np.asarray(v)[rows], sharding, v.shape[0])
  return out


def put_replicated(tree, mesh: Mesh):
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: put_global(np.asarray(x), sharding), tree)


def gather_to_host(tree):
  """`tree` with every array this process cannot read in full all-gathered to
  a host numpy array (shards on other hosts' devices: a collective, so every
  process must call this). Fully addressable arrays are returned unchanged:
  their readers copy them to the host one at a time."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return x
  return jax.tree.map(one, tree)
