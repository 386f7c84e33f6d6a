"""Custom Diffusion's data recipe: random-scale crops with prompt words, masked loss, captioned priors.

As diffusers' `train_custom_diffusion.py` (CustomDiffusionDataset):
  * `data.scale_augment`: each instance image is resized to a random scale s
    (2/3 of the time s in [R/3, R], else in [1.2 R, 1.4 R]); smaller images
    are pasted at a random place on a blank canvas, larger ones cropped at a
    random place. The instance prompt gets 'a far away ' or 'very small '
    (s < 0.6 R) or 'zoomed in ' or 'close up ' (s > R) in front, and a mask
    at latent resolution marks the valid region (1 everywhere for crops, the
    pasted square shrunk by one latent pixel otherwise). The instance loss is
    the masked MSE (`masked_mse`: their per-example mean over the valid region;
    theirs divides the 4-channel sum by the 1-channel mask sum, 4x ours, a
    constant factor Adam does not see).
    The crops are drawn ONCE into a bank of `data.augment_bank` per image and
    pre-encoded (the run's latents stay pre-encoded, see data.py). Measured
    with XLA's cost analysis at SD1.4 shapes, one 512 px VAE encode is 1111
    GFLOP, 1.4x a UNet forward (787 GFLOP): encoding the 2 instance images of
    each Custom Diffusion step would add ~24 % to a 4-image step (~9.4 TFLOP),
    while a bank of 8 crops per photo is encoded once at set-up. Bank row i is a crop of photo i % N (DPG's per-image
    references use that).
  * `data.real_prior`: `data.class_dir` holds real regularisation images with
    one caption each, as their retrieval script writes them: images.txt (one
    image path per line, relative to class_dir or absolute) and caption.txt
    (the matching caption per line). Each class image is trained with its own
    caption instead of `data.class_prompt`.
Works with every fine-tuning method (`finetune.method`); configs/custom_diffusion*.py
turn the augmentation on.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from dpg_jax import data as data_lib

# Prompt prefixes by id (0: none), as theirs.
PREFIXES = ('', 'a far away ', 'very small ', 'zoomed in ', 'close up ')


def enabled(config) -> bool:
  return bool(config.data.get('scale_augment', False) or real_prior(config))


def real_prior(config) -> bool:
  return bool(config.data.get('real_prior', False)) and bool(config.prior_preservation)


def validate_config(config) -> None:
  d = config.data
  if not isinstance(d.augment_bank, int) or d.augment_bank < 1:
    raise ValueError(f'config key data.augment_bank={d.augment_bank!r}: expected an integer '
                     '>= 1 (augmented crops per instance image).')
  if d.real_prior and not d.class_dir:
    raise ValueError('config key data.real_prior=True needs data.class_dir: a folder with '
                     'images.txt and caption.txt (one image path / caption per line).')


def augment(image, rng, latent_scale: int):
  """(float image [R, R, 3] in [-1, 1], mask [R/f, R/f], prefix id) of one uint8 image."""
  size = image.shape[0]
  scale = (int(rng.integers(size // 3, size + 1)) if rng.uniform() < 0.66 else
           int(rng.integers(int(1.2 * size), int(1.4 * size))))
  outer, inner = (scale, size) if scale > size else (size, scale)
  top, left = int(rng.integers(0, outer - inner + 1)), int(rng.integers(0, outer - inner + 1))
  resized = np.asarray(Image.fromarray(image).resize((scale, scale), Image.BILINEAR))
  resized = (resized / 127.5 - 1.0).astype(np.float32)
  m = size // latent_scale
  if scale > size:
    out = resized[top:top + inner, left:left + inner]
    mask = np.ones((m, m), np.float32)
  else:
    out = np.zeros((size, size, 3), np.float32)
    out[top:top + inner, left:left + inner] = resized
    mask = np.zeros((m, m), np.float32)
    mask[top // latent_scale + 1:(top + scale) // latent_scale - 1,
         left // latent_scale + 1:(left + scale) // latent_scale - 1] = 1.0
  if scale < 0.6 * size:
    prefix = int(rng.choice([1, 2]))
  elif scale > size:
    prefix = int(rng.choice([3, 4]))
  else:
    prefix = 0
  return out, mask, prefix


def crop_bank(images, *, per_image: int, seed: int, latent_scale: int, random_flip: bool):
  """(uint8 crops [k*N, R, R, 3], masks [k*N, 1, R/f, R/f], prefix ids [k*N]); row i from photo i % N."""
  rng = np.random.default_rng(seed + 7717)
  crops, masks, prefixes = [], [], []
  for _ in range(per_image):
    for img in np.asarray(images):
      if random_flip and rng.uniform() < 0.5:
        img = img[:, ::-1]
      x, mask, prefix = augment(np.ascontiguousarray(img), rng, latent_scale)
      crops.append(np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8))
      masks.append(mask[None])
      prefixes.append(prefix)
  return np.stack(crops), np.stack(masks), np.asarray(prefixes, np.int32)


def read_captioned_dir(class_dir: str, resolution: int, *, center_crop: bool, seed: int):
  """(uint8 images [N, R, R, 3], captions) of a folder with images.txt + caption.txt."""
  lists = {}
  for name in ('images.txt', 'caption.txt'):
    path = os.path.join(class_dir, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'config key data.class_dir={class_dir!r}: data.real_prior needs '
                              f'{path} (one {"image path" if name == "images.txt" else "caption"}'
                              ' per line).')
    with open(path, encoding='utf-8') as f:
      lists[name] = [line.strip() for line in f if line.strip()]
  paths = [p if os.path.isabs(p) else os.path.join(class_dir, p) for p in lists['images.txt']]
  captions = lists['caption.txt']
  if len(paths) != len(captions) or not paths:
    raise ValueError(f'config key data.class_dir={class_dir!r}: images.txt has {len(paths)} '
                     f'lines and caption.txt {len(captions)}; expected the same number (> 0).')
  images, good, bad = data_lib._load_paths(paths, resolution, center_crop=center_crop,  # pylint: disable=protected-access
                                           seed=seed, config_key='data.class_dir')
  if bad:
    raise data_lib.DataError(f'config key data.class_dir: cannot read {bad[0][0]} '
                             f'({bad[0][1]}); {len(bad)} of {len(paths)} images unreadable.')
  del good
  return np.stack(images), captions


@dataclasses.dataclass
class AugmentedLatents(data_lib.SubjectLatents):
  """SubjectLatents of a crop bank, with masks and per-row prompt ids.

  instance_prompt_id indexes the instance prompt table (PREFIXES order);
  class_prompt_id the class prompt table (one caption per class image, or
  the one class prompt).
  """
  instance_mask: np.ndarray | None = None
  instance_prompt_id: np.ndarray | None = None
  class_prompt_id: np.ndarray | None = None


def _rows(sd, te_params, text_in_step: bool, prompts):
  ids = sd.tokenize(prompts)
  if text_in_step:
    return 'ids', ids
  return 'context', np.asarray(jax.jit(sd.encode_text)(te_params, ids))


def prepare(config, sd, params, images, latents, class_images_fn, *, text_in_step: bool):
  """(AugmentedLatents, prompt tables): the bank, its masks and the prompt rows.

  latents: the plain SubjectLatents (their class part is kept unless
  real_prior replaces it). class_images_fn() -> (uint8 images, captions) of a
  captioned folder.
  """
  instance_prompt, class_prompt = data_lib.resolve_prompts(config)
  enc = jax.jit(sd.encode_images)
  encode_fn = lambda x: enc(params['vae'], x)
  d = config.data
  if d.scale_augment:
    crops, masks, prefix = crop_bank(images, per_image=d.augment_bank, seed=config.seed,
                                     latent_scale=sd.vae_scale, random_flip=d.random_flip)
    inst_mean, inst_std = data_lib.encode_images(encode_fn, crops, batch_size=8)
  else:
    inst_mean, inst_std = latents.instance_mean, latents.instance_std
    h = inst_mean.shape[-1]
    masks = np.ones((len(inst_mean), 1, h, h), np.float32)
    prefix = np.zeros((len(inst_mean),), np.int32)
  cls_mean, cls_std, cls_ids = latents.class_mean, latents.class_std, None
  class_prompts = [class_prompt]
  if real_prior(config):
    class_images, class_prompts = class_images_fn()
    cls_mean, cls_std = data_lib.encode_images(encode_fn, class_images, batch_size=8)
    cls_ids = np.arange(len(class_prompts), dtype=np.int32)
  elif cls_mean is not None:
    cls_ids = np.zeros((len(cls_mean),), np.int32)
  kind, inst_rows = _rows(sd, params['text_encoder'], text_in_step,
                          [p + instance_prompt for p in PREFIXES])
  tables = {f'instance_{kind}': inst_rows}
  if config.prior_preservation:
    tables[f'class_{kind}'] = _rows(sd, params['text_encoder'], text_in_step, class_prompts)[1]
  out = AugmentedLatents(inst_mean, inst_std, cls_mean, cls_std, instance_mask=masks,
                         instance_prompt_id=prefix, class_prompt_id=cls_ids)
  return out, tables


def host_batch(latents: AugmentedLatents, tables: dict, *, step: int, config) -> dict:
  """The step's host batch: latents, masks and each row's own prompt."""
  gb = config.batch_size * config.grad_accum_steps
  batch = data_lib.sample_batch(latents, step=step, seed=config.seed, batch_size=gb)
  idx = batch['instance_index']   # the same draw data_lib made
  batch['instance_mask'] = latents.instance_mask[idx]
  for key, table in tables.items():
    if key.startswith('instance_'):
      batch[key] = table[latents.instance_prompt_id[idx]]
    else:
      cidx = data_lib.sample_indices(latents.num_class, step=step, seed=config.seed,
                                     batch_size=gb, stream=1)
      batch[key] = table[latents.class_prompt_id[cidx]]
  return batch


def masked_mse(pred, target, mask):
  """Mean over examples of the squared error averaged over the mask's valid region.

  mask [B, 1, h, w] (broadcast over channels); their loss divides the channel
  sum by the 1-channel mask sum, i.e. is C times this.
  """
  err = jnp.square(pred - target) * mask
  valid = jnp.sum(mask, axis=(1, 2, 3)) * pred.shape[1]
  return jnp.mean(jnp.sum(err, axis=(1, 2, 3)) / jnp.maximum(valid, 1.0))
