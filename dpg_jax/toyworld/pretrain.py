r"""Pretrains every shipped toy-world model: VAE, UNet + text encoder, judge, DINO, CLIP.

  python -m dpg_jax.toyworld.pretrain --workdir=/tmp/toyworld            # all stages
  python -m dpg_jax.toyworld.pretrain --workdir=/tmp/toyworld --stage=vae
  python -m dpg_jax.toyworld.pretrain --workdir=/tmp/toyworld --stage=ship \
      --out=dpg_jax/toyworld/shipped   # replace the shipped weights

Stages (each resumable: rerun the same command after a kill; finished stages
are skipped, a stage in progress resumes from its last checkpoint):
  data   render the scenes once (<workdir>/data, chunked .npz)
  vae    the VAE: L1 + L2 reconstruction + a light KL, on random 32x32 crops
         (the convolutions are 4x cheaper there), then on whole scenes; the
         latent scaling factor is set to 1 / std of the latents.
  unet   the UNet and text encoder on captioned scenes with the project's own
         train step (`train.train_step`, its optimiser and sharding), the
         caption dropped 10% of the time for classifier-free guidance; the
         exponential moving average of their weights is what the stage keeps.
  judge  the attribute classifier, on clean scenes and VAE reconstructions.
  dino   the toy DINO: instance discrimination across new photos of one object
         (contrastive.py); records its retrieval accuracy on held-out objects.
  clip   the toy CLIP on (scene, caption) pairs; records its zero-shot accuracy.
  ship   the pipeline (diffusers layout), the judge and record.json (seeds,
         steps, final losses, timings, sha256 of every file) into --out.
Deterministic: every batch is a pure function of (seed, stage, step).
"""
import functools
import json
import os
import subprocess
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import tqdm
import transformers

from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import data as data_lib
from dpg_jax import encoders
from dpg_jax import models
from dpg_jax import optimizer as optimizer_lib
from dpg_jax import sharding
from dpg_jax import train as train_lib
from dpg_jax.toyworld import contrastive
from dpg_jax.toyworld import judge as judge_lib
from dpg_jax.toyworld import model as model_lib
from dpg_jax.toyworld import weights as weights_lib
from dpg_jax.toyworld import world

STAGES = ('data', 'vae', 'unet', 'judge', 'dino', 'clip', 'ship')


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_scenes = 12000        # rendered once; captions are redrawn every step
  c.chunk = 1000
  c.vae = ml_collections.ConfigDict(dict(
      crop_steps=2000, crop=32, crop_batch=32, full_steps=300, full_batch=8,
      learning_rate=3e-3, warmup_steps=50, kl_weight=1e-4, eval_scenes=256))
  c.unet = ml_collections.ConfigDict(dict(
      steps=4400, batch_size=64, learning_rate=1e-3, warmup_steps=100, caption_dropout=0.1,
      caption_keep=0.8,
      # The shipped UNet and text encoder are this exponential moving average
      # of the trained weights (horizon ~1 / (1 - decay) steps): at a few
      # thousand steps it samples visibly cleaner than the last iterate.
      ema_decay=0.995,
      # > 0: end the stage at this step, the LR schedule still spanning `steps`
      # (a cut to a time budget; record.json records steps and schedule_steps).
      stop_at=0))
  c.judge = ml_collections.ConfigDict(dict(
      steps=2000, batch_size=64, learning_rate=3e-3, warmup_steps=50, recon_scenes=3000,
      eval_scenes=600))
  # The toy DINO: batches of `batch_groups` groups of `group_size` objects (an
  # object and its one-attribute neighbours), two of each object's `views`
  # photos (a fixed pool, `recon_fraction` of them through the VAE).
  c.dino = ml_collections.ConfigDict(dict(
      steps=800, batch_groups=16, group_size=4, pool_groups=400, views=4, recon_fraction=0.5,
      learning_rate=1e-3, warmup_steps=100, temperature=0.1, eval_identities=120))
  # The toy CLIP: the rendered scenes and the judge stage's VAE reconstructions,
  # captions redrawn every step.
  c.clip = ml_collections.ConfigDict(dict(
      steps=800, batch_size=128, learning_rate=1e-3, warmup_steps=100, caption_keep=0.8,
      eval_scenes=240))
  c.checkpoint_every = 200
  c.log_every = 50
  return c


def optimizer_config(stage_cfg, num_steps):
  """The project optimiser's config keys for one stage (AdamW, cosine decay)."""
  return ml_collections.ConfigDict(dict(
      learning_rate=stage_cfg.learning_rate, warmup_steps=stage_cfg.warmup_steps,
      num_steps=num_steps, lr_schedule='cosine', optimizer_state_dtype='float32',
      max_grad_norm=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2))


def _done_path(workdir, stage):
  return os.path.join(workdir, stage, 'done.json')


def _read_done(workdir, stage):
  with open(_done_path(workdir, stage)) as f:
    return json.load(f)


def _write_done(workdir, stage, record):
  os.makedirs(os.path.join(workdir, stage), exist_ok=True)
  models.write_json(_done_path(workdir, stage), record)


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #
def render_scenes(workdir, config):
  """uint8 [N, 64, 64, 3] scenes and their Scene records, rendered once per chunk."""
  folder = os.path.join(workdir, 'data')
  os.makedirs(folder, exist_ok=True)
  images, scenes = [], []
  starts = range(0, config.num_scenes, config.chunk)
  for start in tqdm.tqdm(starts, desc='render', dynamic_ncols=True):
    n = min(config.chunk, config.num_scenes - start)
    path = os.path.join(folder, f'scenes_{config.seed}_{start:06d}_{n}.npz')
    if os.path.isfile(path):
      with np.load(path) as z:
        imgs = z['images']
      scn = [world.sample_scene(world.scene_seed(config.seed, i)) for i in range(start, start + n)]
    else:
      imgs, scn, _ = world.make_dataset(config.seed, n, model_lib.RESOLUTION, start=start)
      tmp = path + '.tmp.npz'
      np.savez(tmp, images=imgs)
      os.replace(tmp, path)
    images.append(imgs)
    scenes += scn
  return np.concatenate(images), scenes


def _rng(config, stage, step, stream=0):
  return np.random.default_rng([config.seed, STAGES.index(stage), int(step), stream])


# --------------------------------------------------------------------------- #
# A small generic loop (the VAE and judge stages; the UNet stage passes the
# project's own train step into it)
# --------------------------------------------------------------------------- #
def fit(name, stage_dir, state, step_fn, batch_fn, num_steps, config, start_step=0):
  """Runs step_fn from the last checkpoint in stage_dir to num_steps.

  Returns (state, last metrics, seconds): the training time summed over every
  run that saved into stage_dir's checkpoints, resumed ones included.
  """
  ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, 'checkpoints'), max_to_keep=1)
  try:
    step0, last, seconds0 = start_step, {}, 0.0
    if ckpt.all_steps():
      latest, restored, meta = ckpt.restore_latest(state)
      if latest is not None and latest >= start_step:
        # (== start_step: the previous fit's last save, in the same folder.)
        step0, state, last = latest, restored, meta.get('metrics', {})
        seconds0 = meta.get('seconds', 0.0)
    rng = jax.random.PRNGKey(config.seed + 7 * (STAGES.index(name.split('/')[0]) + 1))
    bar = tqdm.tqdm(total=num_steps, initial=step0, desc=name, dynamic_ncols=True)
    log = open(os.path.join(stage_dir, 'metrics.jsonl'), 'a')
    t0 = time.perf_counter()
    elapsed = lambda: seconds0 + time.perf_counter() - t0   # over resumed runs too
    for step in range(step0 + 1, num_steps + 1):
      state, metrics = step_fn(state, batch_fn(step), rng)
      bar.update(1)
      if step % config.log_every == 0 or step == num_steps:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(np.isfinite(v) for v in last.values()):
          raise ckpt_lib.NonFiniteError(f'{name} step {step}: non-finite metrics {last}.')
        bar.set_postfix(loss=f'{last["loss"]:.4f}')
        log.write(json.dumps({'step': step, 's': round(elapsed(), 1), **last}) + '\n')
        log.flush()
      if step % config.checkpoint_every == 0 or step == num_steps:
        # The stage's time on record, read back by a resumed run.
        ckpt.save(step, state, {'step': step, 'metrics': last, 'seconds': elapsed()})
    bar.close()
    log.close()
    ckpt.wait()
  finally:
    ckpt.close()
  return state, last, round(elapsed(), 1)


def _seconds(train_seconds, t_after_fit):
  """A stage's time on record: its training (summed over resumed runs) + what followed."""
  return round(train_seconds + time.perf_counter() - t_after_fit, 1)


def _simple_step(loss_fn, tx, state, batch, rng):
  """One AdamW update of loss_fn(params, batch, rng) -> (loss, metrics)."""
  rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), **metrics}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def ema_update(decay, ema, params):
  """One step of the exponential moving average of params."""
  return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def _new_state(params, tx, step=0):
  return train_lib.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                              opt_state=tx.init(params))


# --------------------------------------------------------------------------- #
# VAE
# --------------------------------------------------------------------------- #
def _vae_loss(vae, kl_weight, params, batch, rng):
  x = jnp.transpose(batch['images'], (0, 3, 1, 2))
  dist = vae.apply({'params': params}, x, method=vae.encode).latent_dist
  z = dist.sample(rng)
  rec = vae.apply({'params': params}, z, method=vae.decode).sample
  l1 = jnp.mean(jnp.abs(rec - x))
  l2 = jnp.mean(jnp.square(rec - x))
  kl = jnp.mean(dist.kl()) / (x.shape[1] * x.shape[2] * x.shape[3])
  return l1 + l2 + kl_weight * kl, {'l1': l1, 'l2': l2, 'kl_per_dim': kl}


def psnr(a_uint8, b_uint8) -> float:
  """Mean PSNR (dB) over images, 8-bit peak."""
  err = np.mean((a_uint8.astype(np.float64) - b_uint8.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(err, 1e-10))))


def reconstruct(sd, vae_params, images_uint8, batch_size=32):
  """VAE reconstructions (posterior mean) of uint8 images, uint8."""
  enc = jax.jit(sd.encode_images)
  dec = jax.jit(sd.decode_latents)
  out = []
  for s in range(0, len(images_uint8), batch_size):
    x = data_lib.to_float_images(images_uint8[s:s + batch_size])
    mean, _ = enc(vae_params, x)
    out.append(np.asarray(dec(vae_params, mean * sd.scaling_factor)))
  rec = np.concatenate(out)
  return np.clip(np.round((rec + 1) * 127.5), 0, 255).astype(np.uint8)


def stage_vae(workdir, config, images):
  cfg = config.vae
  stage_dir = os.path.join(workdir, 'vae')
  init_dir = os.path.join(stage_dir, 'init')
  if not os.path.isdir(init_dir):
    model_lib.write_random(init_dir, seed=config.seed)
  sd, params = models.load_stable_diffusion(init_dir)
  total = cfg.crop_steps + cfg.full_steps
  opt = optimizer_lib.make_optimizer(optimizer_config(cfg, total))
  step = jax.jit(functools.partial(_simple_step, functools.partial(
      _vae_loss, sd.vae, cfg.kl_weight), opt.tx), donate_argnums=(0,))
  train_images = images[cfg.eval_scenes:]

  def batch_fn(size, batch, s):
    idx = data_lib.sample_indices(len(train_images), step=s, seed=config.seed,
                                  batch_size=batch, stream=1)
    x = train_images[idx]
    if size < x.shape[1]:  # crops on the latent grid
      r = _rng(config, 'vae', s)
      g = sd.vae_scale
      offs = r.integers(0, (x.shape[1] - size) // g + 1, (batch, 2)) * g
      x = np.stack([im[oy:oy + size, ox:ox + size] for im, (oy, ox) in zip(x, offs)])
    flip = _rng(config, 'vae', s, 1).uniform(size=batch) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return {'images': data_lib.to_float_images(x)}

  state = _new_state(params['vae'], opt.tx)
  state, _, _ = fit('vae/crops', stage_dir, state, step,
                    functools.partial(batch_fn, cfg.crop, cfg.crop_batch), cfg.crop_steps, config)
  state, last, train_seconds = fit('vae/full', stage_dir, state, step,
                    functools.partial(batch_fn, images.shape[1], cfg.full_batch), total, config,
                    start_step=cfg.crop_steps)
  t0 = time.perf_counter()
  vae_params = jax.device_get(state.params)
  # 1 / std of the latent means over training scenes: unit-variance diffusion inputs.
  enc = jax.jit(sd.encode_images)
  means = np.concatenate([np.asarray(enc(vae_params, data_lib.to_float_images(
      train_images[s:s + 64]))[0]) for s in range(0, min(1024, len(train_images)), 64)])
  scaling = float(1.0 / np.std(means))
  pipeline = os.path.join(stage_dir, 'pipeline')
  model_lib.write_random(pipeline, seed=config.seed, scaling_factor=scaling)
  sd, params = models.load_stable_diffusion(pipeline)
  params['vae'] = vae_params
  models.save_pipeline(pipeline, sd, params)
  held = images[:cfg.eval_scenes]
  rec = reconstruct(sd, vae_params, held)
  record = {'steps': total, 'crop_steps': cfg.crop_steps, 'final': last,
            'scaling_factor': scaling, 'psnr_held_out_db': psnr(held, rec),
            'eval_scenes': cfg.eval_scenes, 'seconds': _seconds(train_seconds, t0)}
  _write_done(workdir, 'vae', record)
  logging.info('VAE: %s', record)
  return record


# --------------------------------------------------------------------------- #
# UNet + text encoder (the project's train step)
# --------------------------------------------------------------------------- #
def unet_step_config(config):
  cfg = config.unet
  c = optimizer_config(cfg, cfg.steps)
  c.update(dict(prediction_type='', batch_size=cfg.batch_size, grad_accum_steps=1,
                grad_accum_unroll=1, train_text_encoder=True, prior_preservation=False,
                prior_loss_weight=0.0))
  return c


class CaptionBatches:
  """Step -> the train step's batch: latents of `step`'s scenes and fresh captions."""

  def __init__(self, sd, means, stds, scenes, config):
    self.sd, self.means, self.stds, self.scenes = sd, means, stds, scenes
    self.config = config
    self._ids = {}

  def ids(self, text):
    if text not in self._ids:
      self._ids[text] = self.sd.tokenize([text])[0]
    return self._ids[text]

  def captions(self, step, idx):
    cfg = self.config.unet
    r = _rng(self.config, 'unet', step)
    return ['' if r.uniform() < cfg.caption_dropout
            else world.caption(self.scenes[i], r, keep=cfg.caption_keep) for i in idx]

  def __call__(self, step):
    cfg = self.config.unet
    idx = data_lib.sample_indices(len(self.scenes), step=step, seed=self.config.seed,
                                  batch_size=cfg.batch_size, stream=2)
    ids = np.stack([self.ids(c) for c in self.captions(step, idx)])
    return {'instance_mean': self.means[idx], 'instance_std': self.stds[idx],
            'instance_index': idx.astype(np.int32), 'instance_ids': ids}


def _cached_arrays(path, names, compute):
  """The arrays `compute()` returns, saved at `path` (atomically) the first
  time and read back on a resumed run."""
  if os.path.isfile(path):
    with np.load(path) as z:
      return tuple(z[n] for n in names)
  arrays = tuple(compute())
  np.savez(path + '.tmp.npz', **dict(zip(names, arrays)))
  os.replace(path + '.tmp.npz', path)
  return arrays


def encode_all(sd, vae_params, images, batch_size=64):
  enc = jax.jit(sd.encode_images)
  return data_lib.encode_images(lambda x: enc(vae_params, x), images, batch_size=batch_size)


def _after_vae(workdir, stage):
  """(the stage's folder, created; the trained VAE's pipeline and params)."""
  stage_dir = os.path.join(workdir, stage)
  os.makedirs(stage_dir, exist_ok=True)
  sd, params = models.load_stable_diffusion(os.path.join(workdir, 'vae', 'pipeline'))
  return stage_dir, sd, params


def stage_unet(workdir, config, images, scenes):
  stage_dir, sd, params = _after_vae(workdir, 'unet')
  means, stds = _cached_arrays(
      os.path.join(stage_dir, 'latents.npz'), ('mean', 'std'),
      lambda: encode_all(sd, params['vae'], images))
  step_cfg = unet_step_config(config)
  spec = train_lib.make_step_spec(sd, step_cfg)
  mesh = sharding.make_mesh()
  trainable = train_lib.trainable_params(params, step_cfg)
  init_rng = jax.random.PRNGKey(config.seed)
  _, state_sh = train_lib.abstract_state(spec, trainable, init_rng, mesh)
  step_fn = train_lib.compile_train_step(spec, mesh, state_sh)
  state, _ = train_lib.create_sharded_state(spec, trainable, init_rng, mesh)
  batches = CaptionBatches(sd, means, stds, scenes, config)
  ema_fn = jax.jit(functools.partial(ema_update, config.unet.ema_decay), donate_argnums=(0,))

  def step_with_ema(carry, batch, rng):
    st, ema = carry
    st, metrics = step_fn(st, sharding.put_batch(batch, mesh), rng, None)
    return (st, ema_fn(ema, st.params)), metrics

  # (state, EMA) is checkpointed as one tree, so a resumed stage keeps its average.
  (state, ema), last, train_seconds = fit(
      'unet', stage_dir, (state, jax.tree.map(jnp.copy, state.params)), step_with_ema,
      batches, config.unet.stop_at or config.unet.steps, config)
  t0 = time.perf_counter()
  params.update(jax.device_get(ema))
  models.save_pipeline(os.path.join(stage_dir, 'pipeline'), sd, params)
  record = {'steps': config.unet.stop_at or config.unet.steps,
            'schedule_steps': config.unet.steps, 'batch_size': config.unet.batch_size,
            'final': {k: last[k] for k in ('loss', 'grad_norm') if k in last},
            'seconds': _seconds(train_seconds, t0)}
  _write_done(workdir, 'unet', record)
  logging.info('UNet: %s', record)
  return record


# --------------------------------------------------------------------------- #
# Judge
# --------------------------------------------------------------------------- #
def _judge_loss(params, batch, rng):
  del rng
  logits = judge_lib.Judge().apply({'params': params}, batch['images'])
  losses, metrics = [], {}
  for h in judge_lib.HEADS:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[h], batch[h])
    w = batch['secondary_valid'] if h == 'secondary' else jnp.ones_like(ce)
    loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1)
    losses.append(loss)
    metrics[f'ce_{h}'] = loss
  return sum(losses), metrics


def reconstruction_pool(workdir, config, sd, vae_params, images, scenes):
  """(scenes + VAE reconstructions of the last judge.recon_scenes, their Scenes).

  Reconstructions stand in for their scenes: the judge and the toy CLIP see
  both looks (generated images are decoded latents). Cached once, in judge/.
  """
  n = config.judge.recon_scenes
  os.makedirs(os.path.join(workdir, 'judge'), exist_ok=True)
  recs, = _cached_arrays(os.path.join(workdir, 'judge', 'reconstructions.npz'), ('images',),
                         lambda: (reconstruct(sd, vae_params, images[-n:]),))
  return np.concatenate([images, recs]), list(scenes) + list(scenes[-n:])


def stage_judge(workdir, config, images, scenes):
  cfg = config.judge
  stage_dir, sd, params = _after_vae(workdir, 'judge')
  pool, pool_scenes = reconstruction_pool(workdir, config, sd, params['vae'], images, scenes)
  labels = world.label_arrays(pool_scenes)
  labels['secondary_valid'] = np.asarray([s.pattern != 'solid' for s in pool_scenes],
                                         np.float32)
  opt = optimizer_lib.make_optimizer(optimizer_config(cfg, cfg.steps))
  step = jax.jit(functools.partial(_simple_step, _judge_loss, opt.tx), donate_argnums=(0,))

  def batch_fn(s):
    idx = data_lib.sample_indices(len(pool), step=s, seed=config.seed,
                                  batch_size=cfg.batch_size, stream=3)
    x = pool[idx]
    flip = _rng(config, 'judge', s).uniform(size=len(idx)) < 0.5
    x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return {'images': data_lib.to_float_images(x), **{k: v[idx] for k, v in labels.items()}}

  state = _new_state(judge_lib.init_params(jax.random.PRNGKey(config.seed)), opt.tx)
  state, last, train_seconds = fit('judge', stage_dir, state, step, batch_fn, cfg.steps, config)
  t0 = time.perf_counter()
  judge_params = jax.device_get(state.params)
  judge_lib.save(os.path.join(stage_dir, 'judge.msgpack'), judge_params)
  # Held out: fresh scenes of the HELD_OUT combinations (never in training),
  # clean and reconstructed.
  test_imgs, test_scenes = [], []
  for i in range(cfg.eval_scenes):
    r = world.scene_seed(config.seed + 1, i)
    cls, colour, pattern = world.HELD_OUT[i % len(world.HELD_OUT)]
    s = world.sample_scene(r, allow_held_out=True)
    s = world.Scene(**{**s.__dict__, 'cls': cls, 'colour': colour, 'pattern': pattern,
                       'secondary': s.secondary if s.secondary != colour else 'white'
                       if colour != 'white' else 'red'})
    test_scenes.append(s)
    test_imgs.append(world.render(s, model_lib.RESOLUTION))
  test_imgs = np.stack(test_imgs)
  target = world.label_arrays(test_scenes)
  acc = {}
  for kind, x in (('clean', test_imgs), ('vae', reconstruct(sd, params['vae'], test_imgs))):
    probs = judge_lib.probabilities(judge_params, x)
    a = judge_lib.accuracy(probs, {h: target[h] for h in judge_lib.HEADS if h != 'secondary'})
    patterned = np.asarray([s.pattern != 'solid' for s in test_scenes])
    a['secondary'] = float(np.mean(
        np.argmax(probs['secondary'], -1)[patterned] == target['secondary'][patterned]))
    acc[kind] = a
  record = {'steps': cfg.steps, 'final': {k: last[k] for k in last if k != 'grad_norm'},
            'held_out_accuracy': acc,
            'chance': {h: 1 / len(world.LABELS[h]) for h in judge_lib.HEADS},
            'eval_scenes': cfg.eval_scenes, 'seconds': _seconds(train_seconds, t0)}
  _write_done(workdir, 'judge', record)
  logging.info('Judge: %s', record)
  return record


# --------------------------------------------------------------------------- #
# The toy DINO and CLIP (contrastive.py)
# --------------------------------------------------------------------------- #
def _flip(x, rng):
  """Each image of [..., H, W, C] mirrored left-right with probability 1/2."""
  flip = rng.uniform(size=x.shape[:-3]) < 0.5
  return np.where(flip[..., None, None, None], x[..., ::-1, :], x)


def stage_dino(workdir, config):
  cfg = config.dino
  stage_dir, sd, params = _after_vae(workdir, 'dino')
  recon = lambda x: reconstruct(sd, params['vae'], x)

  def make_views():
    ids = contrastive.identity_groups(np.random.default_rng([config.seed, 0xD1]),
                                      cfg.pool_groups, cfg.group_size)
    views = contrastive.render_views(ids, cfg.views, config.seed)
    flat = views.reshape((-1,) + views.shape[2:])
    pick = _rng(config, 'dino', 0).uniform(size=len(flat)) < cfg.recon_fraction
    flat[pick] = recon(flat[pick])
    return (flat.reshape(views.shape),)

  views, = _cached_arrays(os.path.join(stage_dir, 'views.npz'), ('views',), make_views)
  encoder = encoders.DinoEncoder(contrastive.dino_config())
  opt = optimizer_lib.make_optimizer(optimizer_config(cfg, cfg.steps))
  step = jax.jit(functools.partial(_simple_step, functools.partial(
      contrastive.dino_loss, encoder, cfg.temperature), opt.tx), donate_argnums=(0,))

  def batch_fn(s):
    r = _rng(config, 'dino', s)
    groups = r.choice(cfg.pool_groups, cfg.batch_groups, replace=False)
    idx = (groups[:, None] * cfg.group_size + np.arange(cfg.group_size)).reshape(-1)
    a = r.integers(cfg.views, size=len(idx))
    b = (a + 1 + r.integers(cfg.views - 1, size=len(idx))) % cfg.views  # another photo
    return {'views': data_lib.to_float_images(_flip(np.stack([views[idx, a], views[idx, b]]), r))}

  state = _new_state(contrastive.init_params(encoder, config.seed), opt.tx)
  state, last, train_seconds = fit('dino', stage_dir, state, step, batch_fn, cfg.steps, config)
  t0 = time.perf_counter()
  model_dir = contrastive.write_dino(os.path.join(stage_dir, 'model'), encoder.config,
                                     state.params)
  # Measured through the loader every user of the model goes through.
  encoder, dino_params = encoders.load_dino(model_dir)
  retrieval = contrastive.dino_retrieval(encoder, dino_params, recon_fn=recon,
                                         num_identities=cfg.eval_identities)
  record = {'steps': cfg.steps, 'final': last, 'retrieval': retrieval,
            'seconds': _seconds(train_seconds, t0)}
  _write_done(workdir, 'dino', record)
  logging.info('DINO: %s', record)
  return record


def stage_clip(workdir, config, images, scenes):
  cfg = config.clip
  stage_dir, sd, params = _after_vae(workdir, 'clip')
  pool, pool_scenes = reconstruction_pool(workdir, config, sd, params['vae'], images, scenes)
  tok_dir = os.path.join(stage_dir, 'tokenizer')
  model_lib.write_tokenizer(tok_dir)   # the toy SD's: one token per toy-world word
  tokenizer = transformers.CLIPTokenizerFast.from_pretrained(tok_dir)
  encoder = encoders.ClipEncoder(contrastive.clip_config(tokenizer), tokenizer)
  opt = optimizer_lib.make_optimizer(optimizer_config(cfg, cfg.steps))
  step = jax.jit(functools.partial(_simple_step, functools.partial(
      contrastive.clip_loss, encoder), opt.tx), donate_argnums=(0,))
  ids = {}

  def batch_fn(s):
    idx = data_lib.sample_indices(len(pool), step=s, seed=config.seed,
                                  batch_size=cfg.batch_size, stream=4)
    r = _rng(config, 'clip', s)
    caps = [world.caption(pool_scenes[i], r, keep=cfg.caption_keep) for i in idx]
    for c in set(caps) - set(ids):
      ids[c] = encoder.tokenize([c])[0]
    return {'images': data_lib.to_float_images(_flip(pool[idx], r)),
            'ids': np.stack([ids[c] for c in caps])}

  state = _new_state(contrastive.init_params(encoder, config.seed), opt.tx)
  state, last, train_seconds = fit('clip', stage_dir, state, step, batch_fn, cfg.steps, config)
  t0 = time.perf_counter()
  model_dir = contrastive.write_clip(os.path.join(stage_dir, 'model'), encoder.config,
                                     tokenizer, state.params)
  encoder, clip_params = encoders.load_clip(model_dir)
  zero_shot = contrastive.clip_zero_shot(encoder, clip_params, num_scenes=cfg.eval_scenes)
  record = {'steps': cfg.steps, 'final': last, 'zero_shot': zero_shot,
            'seconds': _seconds(train_seconds, t0)}
  _write_done(workdir, 'clip', record)
  logging.info('CLIP: %s', record)
  return record


# --------------------------------------------------------------------------- #
# Ship
# --------------------------------------------------------------------------- #
def _commit():
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''


def stage_ship(workdir, config, out):
  import shutil  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out or os.path.join(workdir, 'shipped'))
  os.makedirs(out, exist_ok=True)
  base = os.path.join(out, 'base')
  if os.path.isdir(base):
    shutil.rmtree(base)
  shutil.copytree(os.path.join(workdir, 'unet', 'pipeline'), base)
  shutil.copyfile(os.path.join(workdir, 'judge', 'judge.msgpack'),
                  os.path.join(out, 'judge.msgpack'))
  for name in ('dino', 'clip'):
    if os.path.isdir(os.path.join(out, name)):
      shutil.rmtree(os.path.join(out, name))
    shutil.copytree(os.path.join(workdir, name, 'model'), os.path.join(out, name))
  stages = {s: _read_done(workdir, s) for s in ('vae', 'unet', 'judge', 'dino', 'clip')}
  record = {
      'commit': _commit(),
      'config': config.to_dict(),
      'stages': stages,
      'total_seconds': round(sum(s['seconds'] for s in stages.values()), 1),
      'files': weights_lib.file_hashes(out),
  }
  models.write_json(os.path.join(out, 'record.json'), record)
  logging.info('Shipped to %s (%.1f MB)', out,
               sum(os.path.getsize(os.path.join(out, f)) for f in record['files']) / 1e6)
  return record


def run(workdir, config, stage='all', out=''):
  workdir = train_lib.check_workdir(workdir)
  todo = STAGES if stage == 'all' else (stage,)
  t0 = time.perf_counter()
  images = scenes = None
  for s in todo:
    if s != 'ship' and s != 'data' and stage == 'all' and os.path.isfile(_done_path(workdir, s)):
      logging.info('Stage %s already done (%s); skipping.', s, _done_path(workdir, s))
      continue
    if s in ('data', 'vae', 'unet', 'judge', 'clip') and images is None:
      images, scenes = render_scenes(workdir, config)
    if s == 'vae':
      stage_vae(workdir, config, images)
    elif s == 'unet':
      stage_unet(workdir, config, images, scenes)
    elif s == 'judge':
      stage_judge(workdir, config, images, scenes)
    elif s == 'dino':
      stage_dino(workdir, config)
    elif s == 'clip':
      stage_clip(workdir, config, images, scenes)
    elif s == 'ship':
      stage_ship(workdir, config, out)
  logging.info('pretrain --stage=%s took %.1f s', stage, time.perf_counter() - t0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError('--workdir is required.')
  run(f.workdir, f.config, f.stage, f.out)


if __name__ == '__main__':
  # Defined here, not at import: the library (weights.py, tests) imports this
  # module next to CLIs that own a --config flag of their own.
  _CONFIG = config_flags.DEFINE_config_dict('config', get_config(), lock_config=True)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Where the data, checkpoints and stage '
                                 'outputs go (resumable).')
  _STAGE = flags.DEFINE_enum('stage', 'all', STAGES + ('all',), 'Stage to run (all: every '
                             'stage in order, skipping finished ones).')
  _OUT = flags.DEFINE_string('out', '', "Where 'ship' writes (default <workdir>/shipped; "
                             'dpg_jax/toyworld/shipped replaces the shipped models).')
  app.run(main)
