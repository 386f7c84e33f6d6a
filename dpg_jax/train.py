"""Train state, the jitted train step, and the training loop.

The step is a pure function `(state, batch, rng) -> (state, metrics)` compiled
once with explicit shardings and a donated state. Everything with side effects
(logging, checkpoints, preview images, export) stays in `train_and_evaluate`.
With `config.dpg.enabled` the same step also runs the DPG critic and policy
update (Algorithm 1; `dpg_jax/dpg.py`) from the same UNet forward pass.
"""
import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import string
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from dpg_jax import adapters
from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import data as data_lib
from dpg_jax import diffusion
from dpg_jax import dpg as dpg_lib
from dpg_jax import export as export_lib
from dpg_jax import fileio
from dpg_jax import host_memory
from dpg_jax import models
from dpg_jax import optimizer as optimizer_lib
from dpg_jax import preemption
from dpg_jax import run_config
from dpg_jax import sampling
from dpg_jax import scale_augment
from dpg_jax import sharding
from dpg_jax import writers


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # trainable: {'unet': ..., 'text_encoder': ... (if trained)}
  opt_state: Any
  critic: Any = None   # DPG critics' states (dict by reward name), None without DPG


# --------------------------------------------------------------------------- #
# The step
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
  """Everything static the step closes over (small constants and modules only)."""
  sd: models.StableDiffusion
  alphas_cumprod: np.ndarray     # [T] float32
  batch_size: int
  grad_accum_steps: int
  grad_accum_unroll: int         # k <= this: straight-line code; larger k: lax.scan
  train_text_encoder: bool
  prior_preservation: bool
  prior_loss_weight: float
  prediction_type: str
  optimizer: optax.GradientTransformation
  lr_schedule: optax.Schedule    # the optimiser's own, for logging
  dpg: Any = None                # dpg_lib.DPG or None
  peft: Any = None               # an adapters method (Custom Diffusion, LoRA) or None
  wide_convs: bool = False       # SD1.x-width UNet: XLA:CPU options for big convolutions


# UNets at least this wide (SD1.x: 320-1280 channels; the toy world: 32-64) get
# XLA:CPU's options for big convolutions (sharding.compiler_options).
WIDE_CONV_CHANNELS = 256


def make_step_spec(sd, config, dpg: 'dpg_lib.DPG | None' = None, peft=None) -> StepSpec:
  pred_type = config.prediction_type or sd.prediction_type
  if pred_type not in diffusion.PREDICTION_TYPES:
    raise ValueError(f"config key prediction_type={pred_type!r}: expected 'epsilon' or "
                     "'v_prediction' (or '' for the scheduler's).")
  opt = optimizer_lib.make_optimizer(config)
  return StepSpec(
      sd=sd, alphas_cumprod=np.asarray(sd.alphas_cumprod()), batch_size=config.batch_size,
      grad_accum_steps=config.grad_accum_steps,
      grad_accum_unroll=config.get('grad_accum_unroll', 8),
      train_text_encoder=adapters.text_in_step(config),
      prior_preservation=config.prior_preservation, prior_loss_weight=config.prior_loss_weight,
      prediction_type=pred_type, optimizer=opt.tx, lr_schedule=opt.lr_schedule, dpg=dpg,
      peft=peft,
      wide_convs=max(sd.unet.block_out_channels) >= WIDE_CONV_CHANNELS)


def _mse(a, b):
  return jnp.mean(jnp.square(a - b))


def _model_fns(spec: StepSpec, p, frozen, rng):
  """(encode_text(ids), predict(x_t, t, context)) of the trainable params `p`."""
  if spec.peft is not None:  # adapters on the frozen base, which the step gets as an input
    return spec.peft.model_fns(spec.sd, p, frozen['peft'], jax.random.fold_in(rng, 0x10A))
  return (lambda ids: spec.sd.encode_text(p['text_encoder'], ids),
          lambda x, t, c: spec.sd.predict(p['unet'], x, t, c))


def _micro_grads(spec: StepSpec, params, critic, frozen, micro, rng):
  """Loss, grads and DPG aux of one micro-batch (one UNet forward)."""
  n = micro['instance_mean'].shape[0]
  has_prior = spec.prior_preservation and 'class_mean' in micro
  mean, std = micro['instance_mean'], micro['instance_std']
  if has_prior:
    mean = jnp.concatenate([mean, micro['class_mean']])
    std = jnp.concatenate([std, micro['class_std']])
  abar = jnp.asarray(spec.alphas_cumprod)
  x0, eps, t, x_t = diffusion.training_example(rng, mean, std, abar, spec.sd.scaling_factor)
  target = diffusion.target(spec.prediction_type, x0, eps, abar[t])

  def loss_fn(p):
    encode, predict = _model_fns(spec, p, frozen, rng)
    if spec.train_text_encoder:
      ids = micro['instance_ids']
      if has_prior:
        ids = jnp.concatenate([ids, micro['class_ids']])
      context = encode(ids)
    else:
      context = micro['instance_context']
      if has_prior:
        context = jnp.concatenate([context, micro['class_context']])
    pred = predict(x_t, t, context)
    if 'instance_mask' in micro:  # Custom Diffusion's scale augmentation: the valid region
      inst_mse = scale_augment.masked_mse(pred[:n], target[:n], micro['instance_mask'])
    else:
      inst_mse = _mse(pred[:n], target[:n])
    prior_mse = _mse(pred[n:], target[n:]) if has_prior else jnp.zeros(())
    terms = {'instance_loss': inst_mse, 'prior_loss': prior_mse}
    if spec.dpg is None:
      loss = inst_mse + spec.prior_loss_weight * prior_mse
      return loss, (terms, None)
    loss, dpg_terms, dpg_aux = spec.dpg.policy_loss(
        critic, frozen, pred=pred[:n], x0=x0[:n], eps=eps[:n], x_t=x_t[:n], t=t[:n],
        alphas_cumprod=spec.alphas_cumprod, prediction_type=spec.prediction_type,
        micro=micro)
    loss = loss + spec.prior_loss_weight * prior_mse
    return loss, ({**terms, **dpg_terms}, dpg_aux)

  (loss, (terms, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, terms, aux, grads


def micro_batch(batch, k: int, i: int):
  """Micro-batch i of k: rows i, i+k, i+2k, ... of the [k*B, ...] step batch.

  Strided, not contiguous: the batch is split over the `data` mesh axis in
  contiguous blocks, so every micro-batch keeps rows on every data device.
  """
  return jax.tree.map(lambda x: x.reshape((-1, k) + x.shape[1:])[:, i], batch)


def _accumulate(spec: StepSpec, state, frozen, batch, rngs):
  """Mean loss, terms and grads over the k micro-batches; DPG aux concatenated.

  One micro-batch runs as plain code. Inside any XLA loop (scan, while) the
  XLA:CPU backend lowers the backward convolutions to slow generic loops: a
  length-1 scan made the SD1.4-shape step ~11x slower. So up to
  `grad_accum_unroll` micro-batches are unrolled (compile time grows with k,
  run time does not); beyond that a scan keeps the program small.
  """
  k = spec.grad_accum_steps
  grads_of = lambda micro, r: _micro_grads(spec, state.params, state.critic, frozen, micro, r)
  if k <= spec.grad_accum_unroll:
    outs = [grads_of(batch if k == 1 else micro_batch(batch, k, i), rngs[i]) for i in range(k)]
    if k == 1:
      return outs[0]
    loss, terms, _, grads = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]) / k,
                                         *[(o[0], o[1], None, o[3]) for o in outs])
    aux = None if outs[0][2] is None else jax.tree.map(
        lambda *xs: jnp.concatenate(xs), *[o[2] for o in outs])
    return loss, terms, aux, grads

  micro_batches = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape((-1, k) + x.shape[1:]), 0, 1), batch)

  def body(carry, xs):
    micro, r = xs
    loss, terms, aux, grads = grads_of(micro, r)
    return jax.tree.map(jnp.add, carry, (loss, terms, grads)), aux

  shapes = jax.eval_shape(grads_of, jax.tree.map(lambda x: x[0], micro_batches), rngs[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0], shapes[1], shapes[3]))
  (loss, terms, grads), auxs = jax.lax.scan(body, zeros, (micro_batches, rngs[:k]))
  loss, terms, grads = jax.tree.map(lambda x: x / k, (loss, terms, grads))
  # [k, B, ...] -> [k*B, ...] in micro-batch order, as the unrolled path.
  aux = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), auxs)
  return loss, terms, aux, grads


def train_step(spec: StepSpec, state: TrainState, batch: dict, rng, frozen=None):
  """One optimiser update (and, with DPG, one critic update). Pure."""
  rng = jax.random.fold_in(rng, state.step)
  rngs = jax.random.split(rng, spec.grad_accum_steps + 1)
  loss, terms, aux, grads = _accumulate(spec, state, frozen, batch, rngs)

  updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, **terms,
             'grad_norm': optax.tree.norm(grads),
             'update_norm': optax.tree.norm(updates),
             'param_norm': optax.tree.norm(params)}

  critic = state.critic
  if spec.dpg is not None:
    # Critic step after the policy step (as the authors), on the detached
    # quantities of the same forward pass: the two updates never share grads.
    critic, critic_metrics = spec.dpg.critic_update(critic, frozen, aux, rngs[-1])
    metrics.update(critic_metrics)
  metrics['finite'] = (jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
                       & (metrics.get('dpg/critic_nonfinite', 0.0) == 0))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            critic=critic)
  return new_state, metrics


def init_state(spec: StepSpec, trainable, rng) -> TrainState:
  critic = spec.dpg.init_critic(rng) if spec.dpg is not None else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                    opt_state=spec.optimizer.init(trainable), critic=critic)


def compile_train_step(spec: StepSpec, mesh, state_shardings, frozen_shardings=None):
  """jit with explicit in/out shardings and the state donated."""
  batch_sh = sharding.batch_sharded(mesh)
  repl = sharding.replicated(mesh)
  step = sharding.batch_split_activations(functools.partial(train_step, spec), mesh)
  return jax.jit(
      step,
      in_shardings=(state_shardings, batch_sh, repl, frozen_shardings),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,),
      compiler_options=sharding.compiler_options(mesh, wide_convs=spec.wide_convs))


def abstract_state(spec: StepSpec, trainable, rng, mesh, param_sharding='replicate'):
  """(state as ShapeDtypeStructs with their shardings, the shardings): no allocation."""
  shapes = jax.eval_shape(functools.partial(init_state, spec), trainable, rng)
  shardings = sharding.tree_shardings(mesh, shapes, param_sharding)
  abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings


def create_sharded_state(spec: StepSpec, trainable, rng, mesh, param_sharding='replicate', *,
                         donate_trainable: bool = False):
  """State created already laid out on the mesh (no host copy of opt state).

  donate_trainable: the trainable arrays become the state's params without a
  copy where they already sit on the right devices, and are unusable
  afterwards (the step donates the state). At SD1.4 size every extra copy of
  the UNet is 3.4 GB of peak memory; real runs and the benchmark donate.
  """
  _, shardings = abstract_state(spec, trainable, rng, mesh, param_sharding)
  params = jax.tree.map(functools.partial(sharding.place, donate=donate_trainable),
                        trainable, shardings.params)

  def init_rest(p, r):   # everything but the params, created on the mesh
    return init_state(spec, p, r).replace(params=None)

  rest = jax.jit(init_rest, out_shardings=shardings.replace(params=None))(params, rng)
  return rest.replace(params=params), shardings


@functools.cache
def _cache_hits() -> list:
  """[n]: persistent compilation cache hits so far in this process (JAX's
  monitoring event, counted from the first call on)."""
  hits = [0]

  def count(event, **kwargs):
    del kwargs
    if event == '/jax/compilation_cache/cache_hits':
      hits[0] += 1

  jax.monitoring.register_event_listener(count)
  return hits


def compile_ahead(step_fn, abstract, batch, rng, frozen, timings: dict | None = None):
  """The step compiled for `abstract` state, before any state is allocated.

  XLA:CPU's compile of the SD1.4-shape step takes ~2 GiB of host memory for a
  minute; compiled first, that peak never adds to the state's 9.6 GiB.
  timings (if given) gets trace_s, xla_compile_s and cache_hit (the executable
  was loaded from the persistent compilation cache).
  """
  hits = _cache_hits()
  t0 = time.perf_counter()
  lowered = step_fn.lower(abstract, batch, rng, frozen)
  t1 = time.perf_counter()
  before = hits[0]
  compiled = lowered.compile()   # a persistent-cache hit only loads the executable
  t2 = time.perf_counter()
  # The lowered module (~0.6 GiB at SD1.4 size) goes before the trim, so that
  # its pages go back to the OS with the compiler's leftovers.
  del lowered
  host_memory.trim()
  if timings is not None:   # tracing is never cached; the XLA compile is
    timings.update(trace_s=t1 - t0, xla_compile_s=t2 - t1, cache_hit=hits[0] > before)
  return compiled, t2 - t0


def trainable_params(params, config) -> dict:
  """The components the policy update trains (the rest stays frozen)."""
  names = ('unet', 'text_encoder') if config.train_text_encoder else ('unet',)
  return {n: params[n] for n in names}


def conditioning_rows(sd, text_encoder_params, config, ids) -> dict:
  """The step batch's prompt part, one row per example of the [k*B] batch.

  ids: token ids [1 or 2, L] of the instance (and class) prompt. A trained text
  encoder gets ids (it runs inside the step); a frozen one is run once here and
  the step gets its embeddings.
  """
  gb = config.batch_size * config.grad_accum_steps
  names = ('instance', 'class')[:2 if config.prior_preservation else 1]
  ids = np.asarray(ids)[:len(names)]
  if adapters.text_in_step(config):
    rows, kind = ids, 'ids'
  else:
    rows, kind = np.asarray(jax.jit(sd.encode_text)(text_encoder_params, ids)), 'context'
  return {f'{n}_{kind}': np.repeat(rows[i:i + 1], gb, 0) for i, n in enumerate(names)}


def host_batch(latents, conditioning: dict, *, step: int, config) -> dict:
  """The full host batch of one step: latents of `step` plus conditioning."""
  if isinstance(latents, scale_augment.AugmentedLatents):  # per-row prompts and masks
    return scale_augment.host_batch(latents, conditioning, step=step, config=config)
  gb = config.batch_size * config.grad_accum_steps
  batch = data_lib.sample_batch(latents, step=step, seed=config.seed, batch_size=gb)
  batch.update(conditioning)
  return batch


# --------------------------------------------------------------------------- #
# Run set-up (host side)
# --------------------------------------------------------------------------- #
def check_workdir(workdir: str) -> str:
  """The workdir (absolute path, or a gs:// / file:// URL: dpg_jax/fileio.py), writable."""
  workdir = fileio.normalize(workdir)
  try:
    fileio.makedirs(workdir)
    probe = fileio.path(fileio.join(workdir, f'.write_test_{os.getpid()}_{jax.process_index()}'))
    probe.write_text('ok')
    probe.unlink()
  except (OSError, ValueError) as e:
    raise PermissionError(f'--workdir {workdir} is not writable: {e}') from e
  return workdir


_PLACEHOLDERS = ('identifier', 'class_noun')


def _check_template(key: str, template: str) -> None:
  """Every {field} of a prompt template is one format_prompt fills."""
  try:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
  except ValueError as e:  # unmatched brace
    raise ValueError(f'config key {key}={template!r}: {e} (write {{{{ and }}}} for a '
                     'literal brace).') from None
  unknown = [f for f in fields if f not in _PLACEHOLDERS]
  if unknown:
    raise ValueError(f'config key {key}={template!r}: unknown placeholder '
                     f'{{{unknown[0]}}}; expected only {{identifier}} and {{class_noun}}.')


def validate_config(config) -> None:
  """Cheap checks that fail before any model load or compile."""
  if config.num_steps < 0:
    raise ValueError(f'config key num_steps={config.num_steps}: expected >= 0.')
  if config.batch_size < 1:
    raise ValueError(f'config key batch_size={config.batch_size}: expected >= 1.')
  if config.grad_accum_steps < 1:
    raise ValueError(f'config key grad_accum_steps={config.grad_accum_steps}: expected >= 1.')
  lr = config.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ValueError(f'config key learning_rate={lr!r}: expected a finite number > 0.')
  for key in ('checkpoint_every', 'log_every', 'sample_every'):
    v = config[key]
    if not isinstance(v, int) or v < 0:
      raise ValueError(f'config key {key}={v!r}: expected an integer >= 0 (0 = only at the end).')
  if not isinstance(config.max_to_keep, int) or config.max_to_keep < 1:
    raise ValueError(f'config key max_to_keep={config.max_to_keep!r}: expected an integer '
                     '>= 1 (checkpoints kept on disk; the newest is the resume point).')
  if config.data.resolution % 8:
    raise ValueError(f'config key data.resolution={config.data.resolution}: expected a '
                     'multiple of 8 (the VAE downsamples by 8).')
  if not (config.model.pretrained or config.model.tiny):
    raise ValueError('config key model.pretrained is empty and model.tiny is not set: '
                     'give a hub id or a local diffusers directory.')
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config key model.dtype={config.model.dtype!r}: expected 'float32' or "
                     "'bfloat16'.")
  if config.sample.scheduler not in sampling.SCHEDULERS:
    raise ValueError(f'config key sample.scheduler={config.sample.scheduler!r}: expected one of '
                     f'{sorted(sampling.SCHEDULERS)}.')
  n_inst = sum(1 for x in (config.data.instance_dir, config.data.subject, config.data.synthetic) if x)
  if n_inst != 1:
    raise ValueError('exactly one of config keys data.instance_dir, data.subject, '
                     f'data.synthetic must be set (got {n_inst}).')
  _check_template('data.instance_prompt', config.data.instance_prompt)
  _check_template('data.class_prompt', config.data.class_prompt)
  for i, p in enumerate(config.sample.prompts):
    _check_template(f'sample.prompts[{i}]', p)
  optimizer_lib.make_optimizer(config)  # raises naming a bad optimiser key
  export_lib.check_config(config)
  adapters.validate_config(config)
  scale_augment.validate_config(config)
  if config.dpg.enabled:
    dpg_lib.validate_config(config)


def resolve_pretrained(config, workdir: str) -> str:
  if config.model.tiny:
    from dpg_jax import tiny  # pylint: disable=g-import-not-at-top
    path = config.model.pretrained or os.path.join(workdir, 'pretrained_tiny')
    if jax.process_index() == 0:
      tiny.build_tiny_sd(path, spec=config.model.tiny, seed=config.seed)
    _sync('dpg_jax:tiny_sd_built')  # the others read what process 0 wrote
    return path
  return config.model.pretrained


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def load_model(config, workdir: str):
  path = resolve_pretrained(config, workdir)
  return models.load_stable_diffusion(
      path, revision=config.model.revision, weights_format=config.model.weights_format,
      dtype=config.model.dtype, remat=config.model.remat, attention=config.model.attention,
      remat_policy=config.model.remat_policy)


_SOURCE_MARKER = '.source.json'


def _workdir_subject_folder(workdir: str, source: dict) -> tuple[str, bool]:
  """<workdir>/instance_images for `source`; (folder, up to date).

  A folder written for another source (a switched data.subject, or a synthetic
  subject before) is emptied first: two subjects' photos never mix.
  """
  folder = os.path.join(workdir, 'instance_images')
  marker = os.path.join(folder, _SOURCE_MARKER)
  try:
    with open(marker, encoding='utf-8') as f:
      current = json.load(f) == source
  except (OSError, ValueError):
    current = False
  if not current and os.path.isdir(folder) and os.listdir(folder):
    logging.warning('%s holds photos of another source than %s: replacing them.',
                    folder, json.dumps(source))
    shutil.rmtree(folder)
  return folder, current


def _mark_subject_folder(folder: str, source: dict) -> None:
  fileio.atomic_write_text(os.path.join(folder, _SOURCE_MARKER), json.dumps(source) + '\n')


def load_instance_images(config, workdir: str):
  """The subject's photos: synthetic, a dataset subject, or a folder."""
  d = config.data
  folder, key = d.instance_dir, 'data.instance_dir'
  if d.synthetic or d.subject:
    source = ({'synthetic': True} if d.synthetic else
              {'dataset': d.dataset, 'subject': d.subject})
    key = 'data.synthetic' if d.synthetic else 'data.subject'
    if jax.process_index() == 0:
      folder, _ = _workdir_subject_folder(workdir, source)
      if d.synthetic:  # reuses a complete set with the same seed and resolution
        data_lib.make_synthetic_subject(folder, resolution=d.resolution, seed=config.seed)
      else:
        from dpg_jax import datasets  # pylint: disable=g-import-not-at-top
        subject = datasets.load_subject(d.subject, dataset=d.dataset,
                                        manual_dir=d.dataset_dir or None)
        # export() writes the photos with their licence/attribution files.
        subject.export(folder)
      _mark_subject_folder(folder, source)
    _sync('dpg_jax:instance_images')
    folder = os.path.join(workdir, 'instance_images')
  return data_lib.load_images(folder, d.resolution, center_crop=d.center_crop,
                              seed=config.seed, min_images=d.min_instance_images,
                              config_key=key)


def format_prompt(template: str, config) -> str:
  return data_lib.format_prompt(template, identifier=config.data.identifier,
                                class_noun=config.data.class_noun, config_key='sample.prompts')


class _SamplerCache:
  """One compiled sampler per distinct setting (class images vs previews)."""

  def __init__(self, sd, resolution, batch_size, mesh):
    self._args = (sd, resolution, batch_size, mesh)
    self._cache = {}

  def get(self, scheduler, steps, guidance) -> sampling.Sampler:
    key = (scheduler, steps, guidance)
    if key not in self._cache:
      sd, res, bs, mesh = self._args
      self._cache[key] = sampling.Sampler(sd, resolution=res, scheduler=scheduler,
                                          num_inference_steps=steps, guidance_scale=guidance,
                                          batch_size=bs, mesh=mesh)
    return self._cache[key]


@dataclasses.dataclass
class Run:
  """What set-up hands the loop.

  After set-up the only device arrays are `state`, `frozen_params` (the parts
  previews and the export need beside the state: the VAE, and the text
  encoder unless it trains), the DPG step inputs `step_frozen` (which share the
  VAE of `frozen_params`) and `rng`: the loaded pretrained copy is gone.
  """
  sd: models.StableDiffusion
  spec: StepSpec
  mesh: Any
  state: TrainState
  step_fn: Any
  frozen_params: dict
  step_frozen: Any
  rng: jax.Array
  latents: data_lib.SubjectLatents
  prompt_batch: dict
  samplers: _SamplerCache
  checkpointer: ckpt_lib.Checkpointer
  start: int
  workdir: str


def _check_resume_config(checkpointer, config, workdir) -> int | None:
  """Refuses a config that does not match the newest checkpoint's (no model loaded yet)."""
  step, meta = checkpointer.latest_meta()
  if step is not None:
    run_config.check_resume(run_config.stored_config(meta, workdir), config,
                            where=f'checkpoint {checkpointer.step_dir(step)}')
  return step


def _prepare_latents(config, workdir, sd, params, images, samplers):
  """Class images (generated once), image latents and the prompt conditioning."""
  instance_prompt, class_prompt = data_lib.resolve_prompts(config)
  class_images = None
  if config.prior_preservation and not scale_augment.real_prior(config):
    class_dir = data_lib.resolve_class_dir(config, workdir)
    gen = samplers.get(config.sample.scheduler, config.data.class_sample_steps,
                       config.data.class_guidance_scale)
    base_seed = 1_000_003 * (config.seed + 1)
    generate = lambda n, start: gen(params, [class_prompt] * n,
                                    [base_seed + start + i for i in range(n)])
    class_images = data_lib.ensure_class_images(
        class_dir, config.data.num_class_images, config.data.resolution, generate,
        batch_size=config.sample.batch_size)

  enc = jax.jit(sd.encode_images)
  encode_fn = lambda x: enc(params['vae'], x)
  inst_mean, inst_std = data_lib.encode_images(encode_fn, images, batch_size=8,
                                               random_flip=config.data.random_flip)
  cls_mean = cls_std = None
  if class_images is not None:
    cls_mean, cls_std = data_lib.encode_images(encode_fn, class_images, batch_size=8,
                                               random_flip=config.data.random_flip)
  latents = data_lib.SubjectLatents(inst_mean, inst_std, cls_mean, cls_std)

  ids = sd.tokenize([instance_prompt, class_prompt])
  prompt_batch = conditioning_rows(sd, params['text_encoder'], config, ids)
  if scale_augment.enabled(config):  # a bank of augmented crops; captioned class images
    latents, prompt_batch = scale_augment.prepare(
        config, sd, params, images, latents,
        lambda: scale_augment.read_captioned_dir(
            config.data.class_dir, config.data.resolution, center_crop=config.data.center_crop,
            seed=config.seed), text_in_step=adapters.text_in_step(config))
  return latents, prompt_batch, instance_prompt


def _replicated(tree, mesh):
  """Replicated on the mesh; on one process the loaded arrays move, not copy."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding.replicated(mesh))
  return sharding.put_replicated(tree, mesh)


def _on_mesh_once(tree, frozen_params, mesh):
  """Replicated step inputs; `frozen_params`' own leaves are reused, not copied
  (the VAE), the rest is placed as `_replicated` does (reward encoders)."""
  own = {id(x) for x in jax.tree.leaves(frozen_params)}
  return jax.tree.map(lambda x: x if id(x) in own else _replicated(x, mesh), tree)


def set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Everything before the first step: checks, data, model, state, restore."""
  validate_config(config)
  workdir = check_workdir(workdir)
  is_main = jax.process_index() == 0
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                       max_to_keep=config.max_to_keep)
  try:
    checked = _check_resume_config(checkpointer, config, workdir)
    if is_main:
      run_config.write_config_json(workdir, config)
    mesh = sharding.mesh_from_config(config.mesh)
    inputs = fileio.local_dir(workdir)  # files readers open locally (a URL workdir: staged)
    # Data first: a bad instance folder fails in seconds, before any model load.
    images, paths = load_instance_images(config, inputs)
    logging.info('%d instance images (%s)', len(paths), os.path.dirname(paths[0]))
    sd, params = load_model(config, inputs)
    sd, params, peft = adapters.build(config, sd, params)  # Custom Diffusion: new tokens
    samplers = _SamplerCache(sd, config.data.resolution, config.sample.batch_size, mesh)
    latents, prompt_batch, instance_prompt = _prepare_latents(
        config, inputs, sd, params, images, samplers)

    dpg = None
    if config.dpg.enabled:
      dpg = dpg_lib.DPG.build(config, sd, images, [instance_prompt], inputs)
    spec = make_step_spec(sd, config, dpg, peft)
    # The loaded trainable weights are handed to the state (no copy where they
    # already sit on the mesh; each extra UNet copy is 3.4 GB at SD1.4 size);
    # the frozen rest is placed once and shared by the step, the previews and
    # the export.
    if peft is None:
      trainable = {name: params.pop(name) for name in trainable_params(params, config)}
    else:  # new arrays (selected copies, adapters); the whole base stays frozen
      trainable = peft.init_trainable(params, jax.random.PRNGKey(config.seed + 3))
    init_rng = jax.random.PRNGKey(config.seed)
    rules = sharding.param_rules(config.mesh)
    abstract, state_sh = abstract_state(spec, trainable, init_rng, mesh, rules)
    frozen_params = _replicated(params, mesh)
    del params
    step_frozen = frozen_sh = None
    if dpg is not None or peft is not None:
      step_frozen = dict(dpg.frozen_inputs(frozen_params) if dpg is not None else {})
      if peft is not None:
        step_frozen['peft'] = peft.frozen_base(frozen_params)
      step_frozen = _on_mesh_once(step_frozen, frozen_params, mesh)
      frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), step_frozen)
    rng = sharding.put_global(np.asarray(jax.random.PRNGKey(config.seed + 1)),
                              sharding.replicated(mesh))
    step_fn = None  # num_steps=0 (a base-model row of an evaluation): nothing to compile
    if config.num_steps > 0:
      first_batch = sharding.put_batch(
          host_batch(latents, prompt_batch, step=1, config=config), mesh)
      timings = {}
      step_fn, compile_s = compile_ahead(compile_train_step(spec, mesh, state_sh, frozen_sh),
                                         abstract, first_batch, rng, step_frozen, timings)
      logging.info('Compiled the train step in %.1fs%s', compile_s,
                   ' (loaded from the persistent compilation cache)' if timings['cache_hit']
                   else '')
      del first_batch
    state, _ = create_sharded_state(spec, trainable, init_rng, mesh, rules,
                                    donate_trainable=True)
    del trainable

    start = 0
    if checkpointer.all_steps():
      del state  # restore into the layout without holding a second state
      check = lambda step, meta: step == checked or run_config.check_resume(
          run_config.stored_config(meta, workdir), config,
          where=f'checkpoint {checkpointer.step_dir(step)}')
      start, state, _ = checkpointer.restore_latest(abstract, check_meta=check)
      logging.info('Resuming from step %d', start)
    gc.collect()  # the loaded copies go now, not at some later collection
    return Run(sd=sd, spec=spec, mesh=mesh, state=state, step_fn=step_fn,
               frozen_params=frozen_params, step_frozen=step_frozen, rng=rng, latents=latents,
               prompt_batch=prompt_batch, samplers=samplers, checkpointer=checkpointer,
               start=int(start), workdir=workdir)
  except BaseException:
    checkpointer.close()
    raise


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #
def _every(step: int, period: int) -> bool:
  """Periodic action at `step`; period 0 = never (the caller adds 'at the end')."""
  return period > 0 and step % period == 0


def _summary(workdir, config, step, checkpointer, exported) -> str:
  samples = os.path.join(workdir, 'samples')
  lines = [f'Finished at step {step} (num_steps={config.num_steps}); outputs in {workdir}:',
           f'  checkpoints  {checkpointer.directory} (steps {checkpointer.all_steps()})',
           f'  samples      {samples if fileio.isdir(samples) else "none (sample.prompts=())"}',
           f'  metrics      {os.path.join(workdir, "metrics.jsonl")}',
           f'  TensorBoard  tensorboard --logdir {os.path.join(workdir, "tb")}',
           f'  export       {exported or "off (config.export=False)"}']
  return '\n'.join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Train (resuming from <workdir>/checkpoints if present), preview, export.

  SIGTERM / SIGINT (or the multi-host preemption sync point) save the current
  step and raise `preemption.Preempted` (exit code 128 + signal): rerunning
  the same command resumes exactly where it stopped.
  """
  t_setup = time.perf_counter()
  run = set_up(config, workdir)
  workdir = run.workdir
  is_main = jax.process_index() == 0
  checkpointer, start, state = run.checkpointer, run.start, run.state
  run.state = None  # the loop owns the (donated) state from here
  writer = writers.MetricWriter(workdir, resume_step=start)
  chrono = writers.Chrono()
  meta = {'config': run_config.config_dict(config)}
  logging.info('Set-up took %.1fs', time.perf_counter() - t_setup)

  def full_params(st):
    if run.spec.peft is not None:
      return run.spec.peft.merge(run.frozen_params, st.params)
    return {**run.frozen_params, **st.params}

  def preview(st, step):
    s = config.sample
    if not s.prompts or s.num_images_per_prompt < 1:
      return  # previews switched off
    sampler = run.samplers.get(s.scheduler, s.num_inference_steps, s.guidance_scale)
    prompts = [format_prompt(p, config) for p in s.prompts]
    all_prompts = [p for p in prompts for _ in range(s.num_images_per_prompt)]
    seeds = [s.seed + i for i in range(len(all_prompts))]
    imgs = sampler(full_params(st), all_prompts, seeds, s.negative_prompt)
    if is_main:
      grid = sampling.image_grid(imgs, ncols=s.num_images_per_prompt)
      sampling.save_grid(imgs, os.path.join(workdir, 'samples', f'step_{step:06d}.png'),
                         ncols=s.num_images_per_prompt)
      writer.image(step, 'samples', grid)

  def non_finite(step, m):
    return ckpt_lib.NonFiniteError(
        f'step {step}: loss={float(m["loss"])}, grad_norm={float(m["grad_norm"])} is not '
        f'finite; stopping without writing a checkpoint. Last finite checkpoint: '
        f'{checkpointer.latest_step()} in {checkpointer.directory} (a run that was '
        f'already diverging may diverge again from it).'
        + (' ' + run.spec.dpg.divergence_hint() if run.spec.dpg else ''))

  bar = tqdm.tqdm(total=config.num_steps, initial=start, desc='train',
                  disable=not is_main, dynamic_ncols=True)
  step = start
  exported = None
  try:
    with preemption.StopRequests() as stop:
      for step in range(start + 1, config.num_steps + 1):
        batch = sharding.put_batch(
            host_batch(run.latents, run.prompt_batch, step=step, config=config), run.mesh)
        t0 = time.perf_counter()
        state, metrics = run.step_fn(state, batch, run.rng, run.step_frozen)
        if step == start + 1:
          jax.block_until_ready(metrics)
          chrono.first_step_done(t0)
          logging.info('First step %.1fs', chrono.compile_s)
        else:
          chrono.tick()
        bar.update(1)
        # Every step, on every host: the multi-host preemption sync point.
        stopping = stop.should_stop(step, checkpointer)
        must_save = _every(step, config.checkpoint_every) or step == config.num_steps or stopping
        if _every(step, config.log_every) or must_save:
          m = jax.device_get(metrics)
          if not bool(m['finite']):
            raise non_finite(step, m)
          scalars = {k: v for k, v in m.items() if k != 'finite'}
          scalars['lr'] = run.spec.lr_schedule(step - 1)
          if np.isfinite(chrono.steps_per_sec()):  # undefined until a step after the compile
            scalars['steps_per_sec'] = chrono.steps_per_sec()
          writer.scalars(step, scalars)
          bar.set_postfix(loss=f'{float(m["loss"]):.4f}')
        if must_save:
          checkpointer.save(step, state, {'step': step, **meta})
        if stopping:
          checkpointer.wait()
          msg = (f'Stopped by {stop.name} at step {step}: checkpoint saved in '
                 f'{checkpointer.step_dir(step)}; rerun the same command to resume.')
          logging.warning(msg)
          raise preemption.Preempted(stop.signum, step, msg)
        if _every(step, config.sample_every) and step != config.num_steps:
          preview(state, step)
      if config.num_steps > start or not fileio.isdir(os.path.join(workdir, 'samples')):
        preview(state, config.num_steps)
      checkpointer.wait()
      if stop.signum is not None:  # arrived during the final preview: export on rerun
        msg = (f'Stopped by {stop.name} after step {step} (saved in '
               f'{checkpointer.step_dir(step)}) before the export; rerun to export.')
        logging.warning(msg)
        raise preemption.Preempted(stop.signum, step, msg)
      if config.export and run.spec.peft is not None:
        exported = fileio.join(workdir, export_lib.DIRS['flax'])
        delta = sharding.gather_to_host(state.params)  # every process: shards others hold
        if is_main:  # the delta only, in diffusers' formats (dpg_jax/adapters.py)
          with fileio.staged_dir(workdir) as out:  # a URL workdir: written locally, uploaded
            adapters.export_delta(os.path.join(out, export_lib.DIRS['flax']), run.spec.peft,
                                  delta, adapters.base_model_record(config, run.sd.source))
          logging.info('Exported the %s delta to %s', run.spec.peft.name, exported)
        del delta
      elif config.export:
        exported = ', '.join(export_lib.export_paths(workdir, config.export_format))
        # Every process takes part in gathering shards other hosts hold.
        host_params = sharding.gather_to_host(full_params(state))
        if is_main:
          with fileio.staged_dir(workdir) as out:  # a URL workdir: written locally, uploaded
            export_lib.export_pipeline(out, run.sd, host_params,
                                       export_format=config.export_format,
                                       fp16=config.export_fp16)
          logging.info('Exported the fine-tuned pipeline to %s', exported)
        del host_params
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  if chrono.compile_s is not None:
    logging.info('first step %.1fs, then %.2f steps/s', chrono.compile_s, chrono.steps_per_sec())
  if is_main:
    logging.info('%s', _summary(workdir, config, step, checkpointer, exported))
  return state
