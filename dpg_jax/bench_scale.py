"""Scale-out figures: step time over device counts, FSDP memory at SD1.4 shapes, K subjects at once.

  python -m dpg_jax.bench_scale --what=devices --devices=1,2,4,8
  python -m dpg_jax.bench_scale --what=memory --devices=8 --resolution=512
  python -m dpg_jax.bench_scale --what=subjects --subjects=1,2,4

Each measurement runs in a fresh process with that many forced CPU devices
(`--xla_force_host_platform_device_count`; on a GPU/TPU host the real devices
are used instead when --platform is not cpu). On CPU the device counts share
the same cores: the step-time row shows the mesh's overhead, not a speed-up.
`memory` compiles the SD1.4-shape step from abstract shapes only
(`jax.eval_shape`; nothing of SD1.4 size is allocated) and prints XLA's
per-device memory analysis for replicated and FSDP layouts, and the process's
peak RSS.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_WHAT = flags.DEFINE_enum('what', 'devices', ['devices', 'memory', 'subjects'], 'Which figure.')
_DEVICES = flags.DEFINE_string('devices', '1,2,4,8', 'Device counts (devices, memory).')
_SUBJECTS = flags.DEFINE_string('subjects', '1,2,4', 'Subject counts K (subjects).')
_STEPS = flags.DEFINE_integer('timed_steps', 5, 'Timed steps after the compile.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Instance images per step (global).')
_RES = flags.DEFINE_integer('resolution', 512, 'memory: image resolution at SD1.4 shapes.')
_PLATFORM = flags.DEFINE_string('platform', 'cpu', 'cpu: forced host devices.')
_WORKER = flags.DEFINE_string('worker', '', 'internal: one measurement (JSON spec).')


def _tiny_inputs(batch_size: int, seed: int = 0):
  """(sd, params, config) of the tiny SD with the tiny config's training settings."""
  from configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top
  from dpg_jax import models, tiny  # pylint: disable=g-import-not-at-top
  path = os.path.join(tempfile.gettempdir(), 'dpg_jax_bench_scale_tiny_sd')
  tiny.build_tiny_sd(path)
  sd, params = models.load_stable_diffusion(path)
  config = tiny_config.get_config()
  config.batch_size = batch_size
  config.seed = seed
  return sd, params, config


def _host_batch(sd, params, config, step, seed=0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dpg_jax import data as data_lib, train  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(seed)
  h = config.data.resolution // sd.vae_scale
  lat = lambda n: rs.randn(n, 4, h, h).astype(np.float32)
  latents = data_lib.SubjectLatents(lat(4), np.abs(lat(4)) * .1, lat(8), np.abs(lat(8)) * .1)
  ids = sd.tokenize(['a photo of sks toy', 'a photo of toy'])
  cond = train.conditioning_rows(sd, params['text_encoder'], config, ids)
  return train.host_batch(latents, cond, step=step, config=config)


def _time(fn, steps):
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  jax.block_until_ready(fn(0))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(1, steps + 1):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(i))
    times.append(time.perf_counter() - t0)
  return compile_s, statistics.median(times)


def _worker_devices(spec):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding, train  # pylint: disable=g-import-not-at-top
  sd, params, config = _tiny_inputs(spec['batch_size'])
  n = jax.device_count()
  out = {}
  for layout in ('replicate', 'fsdp'):
    if layout == 'fsdp' and n == 1:
      continue
    mesh = sharding.make_mesh(1, fsdp=n) if layout == 'fsdp' else sharding.make_mesh(n)
    step_spec = train.make_step_spec(sd, config)
    trainable = jax.tree.map(np.array, train.trainable_params(params, config))
    state, sh = train.create_sharded_state(step_spec, trainable, jax.random.PRNGKey(0), mesh,
                                           layout)
    step = train.compile_train_step(step_spec, mesh, sh)
    rng = sharding.put_global(np.asarray(jax.random.PRNGKey(1)), sharding.replicated(mesh))
    batches = [sharding.put_batch(_host_batch(sd, params, config, i), mesh) for i in range(2)]
    box = {'state': state}

    def run(i, box=box, step=step, rng=rng, batches=batches):
      box['state'], m = step(box['state'], batches[i % 2], rng, None)
      return m
    compile_s, step_s = _time(run, spec['steps'])
    out[layout] = {'compile_s': round(compile_s, 1), 'step_s': round(step_s, 4),
                   'params_opt_bytes_per_device': sharding.bytes_per_device(
                       (box['state'].params, box['state'].opt_state))}
  return {'devices': n, **out}


def _worker_memory(spec):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import dreambooth as db_config  # pylint: disable=g-import-not-at-top
  from dpg_jax import bench, sharding, train  # pylint: disable=g-import-not-at-top
  config = db_config.get_config()
  config.batch_size = spec['batch_size']
  config.data.resolution = spec['resolution']
  sd, shapes = bench.sd14_random('float32', False, 'standard', abstract=True)
  n = jax.device_count()
  gb = config.batch_size * config.grad_accum_steps
  h = config.data.resolution // 8
  f32 = lambda *s: jax.ShapeDtypeStruct(s, np.float32)
  batch = {'instance_mean': f32(gb, 4, h, h), 'instance_std': f32(gb, 4, h, h),
           'instance_index': jax.ShapeDtypeStruct((gb,), np.int32),
           'class_mean': f32(gb, 4, h, h), 'class_std': f32(gb, 4, h, h),
           'instance_ids': jax.ShapeDtypeStruct((gb, 77), np.int32),
           'class_ids': jax.ShapeDtypeStruct((gb, 77), np.int32)}
  spec_ = train.make_step_spec(sd, config)
  trainable = train.trainable_params(shapes, config)
  out = {'devices': n, 'resolution': config.data.resolution, 'batch_size': gb}
  for layout in spec['layouts']:
    mesh = sharding.make_mesh(1, fsdp=n) if layout == 'fsdp' else sharding.make_mesh(n)
    abstract, sh = train.abstract_state(spec_, trainable, jax.random.PRNGKey(0), mesh, layout)
    bsh = sharding.batch_sharded(mesh)
    ab_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh) for k, v in batch.items()}
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
    t0 = time.perf_counter()
    compiled = train.compile_train_step(spec_, mesh, sh).lower(abstract, ab_batch, rng,
                                                               None).compile()
    ma = compiled.memory_analysis()
    out[layout] = {
        'compile_s': round(time.perf_counter() - t0, 1),
        'state_bytes_per_device': sharding.bytes_per_device(abstract),
        'argument_bytes': int(ma.argument_size_in_bytes),
        'output_bytes': int(ma.output_size_in_bytes),
        'temp_bytes': int(ma.temp_size_in_bytes),
        'alias_bytes': int(ma.alias_size_in_bytes),
        'peak_estimate_bytes': int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                                   + ma.temp_size_in_bytes - ma.alias_size_in_bytes)}
    del compiled
  out['peak_rss_bytes'] = bench.peak_rss_bytes()
  return out


def _worker_subjects(spec):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dpg_jax import multisubject, sharding, train  # pylint: disable=g-import-not-at-top
  k = spec['subjects']
  sd, params, config = _tiny_inputs(spec['batch_size'])
  step_spec = train.make_step_spec(sd, config)
  trainable = jax.tree.map(np.array, train.trainable_params(params, config))
  out = {'subjects': k, 'devices': jax.device_count()}
  # K subjects at once: stacked state over the 'subject' axis, vmapped step.
  mesh = multisubject.subject_mesh(k)
  init_all = lambda p, r: jax.vmap(lambda rr: train.init_state(step_spec, p, rr))(
      jnp.broadcast_to(r, (k,) + r.shape))
  shapes = jax.eval_shape(init_all, trainable, jax.random.PRNGKey(0))
  sh = sharding.tree_shardings(mesh, shapes, 'replicate', subject_axis=True)
  state = jax.jit(init_all, out_shardings=sh)(trainable, jax.random.PRNGKey(0))
  subj = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.SUBJECT))
  step = jax.jit(multisubject.subject_step(step_spec, mesh),
                 in_shardings=(sh, sharding.batch_sharded(mesh, subject_axis=True), subj, None),
                 out_shardings=(sh, subj), donate_argnums=(0,))
  rng = sharding.put_global(np.stack([np.asarray(jax.random.PRNGKey(1))] * k), subj)
  stack = lambda i: {key: np.stack([v] * k) for key, v in
                     _host_batch(sd, params, config, i).items()}
  batches = [sharding.put_batch(stack(i), mesh, subject_axis=True) for i in range(2)]
  box = {'state': state}

  def run(i):
    box['state'], m = step(box['state'], batches[i % 2], rng, None)
    return m
  compile_s, step_s = _time(run, spec['steps'])
  out['at_once'] = {'compile_s': round(compile_s, 1), 'step_s': round(step_s, 4),
                    'subject_steps_per_s': round(k / step_s, 3)}
  return out


def _run_worker(spec: dict, n_devices: int) -> dict:
  env = dict(os.environ)
  if _PLATFORM.value == 'cpu':
    env['JAX_PLATFORMS'] = 'cpu'
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={n_devices}')
  cmd = [sys.executable, '-m', 'dpg_jax.bench_scale', f'--worker={json.dumps(spec)}']
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'worker {spec} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(b):
  return f'{b / 2 ** 30:.2f} GiB'


def main(argv):
  del argv
  if _WORKER.value:
    spec = json.loads(_WORKER.value)
    from dpg_jax import models  # pylint: disable=g-import-not-at-top
    models.quiet_diffusers()
    fn = {'devices': _worker_devices, 'memory': _worker_memory,
          'subjects': _worker_subjects}[spec['what']]
    print(json.dumps(fn(spec)))
    return
  if _WHAT.value == 'devices':
    print('tiny SD, batch', _BATCH.value, '(+ as many class images), text encoder trained')
    print('devices | layout    | compile s | step s | params+opt bytes/device')
    for n in [int(x) for x in _DEVICES.value.split(',')]:
      r = _run_worker({'what': 'devices', 'batch_size': _BATCH.value, 'steps': _STEPS.value}, n)
      for layout in ('replicate', 'fsdp'):
        if layout in r:
          x = r[layout]
          print(f'{n:7d} | {layout:9s} | {x["compile_s"]:9.1f} | {x["step_s"]:6.3f} | '
                f'{x["params_opt_bytes_per_device"]:,}')
  elif _WHAT.value == 'memory':
    for n in [int(x) for x in _DEVICES.value.split(',')]:
      r = _run_worker({'what': 'memory', 'batch_size': _BATCH.value,
                       'resolution': _RES.value, 'layouts': ['replicate', 'fsdp']}, n)
      print(f'SD1.4 shapes, {r["resolution"]} px, batch {r["batch_size"]}+{r["batch_size"]}, '
            f'text encoder trained, fp32 AdamW, {n} devices; compile-only peak RSS '
            f'{_gib(r["peak_rss_bytes"])}')
      print('layout    | state/device | arguments | temporaries | aliased | XLA peak/device | '
            'compile s')
      for layout in ('replicate', 'fsdp'):
        x = r[layout]
        print(f'{layout:9s} | {_gib(x["state_bytes_per_device"])} | {_gib(x["argument_bytes"])} | '
              f'{_gib(x["temp_bytes"])} | {_gib(x["alias_bytes"])} | '
              f'{_gib(x["peak_estimate_bytes"])} | {x["compile_s"]}')
  else:
    ks = [int(x) for x in _SUBJECTS.value.split(',')]
    n = max(ks)
    print(f'tiny SD, batch {_BATCH.value}, {n} forced devices; K subjects at once '
          '(vmapped, subject axis) vs K sequential single-subject runs')
    base = _run_worker({'what': 'subjects', 'subjects': 1, 'batch_size': _BATCH.value,
                        'steps': _STEPS.value}, 1)
    single = base['at_once']['step_s']
    print('K | at once step s | subject-steps/s at once | K sequential subject-steps/s | speed-up')
    for k in ks:
      r = base if k == 1 else _run_worker({'what': 'subjects', 'subjects': k,
                                           'batch_size': _BATCH.value, 'steps': _STEPS.value}, k)
      a = r['at_once']
      print(f'{k} | {a["step_s"]:.3f} | {a["subject_steps_per_s"]:.2f} | {1 / single:.2f} | '
            f'{a["subject_steps_per_s"] * single:.2f}x')


if __name__ == '__main__':
  app.run(main)
