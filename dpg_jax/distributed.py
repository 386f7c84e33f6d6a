"""Multi-host start-up: `jax.distributed.initialize` when the config or environment asks.

JAX's multi-controller runtime is the distributed engine: every process runs
the same program on its local devices, `jit` over a global mesh does the rest.

When it starts (`config.distributed`):
- None (the default, auto): when the environment says this is one of several
  processes: `DPG_JAX_COORDINATOR` / `JAX_COORDINATOR_ADDRESS` set, a SLURM
  job step with more than one task, or a multi-host TPU VM slice (its worker
  list in `TPU_WORKER_HOSTNAMES` names more than one host);
- True: always (a TPU VM slice or SLURM is detected by JAX itself; elsewhere
  give the coordinator);
- False: never.

Explicit cluster settings (GPU clusters without SLURM, the local multi-process
test): `config.cluster.coordinator_address` ('host:port' of process 0),
`cluster.num_processes`, `cluster.process_id`, or the environment variables
DPG_JAX_COORDINATOR, DPG_JAX_NUM_PROCESSES, DPG_JAX_PROCESS_ID (the config wins).
"""
import os

from absl import logging
import jax

_ENV = {'coordinator_address': 'DPG_JAX_COORDINATOR', 'num_processes': 'DPG_JAX_NUM_PROCESSES',
        'process_id': 'DPG_JAX_PROCESS_ID'}


def _multi_process_environment(env) -> str:
  """Why the environment looks like one process of several ('' if it does not)."""
  if env.get('DPG_JAX_COORDINATOR') or env.get('JAX_COORDINATOR_ADDRESS'):
    return 'a coordinator address is set'
  if int(env.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_PROCID' in env:
    return f'SLURM job step with {env["SLURM_NTASKS"]} tasks'
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1:
    return f'TPU VM slice of {len(hosts)} hosts'
  return ''


def cluster_args(config, env=None) -> dict:
  """Keyword arguments for jax.distributed.initialize: only those given
  (config.cluster.* first, else the DPG_JAX_* environment variables)."""
  env = os.environ if env is None else env
  c = config.get('cluster', None) or {}
  args = {}
  address = c.get('coordinator_address', '') or env.get(_ENV['coordinator_address'], '')
  if address:
    args['coordinator_address'] = str(address)
  n = int(c.get('num_processes', 0) or 0) or int(env.get(_ENV['num_processes'], '') or 0)
  if n:
    args['num_processes'] = n
  pid = int(c.get('process_id', -1))
  if pid < 0 and env.get(_ENV['process_id'], '') != '':
    pid = int(env[_ENV['process_id']])
  if pid >= 0:
    args['process_id'] = pid
  ids = str(c.get('local_device_ids', '') or '')
  if ids:
    args['local_device_ids'] = [int(i) for i in ids.split(',')]
  return args


def wanted(config, env=None) -> tuple[bool, str]:
  """(start jax.distributed?, why) from config.distributed and the environment."""
  env = os.environ if env is None else env
  setting = config.get('distributed', None)
  if setting is True:
    return True, 'config distributed=True'
  if setting is False:
    return False, ''
  if setting is not None:
    raise ValueError(f'config key distributed={setting!r}: expected True, False or None (auto).')
  if cluster_args(config, env).get('coordinator_address'):
    return True, 'a coordinator address is configured'
  why = _multi_process_environment(env)
  return bool(why), why


def initialize(config) -> bool:
  """Starts the multi-controller runtime once if asked; True if it runs."""
  start, why = wanted(config)
  if not start:
    return False
  if _is_initialized():
    return True
  args = cluster_args(config)
  if 'coordinator_address' in args and not {'num_processes', 'process_id'} <= set(args):
    raise ValueError(
        f"coordinator {args['coordinator_address']!r} given without the process count and id: "
        'set config keys cluster.num_processes and cluster.process_id (or DPG_JAX_NUM_PROCESSES '
        'and DPG_JAX_PROCESS_ID).')
  logging.info('jax.distributed.initialize(%s) (%s)',
               ', '.join(f'{k}={v!r}' for k, v in args.items()), why)
  jax.distributed.initialize(**args)
  return True


def _is_initialized() -> bool:
  from jax._src import distributed as _dist  # pylint: disable=g-import-not-at-top
  return _dist.global_state.client is not None


def is_main() -> bool:
  """Process 0 writes metrics, previews, exports and the run's JSON files."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """A barrier across processes (no-op on one): others wait for process 0's files."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
