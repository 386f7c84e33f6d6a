"""Text-to-image sampling: jit-compiled, sharded over the 'data' mesh axis.

`Sampler` compiles one function per instance (the batch shape is fixed to
`batch_size`), so repeated calls with new params, e.g. previews during
training, reuse it. Each image's initial noise comes from its own seed only,
so results do not depend on batch size, padding or the number of devices.
"""
import inspect
import math
import os
from typing import Sequence

from diffusers import FlaxDDIMScheduler
from diffusers import FlaxDPMSolverMultistepScheduler
from diffusers import FlaxPNDMScheduler
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
from PIL import Image

from dpg_jax import fileio
from dpg_jax import sharding

SCHEDULERS = {
    'ddim': FlaxDDIMScheduler,
    'pndm': FlaxPNDMScheduler,
    'dpm_solver': FlaxDPMSolverMultistepScheduler,
}
# SD pipelines run PNDM as pure PLMS; its Runge-Kutta warm-up steps cost 3 extra
# UNet calls for no quality gain.
_OVERRIDES = {'pndm': {'skip_prk_steps': True}}

_PARAM_KEYS = ('unet', 'vae', 'text_encoder')


def make_scheduler(name: str, scheduler_config: dict):
  """A Flax scheduler `name` configured from SD's scheduler config."""
  if name not in SCHEDULERS:
    raise ValueError(f'config key sample.scheduler={name!r}: expected one of '
                     f'{", ".join(repr(k) for k in SCHEDULERS)}.')
  cls = SCHEDULERS[name]
  # Keep only what this class accepts: SD ships a PNDM config whose extra keys
  # (clip_sample, ...) would otherwise trigger warnings in the other classes.
  accepted = inspect.signature(cls.__init__).parameters
  config = {k: v for k, v in dict(scheduler_config).items() if k in accepted}
  config.update(_OVERRIDES.get(name, {}))
  return cls(**config)


def initial_noise(seeds, shape) -> jnp.ndarray:
  """N(0, 1) noise [N, *shape]; row i depends only on seeds[i]."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  return jax.vmap(
      lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)


def to_uint8(images) -> np.ndarray:
  """Float images in [-1, 1] -> uint8 in [0, 255] (host)."""
  x = (np.asarray(images, np.float32) + 1.0) * 127.5
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check_seeds(seeds) -> np.ndarray:
  s = np.asarray(list(seeds), np.int64)
  if s.size and (s.min() < 0 or s.max() >= 2 ** 32):
    raise ValueError(f'seeds must lie in [0, 2**32), got min {s.min()} max {s.max()}.')
  return s.astype(np.uint32)


class Sampler:
  """Classifier-free-guided text-to-image sampling with a Flax scheduler."""

  def __init__(self, sd, *, resolution: int, scheduler: str = 'ddim',
               num_inference_steps: int = 50, guidance_scale: float = 7.5,
               batch_size: int = 8, mesh: Mesh | None = None):
    # The UNet halves the latent per down block; odd sizes break its skips.
    factor = sd.vae_scale * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if resolution % factor:
      raise ValueError(f'resolution={resolution} must be a multiple of {factor} '
                       f'for this model (VAE x UNet downsampling).')
    if num_inference_steps < 1 or batch_size < 1:
      raise ValueError(f'num_inference_steps={num_inference_steps} and '
                       f'batch_size={batch_size} must be >= 1.')
    self.sd = sd
    self.resolution = int(resolution)
    self.scheduler_name = scheduler
    self.scheduler = make_scheduler(scheduler, sd.scheduler_config)
    self.num_inference_steps = int(num_inference_steps)
    self.guidance_scale = float(guidance_scale)
    # At scale 1 the CFG mix equals the conditional output: skip the
    # unconditional half of the batch.
    self.do_cfg = self.guidance_scale != 1.0
    self.mesh = mesh
    n_data = sharding.batch_axis_size(mesh) if mesh is not None else 1
    self.batch_size = -(-int(batch_size) // n_data) * n_data
    self.trace_count = 0  # incremented per trace: tests assert no recompiles
    self._generate_jit = jax.jit(self._generate)

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    h = self.resolution // self.sd.vae_scale
    return (self.sd.latent_channels, h, h)

  # -- traced ------------------------------------------------------------------
  def _generate(self, params, input_ids, neg_ids, seeds):
    """[B, L] ids, [1, L] negative ids, [B] seeds -> [B, R, R, 3] in [-1, 1]."""
    self.trace_count += 1
    sd, sched = self.sd, self.scheduler
    b = input_ids.shape[0]
    context = sd.encode_text(params['text_encoder'], input_ids)
    if self.do_cfg:
      uncond = sd.encode_text(params['text_encoder'], neg_ids)
      uncond = jnp.broadcast_to(uncond, context.shape)
      # Interleave (uncond_i, cond_i) rather than concatenate halves: each
      # device's rows stay on that device when the batch is sharded.
      context = jnp.stack([uncond, context], axis=1).reshape(
          (2 * b,) + context.shape[1:])

    latents = initial_noise(seeds, self.latent_shape)
    if self.mesh is not None:
      latents = jax.lax.with_sharding_constraint(latents, sharding.batch_sharded(self.mesh))
    state = sched.set_timesteps(sched.create_state(), self.num_inference_steps, latents.shape)
    latents = latents * state.init_noise_sigma
    g = jnp.float32(self.guidance_scale)

    def body(i, carry):
      latents, state = carry
      t = state.timesteps[i]
      x = sched.scale_model_input(state, latents, t)
      if self.do_cfg:
        x = jnp.repeat(x, 2, axis=0)
      out = sd.predict(params['unet'], x, jnp.full((x.shape[0],), t, jnp.int32), context)
      if self.do_cfg:
        out = out.reshape((b, 2) + out.shape[1:])
        out_uncond, out_cond = out[:, 0], out[:, 1]
        out = out_uncond + g * (out_cond - out_uncond)
      latents, state = sched.step(state, out, t, latents, return_dict=False)
      return latents, state

    # PNDM (PLMS) has num_inference_steps + 1 timesteps: run all of them.
    n_steps = state.timesteps.shape[0]
    latents, _ = jax.lax.fori_loop(0, n_steps, body, (latents, state))
    images = sd.decode_latents(params['vae'], latents)
    return jnp.clip(images, -1.0, 1.0)

  # -- host --------------------------------------------------------------------
  def _put_params(self, params):
    """Places params once per call (not per chunk): replicated over the mesh."""
    params = {k: params[k] for k in _PARAM_KEYS}
    if self.mesh is None:
      return jax.device_put(params)
    rep = sharding.replicated(self.mesh)
    put = lambda x: (jax.device_put(x, rep) if isinstance(x, jax.Array)
                     else sharding.put_global(x, rep))
    return jax.tree.map(put, params)

  def _put_batch(self, x):
    if self.mesh is None:
      return x
    return sharding.put_global(x, sharding.batch_sharded(self.mesh))

  def sample(self, params, prompts: Sequence[str], seeds: Sequence[int],
             negative_prompt: str = '') -> np.ndarray:
    """Float32 images [N, R, R, 3] in [-1, 1] (host), one per (prompt, seed)."""
    prompts, seeds = list(prompts), _check_seeds(seeds)
    if len(prompts) != len(seeds):
      raise ValueError(f'got {len(prompts)} prompts but {len(seeds)} seeds.')
    r = self.resolution
    if not prompts:
      return np.zeros((0, r, r, 3), np.float32)
    params = self._put_params(params)
    neg_ids = self.sd.tokenize([negative_prompt])
    if self.mesh is not None:
      neg_ids = sharding.put_global(neg_ids, sharding.replicated(self.mesh))
    b, n = self.batch_size, len(prompts)
    n_pad = -(-n // b) * b
    # Padding rows: empty prompt, seed 0; they are computed and dropped.
    ids = self.sd.tokenize(prompts + [''] * (n_pad - n))
    seeds = np.concatenate([seeds, np.zeros(n_pad - n, np.uint32)])
    # Dispatch every chunk before fetching any, so host work overlaps compute.
    outs = []
    for i in range(0, n_pad, b):
      outs.append(self._generate_jit(params, self._put_batch(ids[i:i + b]), neg_ids,
                                     self._put_batch(seeds[i:i + b])))
    return np.concatenate([_to_host(o) for o in outs])[:n]

  def __call__(self, params, prompts: Sequence[str], seeds: Sequence[int],
               negative_prompt: str = '') -> np.ndarray:
    """uint8 images [N, R, R, 3], one per (prompt, seed)."""
    return to_uint8(self.sample(params, prompts, seeds, negative_prompt))


# -- image files ---------------------------------------------------------------
def image_grid(images, ncols: int | None = None) -> np.ndarray:
  """uint8 [N, H, W, C] (or a list of [H, W, C]) -> one uint8 [rows*H, ncols*W, C]."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'image_grid expects uint8 images, got {images.dtype}; '
                     'use sampling.to_uint8 for floats in [-1, 1].')
  if images.ndim == 3:  # [N, H, W] greyscale
    images = images[..., None]
  n, h, w, c = images.shape
  if n == 0:
    raise ValueError('image_grid got no images.')
  ncols = min(n, ncols or math.ceil(math.sqrt(n)))
  nrows = math.ceil(n / ncols)
  grid = np.zeros((nrows * h, ncols * w, c), np.uint8)  # empty cells stay black
  for i, im in enumerate(images):
    r, col = divmod(i, ncols)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
  return grid


def _save_atomic(image: np.ndarray, path: str) -> str:
  """Writes via a temp file + rename: readers never see a partial image."""
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), 'PNG')
  return fileio.atomic_write(path, lambda f: Image.fromarray(image).save(f, format=fmt))


def save_images(images, out_dir: str, prefix: str = 'image', *,
                names: Sequence[str] | None = None) -> list[str]:
  """Saves uint8 [N, H, W, C] images as <out_dir>/<prefix>_<i:04d>.png (or `names`)."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f'save_images expects uint8 images, got {images.dtype}.')
  if names is None:
    names = [f'{prefix}_{i:04d}.png' for i in range(len(images))]
  elif len(names) != len(images):
    raise ValueError(f'got {len(names)} names for {len(images)} images.')
  return [_save_atomic(im, os.path.join(out_dir, name)) for im, name in zip(images, names)]


def save_grid(images, path: str, ncols: int | None = None) -> str:
  """Saves `image_grid(images, ncols)` to `path` atomically; returns `path`."""
  return _save_atomic(image_grid(images, ncols), path)
