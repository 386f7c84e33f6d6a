"""K subjects personalised at once, in one job on one mesh.

The paper's recipe trains one subject with batch 1: on a pod slice that keeps
one device busy and the rest idle. Here the trainable state (UNet, text
encoder if trained, optimiser, DPG critics) gets a leading subject axis, the
step is `jax.vmap`ped over it, and that axis is split over the mesh's
'subject' axis: each device group trains its own subject. The frozen base
(VAE, a frozen text encoder, reward encoders) is one shared copy; per-subject
inputs (reference embeddings of the rewards) are stacked. This suits models
whose K trainable copies fit in memory (the tiny models, LoRA-sized subsets);
SD1.4 full fine-tuning needs one subject per device group.

Each subject keeps its own workdir with exactly what a single-subject run
writes there (checkpoints of its own `TrainState`, metrics, TensorBoard,
previews, export), so `--mode=sample`, the evaluation and a later single
resume all read it as usual. The result of each subject equals a separate
single-subject run (tests/test_multisubject.py). The configs may differ only
in `data.*` (the subject); the step is vmapped, so each subject's
random stream is its own run's.
"""
import functools
import math
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import dpg as dpg_lib
from dpg_jax import export as export_lib
from dpg_jax import fileio
from dpg_jax import preemption
from dpg_jax import run_config
from dpg_jax import sampling
from dpg_jax import sharding
from dpg_jax import train
from dpg_jax import writers

# Keys in which the subjects' configs may differ (everything else is shared).
PER_SUBJECT_KEYS = ('data.',)


def check_configs(configs) -> None:
  """Refuses configs that differ outside PER_SUBJECT_KEYS (one line, naming the key)."""
  if not configs:
    raise ValueError('multisubject.train_subjects: no subject configs given.')
  flat = [run_config.flatten(run_config.config_dict(c)) for c in configs]
  for i, f in enumerate(flat[1:], 1):
    for key in sorted(set(flat[0]) | set(f)):
      if key.startswith(PER_SUBJECT_KEYS):
        continue
      if flat[0].get(key) != f.get(key):
        raise ValueError(f'subject {i} config key {key}={f.get(key)!r} differs from subject 0\'s '
                         f'{flat[0].get(key)!r}: subjects trained at once share everything but '
                         'data.*.')


def subject_mesh(k: int, devices=None):
  """('subject', 'data') mesh: gcd(K, devices) subject groups, the rest on data."""
  devices = list(jax.devices() if devices is None else devices)
  s = math.gcd(k, len(devices))
  return sharding.make_mesh(len(devices) // s, devices, subject=s)


def subject_step(spec, mesh, frozen_axes=None):
  """The train step over stacked subjects: vmapped, inside a shard_map manual
  over 'subject' (each device group steps its own subjects; 'data'/'fsdp' stay
  automatic). Left to SPMD propagation alone, XLA:CPU partitioned the vmapped
  step over the subject axis wrongly (subjects' losses mixed, 5e-3 off)."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  inner = jax.vmap(functools.partial(train.train_step, spec), in_axes=(0, 0, 0, frozen_axes))
  frozen_specs = P() if frozen_axes is None else jax.tree.map(
      lambda a: P() if a is None else P(sharding.SUBJECT), frozen_axes,
      is_leaf=lambda a: a is None)
  lead = P(sharding.SUBJECT)
  return jax.shard_map(inner, mesh=mesh, in_specs=(lead, lead, lead, frozen_specs),
                       out_specs=(lead, lead), axis_names={sharding.SUBJECT}, check_vma=False)


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _shared_axes(trees):
  """in_axes per leaf: None where every subject holds the very same array
  (shared frozen base), 0 where they differ (stacked)."""
  return jax.tree.map(lambda *xs: None if all(x is xs[0] for x in xs) else 0, *trees)


def _stack_frozen(trees, axes, mesh):
  def one(axis, *xs):
    if axis is None:
      return xs[0]
    return sharding.put_global(np.stack([np.asarray(x) for x in xs]),
                               jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                                   sharding.SUBJECT)))
  return jax.tree.map(one, axes, *trees)


def _subject(tree, i: int):
  """Subject i's slice of a stacked tree (a jitted gather: multi-host safe)."""
  return jax.tree.map(lambda x: x[i], tree)


class _Subject:
  """Host-side pieces of one subject."""

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = train.check_workdir(workdir)
    self.inputs = fileio.local_dir(self.workdir)
    self.checkpointer = ckpt_lib.Checkpointer(fileio.join(self.workdir, 'checkpoints'),
                                              max_to_keep=config.max_to_keep)
    self.latents = self.prompt_batch = self.dpg = self.writer = None


def train_subjects(configs, workdirs) -> list:
  """Trains len(configs) subjects at once; each into its workdir as `train.train_and_evaluate`.

  Resumes from the newest step every subject has a checkpoint of. Returns the
  per-subject final TrainStates (slices of the stacked state).
  """
  if len(configs) != len(workdirs):
    raise ValueError(f'{len(configs)} configs for {len(workdirs)} workdirs.')
  check_configs(configs)
  for c in configs:
    train.validate_config(c)
  config = configs[0]
  k = len(configs)
  is_main = jax.process_index() == 0
  subjects = []
  try:
    for c, w in zip(configs, workdirs):
      subjects.append(_Subject(c, w))
    checked = {}
    for s in subjects:
      checked[s.workdir] = train._check_resume_config(  # pylint: disable=protected-access
          s.checkpointer, s.config, s.workdir)
      if is_main:
        run_config.write_config_json(s.workdir, s.config)
    mesh = subject_mesh(k)
    logging.info('%d subjects at once on mesh %s', k, dict(mesh.shape))
    images = [train.load_instance_images(s.config, s.inputs)[0] for s in subjects]
    sd, params = train.load_model(config, subjects[0].inputs)
    samplers = train._SamplerCache(sd, config.data.resolution,  # pylint: disable=protected-access
                                   config.sample.batch_size, sharding.make_mesh(1))
    prompts = []
    for s, imgs in zip(subjects, images):
      s.latents, s.prompt_batch, prompt = train._prepare_latents(  # pylint: disable=protected-access
          s.config, s.inputs, sd, params, imgs, samplers)
      prompts.append(prompt)
    if config.dpg.enabled:
      for s, imgs, p in zip(subjects, images, prompts):
        s.dpg = dpg_lib.DPG.build(s.config, sd, imgs, [p], s.inputs)
      counts = {s.dpg.num_references for s in subjects}
      # Only per-image references index by photo (and stack to [photos, D] per subject).
      if len(counts) > 1 and config.dpg.reference_mode == 'per_image':
        raise ValueError(f'config key dpg.reference_mode=\'per_image\': subjects trained at once '
                         f'need the same number of instance photos (got {sorted(counts)}); use '
                         "dpg.reference_mode='mean' or separate jobs.")
    spec = train.make_step_spec(sd, config, subjects[0].dpg)

    trainable = {n: params.pop(n) for n in train.trainable_params(params, config)}
    frozen_params = train._replicated(params, mesh)  # pylint: disable=protected-access
    del params
    rules = sharding.param_rules(config.mesh)
    init_rng = jax.random.PRNGKey(config.seed)
    init_all = lambda p, r: jax.vmap(lambda rr: train.init_state(spec, p, rr))(
        jnp.broadcast_to(r, (k,) + r.shape))
    shapes = jax.eval_shape(init_all, trainable, init_rng)
    state_sh = sharding.tree_shardings(mesh, shapes, rules, subject_axis=True)
    state = jax.jit(init_all, out_shardings=state_sh)(trainable, init_rng)
    del trainable

    frozen = frozen_sh = axes = None
    if spec.dpg is not None:
      per = [s.dpg.frozen_inputs(frozen_params) for s in subjects]
      axes = _shared_axes(per)
      frozen = _stack_frozen(per, axes, mesh)
      frozen_sh = jax.tree.map(
          lambda a, x: x.sharding if a is not None else sharding.replicated(mesh), axes, frozen)
    subj = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.SUBJECT))
    rng = sharding.put_global(np.stack([np.asarray(jax.random.PRNGKey(c.seed + 1))
                                        for c in configs]), subj)
    step_fn = jax.jit(
        subject_step(spec, mesh, axes),
        in_shardings=(state_sh, sharding.batch_sharded(mesh, subject_axis=True), subj, frozen_sh),
        out_shardings=(state_sh, subj), donate_argnums=(0,),
        compiler_options=sharding.compiler_options(mesh, wide_convs=spec.wide_convs))

    start = _restore(subjects, spec, state_sh, shapes, mesh, checked)
    if start:
      state = start[1]
      start = start[0]
    else:
      start = 0
    return _loop(subjects, spec, sd, frozen_params, state, step_fn, rng, frozen, mesh,
                 samplers, start)
  finally:
    for s in subjects:
      if s.writer is not None:
        s.writer.close()
      s.checkpointer.close()


def _restore(subjects, spec, state_sh, shapes, mesh, checked):
  """(step, stacked state) of the newest step all subjects saved, or None."""
  common = set.intersection(*[set(s.checkpointer.all_steps()) for s in subjects])
  if not common:
    if any(s.checkpointer.all_steps() for s in subjects):
      logging.warning('The subjects have no checkpointed step in common: starting all anew.')
    return None
  step = max(common)
  one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                                    sharding=sharding.replicated(mesh)), shapes)
  states = []
  for s in subjects:
    if checked.get(s.workdir) != step:
      meta = s.checkpointer.read_meta(step)
      run_config.check_resume(run_config.stored_config(meta, s.workdir), s.config,
                              where=f'checkpoint {s.checkpointer.step_dir(step)}')
    st, _ = s.checkpointer.restore(step, one)
    states.append(sharding.gather_to_host(st))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  stacked = jax.jit(lambda x: x, out_shardings=state_sh)(stacked)
  logging.info('Resuming %d subjects from step %d', len(subjects), step)
  del spec
  return step, stacked


def _loop(subjects, spec, sd, frozen_params, state, step_fn, rng, frozen, mesh, samplers, start):
  config = subjects[0].config
  is_main = jax.process_index() == 0
  for s in subjects:
    s.writer = writers.MetricWriter(s.workdir, resume_step=start)
  metas = [{'config': run_config.config_dict(s.config)} for s in subjects]
  chrono = writers.Chrono()

  def save(step, st):
    for i, s in enumerate(subjects):
      s.checkpointer.save(step, _subject(st, i), {'step': step, **metas[i]})

  def preview(st, step):
    p = config.sample
    if not p.prompts or p.num_images_per_prompt < 1:
      return
    sampler = samplers.get(p.scheduler, p.num_inference_steps, p.guidance_scale)
    for i, s in enumerate(subjects):
      prompts = [train.format_prompt(t, s.config) for t in p.prompts]
      all_prompts = [q for q in prompts for _ in range(p.num_images_per_prompt)]
      seeds = [p.seed + j for j in range(len(all_prompts))]
      params = sharding.gather_to_host({**frozen_params, **_subject(st, i).params})
      imgs = sampler(params, all_prompts, seeds, p.negative_prompt)
      if is_main:
        sampling.save_grid(imgs, os.path.join(s.workdir, 'samples', f'step_{step:06d}.png'),
                           ncols=p.num_images_per_prompt)
        s.writer.image(step, 'samples', sampling.image_grid(imgs, ncols=p.num_images_per_prompt))

  step = start
  with preemption.StopRequests() as stop:
    for step in range(start + 1, config.num_steps + 1):
      batches = [train.host_batch(s.latents, s.prompt_batch, step=step, config=s.config)
                 for s in subjects]
      batch = sharding.put_batch(_stack(batches), mesh, subject_axis=True)
      t0 = time.perf_counter()
      state, metrics = step_fn(state, batch, rng, frozen)
      if step == start + 1:
        jax.block_until_ready(metrics)
        chrono.first_step_done(t0)
        logging.info('First step of %d subjects %.1fs', len(subjects), chrono.compile_s)
      else:
        chrono.tick()
      stopping = stop.should_stop(step, subjects[0].checkpointer)
      must_save = (train._every(step, config.checkpoint_every)  # pylint: disable=protected-access
                   or step == config.num_steps or stopping)
      if train._every(step, config.log_every) or must_save:  # pylint: disable=protected-access
        m = jax.device_get(metrics)
        for i, s in enumerate(subjects):
          mi = {key: v[i] for key, v in m.items()}
          if not bool(mi['finite']):
            raise ckpt_lib.NonFiniteError(
                f'step {step}: subject {i} ({s.workdir}) loss={float(mi["loss"])} is not '
                'finite; stopping without writing a checkpoint.')
          scalars = {key: v for key, v in mi.items() if key != 'finite'}
          scalars['lr'] = spec.lr_schedule(step - 1)
          if np.isfinite(chrono.steps_per_sec()):
            scalars['steps_per_sec'] = chrono.steps_per_sec()
          s.writer.scalars(step, scalars)
      if must_save:
        save(step, state)
      if stopping:
        for s in subjects:
          s.checkpointer.wait()
        msg = (f'Stopped by {stop.name} at step {step}: {len(subjects)} subjects saved; rerun '
               'the same command to resume.')
        logging.warning(msg)
        raise preemption.Preempted(stop.signum, step, msg)
      if train._every(step, config.sample_every) and step != config.num_steps:  # pylint: disable=protected-access
        preview(state, step)
    if config.num_steps > start:
      preview(state, config.num_steps)
    for s in subjects:
      s.checkpointer.wait()
    if config.export:
      for i, s in enumerate(subjects):
        host = sharding.gather_to_host({**frozen_params, **_subject(state, i).params})
        if is_main:
          with fileio.staged_dir(s.workdir) as out:
            export_lib.export_pipeline(out, sd, host, export_format=s.config.export_format,
                                       fp16=s.config.export_fp16)
        del host
  if chrono.compile_s is not None:
    logging.info('%d subjects: first step %.1fs, then %.2f steps/s', len(subjects),
                 chrono.compile_s, chrono.steps_per_sec())
  return [_subject(state, i) for i in range(len(subjects))]
